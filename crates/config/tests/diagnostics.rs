//! Expected-output tests for config diagnostics: every `tests/data/invalid/*.yaml`
//! must produce exactly the lines in its `.out` file. Set `UPDATE_EXPECT=1` to
//! rewrite the `.out` files after a deliberate change (then review the diff).

use std::path::{Path, PathBuf};

fn cases(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    v.sort();
    v
}

#[test]
fn invalid_configs_match_expected_diagnostics() {
    let files = cases("tests/data/invalid");
    assert!(files.len() >= 7, "the invalid corpus went missing");
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for yaml in files {
        let (snapshot, diags) = meshgate_config::compile_paths(std::slice::from_ref(&yaml));
        assert!(
            snapshot.is_none(),
            "{} compiled but is in the invalid corpus",
            yaml.display()
        );
        let got: String = diags.iter().map(|d| format!("{d}\n")).collect();
        let out = yaml.with_extension("out");
        if update {
            std::fs::write(&out, &got).unwrap_or_else(|e| panic!("{e}"));
            continue;
        }
        let want = std::fs::read_to_string(&out).unwrap_or_default();
        if got != want {
            failures.push(format!(
                "--- {}\n+++ got\n{got}--- want\n{want}",
                out.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn shipped_examples_are_valid() {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/quickstart");
    let (snapshot, diags) = meshgate_config::compile_paths(&[quickstart]);
    assert!(diags.is_empty(), "{diags:?}");
    let s = snapshot.unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(s.gateways.len(), 1);
    assert!(s.apis.len() >= 3);
}

#[test]
fn every_document_of_a_directory_loads_once() {
    let (snapshot, diags) = meshgate_config::compile_paths(&[PathBuf::from("tests/data/valid")]);
    assert!(diags.is_empty(), "{diags:?}");
    let s = snapshot.unwrap_or_else(|| panic!("no snapshot"));
    assert_eq!(s.apis.len(), 2);
    assert_eq!(s.services.len(), 1);
    assert_eq!(s.revision.len(), 16);
}
