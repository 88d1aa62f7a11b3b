//! Grey releases of Apis. A release is an Api whose `spec.release` names the Api it
//! is a new revision of, and who it serves: proxies by label, a share of the
//! traffic by a stable hash, requests by header. It lives in the store like any
//! resource (versioned, diffed, pushed); the proxies decide per request.
//!
//! - start: the Api as it will be once promoted, stored as `Api/NAME-canary` with
//!   the release rule;
//! - promote: the Api takes the release's spec, and the release goes, in one
//!   revision;
//! - roll back: the release goes; the Api never changed.

use crate::plane::{Meta, Plane, Write, WriteError, Written, read_text, write_text};
use crate::store::{Store, key, source};
use meshgate_api::{Kind, ReleaseSpec};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// `POST /api/v1/releases`: a new revision of an Api and who it serves.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Start {
    /// One Api document, named as the Api it releases, as it will be once promoted.
    pub text: String,
    /// The release's own name (default: `NAME-canary`).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub consumers: BTreeMap<String, String>,
    #[serde(default)]
    pub rollback: Option<meshgate_api::AutoRollbackSpec>,
}

/// A release in the store.
#[derive(Debug, Clone)]
pub struct Release {
    pub name: String,
    pub spec: ReleaseSpec,
    /// The revision that last wrote it.
    pub revision: u64,
}

/// Store `start` as a release; replaces an earlier release of the same name and Api.
pub async fn start<S: Store>(
    plane: &Plane<S>,
    meta: Meta,
    start: Start,
    dry_run: bool,
) -> Result<(String, Written), WriteError> {
    let docs = meshgate_config::documents(&meshgate_config::Source {
        file: "request".into(),
        text: start.text,
    })
    .map_err(WriteError::Invalid)?;
    let [doc] = docs.as_slice() else {
        return Err(WriteError::BadRequest(format!(
            "text must hold exactly one Api, not {} documents",
            docs.len()
        )));
    };
    if doc.kind != Kind::Api {
        return Err(WriteError::BadRequest(format!(
            "only Apis are released, not {}",
            doc.kind.as_str()
        )));
    }
    let of = doc.name.clone();
    let name = start.name.unwrap_or_else(|| format!("{of}-canary"));
    let mut value = read_text(&key(Kind::Api, &of), &doc.text)?;
    if !value["spec"]["release"].is_null() {
        return Err(WriteError::BadRequest(
            "give the Api as it will be once promoted: the release rule goes beside the text, not in spec.release".into(),
        ));
    }
    let current = plane.store().load(None).await?;
    if !current.resources.contains_key(&key(Kind::Api, &of)) {
        return Err(WriteError::NotFound(key(Kind::Api, &of)));
    }
    let k = key(Kind::Api, &name);
    if let Some(stored) = current.resources.get(&k)
        && release_of(&k, &stored.text)?.is_none_or(|r| r.of != of)
    {
        return Err(WriteError::Exists(k));
    }
    let spec = ReleaseSpec {
        of: of.clone(),
        nodes: start.nodes,
        percent: start.percent,
        by: start.by,
        headers: start.headers,
        consumers: start.consumers,
        rollback: start.rollback,
    };
    value["metadata"]["name"] = name.clone().into();
    value["spec"]["release"] = serde_json::to_value(&spec)
        .map_err(|e| WriteError::BadRequest(format!("release rule: {e}")))?;
    let meta = with_message(meta, || format!("release {name} of Api {of}"));
    let w = Write {
        files: vec![source(&k, &write_text(&k, &value)?)],
        dry_run,
        ..Write::default()
    };
    Ok((name, plane.write(meta, w).await?))
}

/// The Api takes the release's spec (without the rule) and the release goes, as
/// one revision.
pub async fn promote<S: Store>(
    plane: &Plane<S>,
    meta: Meta,
    name: &str,
    dry_run: bool,
) -> Result<Written, WriteError> {
    let (k, mut value, spec) = stored_release(plane, name).await?;
    if let Some(s) = value["spec"].as_object_mut() {
        s.remove("release");
    }
    value["metadata"]["name"] = spec.of.clone().into();
    let api = key(Kind::Api, &spec.of);
    let meta = with_message(meta, || {
        format!("promote release {name} to Api {}", spec.of)
    });
    let w = Write {
        files: vec![source(&api, &write_text(&api, &value)?)],
        deletes: vec![k],
        dry_run,
        ..Write::default()
    };
    plane.write(meta, w).await
}

/// The release goes; its Api serves all of its traffic again.
pub async fn roll_back<S: Store>(
    plane: &Plane<S>,
    meta: Meta,
    name: &str,
    dry_run: bool,
) -> Result<Written, WriteError> {
    let (k, _, spec) = stored_release(plane, name).await?;
    let meta = with_message(meta, || {
        format!("roll back release {name} of Api {}", spec.of)
    });
    let w = Write {
        deletes: vec![k],
        dry_run,
        ..Write::default()
    };
    plane.write(meta, w).await
}

/// Every release in the newest revision.
pub async fn list<S: Store>(plane: &Plane<S>) -> Result<(u64, Vec<Release>), WriteError> {
    let config = plane.store().load(None).await?;
    let prefix = format!("{}/", Kind::Api.as_str());
    let mut out = Vec::new();
    for (k, stored) in config
        .resources
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
    {
        // Most Apis are not releases: skip parsing those.
        if !stored.text.contains("release") {
            continue;
        }
        if let Some(spec) = release_of(k, &stored.text)? {
            out.push(Release {
                name: k[prefix.len()..].to_string(),
                spec,
                revision: stored.revision,
            });
        }
    }
    Ok((config.revision, out))
}

/// A release and where it runs: for each proxy, whether it serves the release and
/// what share of the Api's traffic, and whether it has applied the release's
/// revision yet. `nodes` are the node records of `/api/v1/nodes`.
pub fn status(r: &Release, nodes: &[Value], observed: &crate::guard::Observed) -> Value {
    let mut which = String::new();
    if !r.spec.headers.is_empty() {
        which.push_str(" matching headers");
    }
    if !r.spec.consumers.is_empty() {
        let labels: Vec<String> = r
            .spec
            .consumers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        which = format!("{which} from Consumers labelled {}", labels.join(","));
    }
    let share = match (r.spec.percent, which.is_empty()) {
        (None, true) => "100%".to_string(),
        (Some(p), true) => format!("{p}%"),
        (None, false) => format!("requests{which}"),
        (Some(p), false) => format!("{p}% of requests{which}"),
    };
    let mut serving = 0;
    let mut applied = 0;
    let per_node: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let labels: BTreeMap<String, String> =
                serde_json::from_value(n["labels"].clone()).unwrap_or_default();
            let placed = r.spec.placed_on(&labels);
            let revision = n["revision"].as_u64().unwrap_or(0);
            let has_it = revision >= r.revision;
            if placed {
                serving += 1;
                if has_it {
                    applied += 1;
                }
            }
            json!({
                "node": n["name"],
                "labels": labels,
                "connected": n["connected"],
                "revision": revision,
                "runs": if placed && has_it { "release" } else if placed { "pending" } else { "current" },
                "share": if placed { share.as_str() } else { "0%" },
            })
        })
        .collect();
    let mut out = json!({
        "name": r.name,
        "of": r.spec.of,
        "revision": r.revision,
        "rule": r.spec,
        "share": share,
        "nodesPlaced": serving,
        "nodesApplied": applied,
        "nodes": per_node,
    });
    // What the automatic rollback sees now.
    if let Some(rule) = &r.spec.rollback
        && let Ok(window) = meshgate_config::parse_duration(&rule.window)
    {
        let t = observed.over(&r.name, window, std::time::Instant::now());
        out["observed"] =
            json!({"window": rule.window, "requests": t.requests, "errors": t.errors});
    }
    out
}

async fn stored_release<S: Store>(
    plane: &Plane<S>,
    name: &str,
) -> Result<(String, Value, ReleaseSpec), WriteError> {
    let k = key(Kind::Api, name);
    let current = plane.store().load(None).await?;
    let stored = current
        .resources
        .get(&k)
        .ok_or_else(|| WriteError::NotFound(k.clone()))?;
    let value = read_text(&k, &stored.text)?;
    let spec = rule_of(&k, &value)?
        .ok_or_else(|| WriteError::BadRequest(format!("{k} is not a release")))?;
    Ok((k, value, spec))
}

/// The release rule of a stored Api, if it is a release.
fn release_of(k: &str, text: &str) -> Result<Option<ReleaseSpec>, WriteError> {
    rule_of(k, &read_text(k, text)?)
}

/// The release rule of an Api read as JSON, if it is a release.
fn rule_of(k: &str, value: &Value) -> Result<Option<ReleaseSpec>, WriteError> {
    let rule = &value["spec"]["release"];
    if rule.is_null() {
        return Ok(None);
    }
    serde_json::from_value(rule.clone())
        .map(Some)
        .map_err(|e| WriteError::BadRequest(format!("{k} has a bad spec.release: {e}")))
}

fn with_message(meta: Meta, default: impl FnOnce() -> String) -> Meta {
    if meta.message.is_empty() {
        Meta {
            message: default(),
            ..meta
        }
    } else {
        meta
    }
}
