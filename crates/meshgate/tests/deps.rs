//! Keeps the crate boundaries of ARCHITECTURE.md true, from `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Normal (non-dev) dependencies of each workspace crate, by package name.
fn deps() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut map = BTreeMap::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default().to_string();
        let set = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str().map(str::to_string))
            .collect();
        map.insert(name, set);
    }
    map
}

#[test]
fn crate_boundaries_hold() {
    let d = deps();
    assert!(d.len() >= 8, "workspace crates missing: {:?}", d.keys());
    let forbid = |krate: &str, bad: &[&str]| {
        let have = &d[krate];
        for b in bad {
            assert!(!have.contains(*b), "{krate} must not depend on {b}");
        }
    };
    forbid(
        "meshgate-api",
        &["tokio", "hyper", "meshgate-proxy", "meshgate-config"],
    );
    forbid(
        "meshgate-core",
        &["tokio", "hyper", "meshgate-proxy", "meshgate-config"],
    );
    forbid(
        "meshgate-route",
        &["tokio", "hyper", "meshgate-proxy", "meshgate-config"],
    );
    forbid(
        "meshgate-upstream",
        &["tokio", "hyper", "meshgate-proxy", "meshgate-config"],
    );
    forbid(
        "meshgate-meter",
        &[
            "tokio",
            "hyper",
            "meshgate-proxy",
            "meshgate-config",
            "meshgate-filter",
        ],
    );
    forbid("meshgate-filter", &["meshgate-proxy", "meshgate-config"]);
    forbid("meshgate-control", &["meshgate-proxy"]);
    forbid("meshgate-config", &["meshgate-proxy", "tokio", "hyper"]);
    for (name, set) in &d {
        assert!(
            !set.contains("meshgate"),
            "{name} depends on the binary crate"
        );
        if name != "meshgate" {
            assert!(
                !set.contains("anyhow"),
                "{name}: anyhow is for the binary only"
            );
        }
    }
}
