//! The control plane's operations over a [`Store`]: read, write, history, diff and
//! rollback. Every write, rollback included, is compiled whole by the same
//! `meshgate_config::compile` that `meshgate validate` runs, and stored only when
//! the whole resulting config is valid.

use crate::store::{
    ChangeSummary, Commit, Config, Key, NewCommit, Store, StoreError, key, source as store_source,
};
use meshgate_api::Kind;
use meshgate_config::{Diagnostic, Source};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How often a write is retried when another control plane committed first.
const CONFLICT_RETRIES: usize = 5;

pub struct Plane<S> {
    store: S,
    /// Serialises this process's writes; the store's compare-and-set covers others.
    write: tokio::sync::Mutex<()>,
    /// The newest revision this process wrote or saw.
    revision: tokio::sync::watch::Sender<u64>,
    /// Parsed resources from the last write's compile: a write parses only what
    /// it changes.
    parsed: Arc<meshgate_config::ParseCache>,
}

/// Who writes, and why.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub author: String,
    pub message: String,
}

/// A write request: files of documents to put, keys to delete.
#[derive(Debug, Clone, Default)]
pub struct Write {
    pub files: Vec<Source>,
    pub deletes: Vec<Key>,
    /// Refuse to overwrite an existing resource (a create).
    pub create_only: bool,
    pub dry_run: bool,
}

/// A move to another lifecycle stage (`Plane::lifecycle`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StageChange {
    pub stage: meshgate_api::Stage,
    /// RFC 3339; deprecated Apis answer 410 after it.
    #[serde(default)]
    pub sunset: Option<String>,
    #[serde(default)]
    pub link: Option<String>,
}

/// What a write did (or, dry, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The new revision, or the current one when nothing changed or dry.
    pub revision: u64,
    pub changes: Vec<ChangeSummary>,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the config would be invalid:{}", lines(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("{0} does not exist")]
    NotFound(Key),
    #[error("{0} already exists")]
    Exists(Key),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One resource that differs between two revisions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub key: Key,
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// A unified diff of the texts.
    pub diff: String,
}

/// A resource read from the store: its text, the revision that wrote it, and its
/// JSON form with secrets redacted.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: Key,
    pub revision: u64,
    pub json: serde_json::Value,
}

impl<S: Store> Plane<S> {
    /// A plane over `store`, following the revisions other control planes write
    /// to it.
    pub async fn new(store: S) -> Result<Arc<Self>, StoreError> {
        let now = store.load(None).await?;
        let this = Arc::new(Self {
            store,
            write: tokio::sync::Mutex::new(()),
            revision: tokio::sync::watch::channel(now.revision).0,
            parsed: Arc::default(),
        });
        this.warm(
            now.resources
                .iter()
                .map(|(k, s)| store_source(k, &s.text))
                .collect(),
        );
        let follower = this.clone();
        tokio::spawn(async move {
            follower.store.follow(follower.revision.clone()).await;
        });
        Ok(this)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The newest revision in the store.
    pub async fn revision(&self) -> Result<u64, WriteError> {
        Ok(self.store.load(None).await?.revision)
    }

    /// Follows the newest revision this process knows of.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Resources of `kind` (one when `name` is given) at `revision` (newest: None).
    pub async fn get(
        &self,
        kind: Kind,
        name: Option<&str>,
        revision: Option<u64>,
    ) -> Result<(u64, Vec<Read>), WriteError> {
        let config = self.store.load(revision).await?;
        let prefix = format!("{}/", kind.as_str());
        let wanted: Vec<(&Key, &crate::store::Stored)> = match name {
            Some(n) => config
                .resources
                .get_key_value(&key(kind, n))
                .into_iter()
                .collect(),
            None => config
                .resources
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .collect(),
        };
        let mut out = Vec::new();
        for (k, stored) in wanted {
            let source = store_source(k, &stored.text);
            let json = meshgate_config::documents(&source)
                .ok()
                .and_then(|d| d.into_iter().next())
                .map_or(serde_json::Value::Null, |d| d.json);
            out.push(Read {
                key: k.clone(),
                revision: stored.revision,
                json,
            });
        }
        if let Some(n) = name
            && out.is_empty()
        {
            return Err(WriteError::NotFound(key(kind, n)));
        }
        Ok((config.revision, out))
    }

    /// Put the documents of `w.files` and delete `w.deletes`, as one revision.
    pub async fn write(&self, meta: Meta, w: Write) -> Result<Written, WriteError> {
        let mut puts: BTreeMap<Key, String> = BTreeMap::new();
        let mut diags = Vec::new();
        for f in &w.files {
            match meshgate_config::documents(f) {
                Ok(docs) => {
                    for d in docs {
                        let k = key(d.kind, &d.name);
                        if puts.insert(k.clone(), d.text).is_some() {
                            return Err(WriteError::BadRequest(format!(
                                "{k} is written twice in one request"
                            )));
                        }
                    }
                }
                Err(d) => diags.extend(d),
            }
        }
        if !diags.is_empty() {
            return Err(WriteError::Invalid(diags));
        }
        if let Some(k) = puts
            .iter()
            .find_map(|(k, t)| t.contains(meshgate_api::REDACTED).then_some(k))
        {
            return Err(WriteError::BadRequest(format!(
                "{k} holds {:?} where a secret goes (copied from a redacted read?): give the secret, or {{env: NAME}} / {{file: PATH}}",
                meshgate_api::REDACTED
            )));
        }
        if puts.is_empty() && w.deletes.is_empty() {
            return Err(WriteError::BadRequest("nothing to write".into()));
        }
        let files = w.files.clone();
        self.apply(meta, w.dry_run, |current| {
            for k in &w.deletes {
                if !current.resources.contains_key(k) {
                    return Err(WriteError::NotFound(k.clone()));
                }
                if puts.contains_key(k) {
                    return Err(WriteError::BadRequest(format!(
                        "{k} is both written and deleted"
                    )));
                }
            }
            if w.create_only
                && let Some(k) = puts.keys().find(|k| current.resources.contains_key(*k))
            {
                return Err(WriteError::Exists(k.clone()));
            }
            let mut changes: BTreeMap<Key, Option<String>> = puts
                .iter()
                .map(|(k, t)| (k.clone(), Some(t.clone())))
                .collect();
            changes.extend(w.deletes.iter().map(|k| (k.clone(), None)));
            Ok((changes, files.clone()))
        })
        .await
    }

    /// Move Api `name` to another lifecycle stage, as a new revision. Deprecating
    /// stamps `deprecatedAt` (now, unless already set) and takes the sunset and
    /// link given; going back to draft or published clears them.
    pub async fn lifecycle(
        &self,
        meta: Meta,
        name: &str,
        change: StageChange,
        dry_run: bool,
    ) -> Result<Written, WriteError> {
        use meshgate_api::Stage;
        let k = key(Kind::Api, name);
        let current = self.store.load(None).await?;
        let stored = current
            .resources
            .get(&k)
            .ok_or_else(|| WriteError::NotFound(k.clone()))?;
        let mut doc = read_text(&k, &stored.text)?;
        let Some(spec) = doc.get_mut("spec").and_then(|s| s.as_object_mut()) else {
            return Err(WriteError::BadRequest(format!("{k} has no spec")));
        };
        let lc = spec
            .entry("lifecycle")
            .or_insert_with(|| serde_json::json!({}));
        if !lc.is_object() {
            *lc = serde_json::json!({});
        }
        let Some(lc) = lc.as_object_mut() else {
            return Err(WriteError::BadRequest(format!("{k} has a bad lifecycle")));
        };
        lc.insert("stage".into(), change.stage.as_str().into());
        match change.stage {
            Stage::Draft | Stage::Published => {
                for f in ["deprecatedAt", "sunset", "link"] {
                    lc.remove(f);
                }
            }
            Stage::Deprecated | Stage::Offline => {
                if !lc.contains_key("deprecatedAt") {
                    let now = jiff::Timestamp::now()
                        .round(jiff::Unit::Second)
                        .unwrap_or_else(|_| jiff::Timestamp::now());
                    lc.insert("deprecatedAt".into(), now.to_string().into());
                }
                if let Some(t) = change.sunset {
                    lc.insert("sunset".into(), t.into());
                }
                if let Some(l) = change.link {
                    lc.insert("link".into(), l.into());
                }
            }
        }
        let text = write_text(&k, &doc)?;
        let w = Write {
            files: vec![store_source(&k, &text)],
            dry_run,
            ..Write::default()
        };
        self.write(meta, w).await
    }

    /// Make the config (or one resource, `only`) what it was at revision `to`, as a
    /// new revision.
    pub async fn rollback(
        &self,
        meta: Meta,
        to: u64,
        only: Option<Key>,
        dry_run: bool,
    ) -> Result<Written, WriteError> {
        let then = self.store.load(Some(to)).await?;
        self.apply(meta, dry_run, |current| {
            let keys: Vec<&Key> = match &only {
                Some(k) => {
                    if !then.resources.contains_key(k) && !current.resources.contains_key(k) {
                        return Err(WriteError::NotFound(k.clone()));
                    }
                    vec![k]
                }
                None => then
                    .resources
                    .keys()
                    .chain(current.resources.keys())
                    .collect(),
            };
            let changes = keys
                .into_iter()
                .map(|k| (k.clone(), then.resources.get(k).map(|s| s.text.clone())))
                .collect();
            Ok((changes, Vec::new()))
        })
        .await
    }

    /// Validate and commit the changes `plan` makes to the newest config. `plan`
    /// returns the changes and the files the written texts came from (their
    /// diagnostics then name the user's file and line); texts without a file are
    /// compiled as `store:Kind/name`.
    async fn apply(
        &self,
        meta: Meta,
        dry_run: bool,
        plan: impl Fn(&Config) -> Result<(BTreeMap<Key, Option<String>>, Vec<Source>), WriteError>,
    ) -> Result<Written, WriteError> {
        let _one_writer = self.write.lock().await;
        for _ in 0..CONFLICT_RETRIES {
            let current = self.store.load(None).await?;
            let (changes, files) = plan(&current)?;
            // The resulting config as stored texts (`store:Kind/name`).
            let kept: Vec<Source> = current
                .resources
                .iter()
                .filter(|(k, _)| !changes.contains_key(*k))
                .map(|(k, s)| store_source(k, &s.text))
                .collect();
            let as_stored = |mut kept: Vec<Source>| {
                kept.extend(
                    changes
                        .iter()
                        .filter_map(|(k, t)| t.as_ref().map(|t| store_source(k, t))),
                );
                kept
            };
            // Compiled with the user's files instead, where given, so that
            // diagnostics name them; the stored texts are then parsed after the
            // commit, so that the next write finds them parsed.
            let (sources, warm_later) = if files.is_empty() {
                (as_stored(kept), None)
            } else {
                let stored = as_stored(kept.clone());
                let mut named = kept;
                named.extend(files);
                (named, Some(stored))
            };
            // Compiling a big config takes a while: off the async workers, which
            // serve the push streams meanwhile.
            let cache = self.parsed.clone();
            let diags = tokio::task::spawn_blocking(move || {
                meshgate_config::compile_cached(&sources, Some(&cache)).1
            })
            .await
            .map_err(|e| StoreError::Backend(format!("the compile task failed: {e}")))?;
            if !diags.is_empty() {
                return Err(WriteError::Invalid(diags));
            }
            // Writes that leave a resource as it was (formatting aside) are left out.
            let changes: Vec<crate::store::Change> = changes
                .into_iter()
                .filter(|(k, t)| {
                    !same(
                        current.resources.get(k).map(|s| s.text.as_str()),
                        t.as_deref(),
                    )
                })
                .map(|(key, text)| crate::store::Change { key, text })
                .collect();
            let commit = NewCommit {
                author: meta.author.clone(),
                message: meta.message.clone(),
                time: jiff::Timestamp::now().as_second(),
                changes,
            };
            if dry_run || commit.changes.is_empty() {
                return Ok(Written {
                    revision: current.revision,
                    changes: commit.summary(current.revision).changes,
                    dry_run,
                });
            }
            let summary = commit.summary(current.revision + 1).changes;
            match self.store.commit(current.revision, commit).await {
                Ok(revision) => {
                    crate::store::raise(&self.revision, revision);
                    if let Some(stored) = warm_later {
                        self.warm(stored);
                    }
                    tracing::info!(revision, author = %meta.author, message = %meta.message, "config written");
                    return Ok(Written {
                        revision,
                        changes: summary,
                        dry_run,
                    });
                }
                Err(StoreError::Conflict(newer)) => {
                    tracing::debug!(newer, "another control plane wrote first; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(WriteError::Store(StoreError::Backend(
            "the store kept moving under this write; try again".into(),
        )))
    }

    /// Parse `sources` into the cache, off the request path.
    fn warm(&self, sources: Vec<Source>) {
        let cache = self.parsed.clone();
        tokio::task::spawn_blocking(move || {
            meshgate_config::compile_cached(&sources, Some(&cache));
        });
    }

    pub async fn history(
        &self,
        only: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Commit>, WriteError> {
        Ok(self.store.history(only, limit).await?)
    }

    /// What differs between revisions `from` and `to` (newest: None), for every
    /// resource or one.
    pub async fn diff(
        &self,
        from: u64,
        to: Option<u64>,
        only: Option<&str>,
    ) -> Result<Vec<Difference>, WriteError> {
        let a = self.store.load(Some(from)).await?;
        let b = self.store.load(to).await?;
        let mut keys: Vec<&Key> = a.resources.keys().chain(b.resources.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            if only.is_some_and(|o| o != k) {
                continue;
            }
            let before = a.resources.get(k).map_or("", |s| &s.text);
            let after = b.resources.get(k).map_or("", |s| &s.text);
            if before == after {
                continue;
            }
            let change = match (a.resources.contains_key(k), b.resources.contains_key(k)) {
                (false, _) => "added",
                (_, false) => "removed",
                _ => "changed",
            };
            let diff = similar::TextDiff::from_lines(before, after)
                .unified_diff()
                .header(
                    &format!("{k}@{}", a.revision),
                    &format!("{k}@{}", b.revision),
                )
                .to_string();
            out.push(Difference {
                key: k.clone(),
                change,
                diff,
            });
        }
        Ok(out)
    }
}

/// Whether two texts of a resource hold the same YAML, formatting and comments aside.
/// A stored resource's text as JSON, to edit it.
pub(crate) fn read_text(k: &str, text: &str) -> Result<serde_json::Value, WriteError> {
    serde_saphyr::from_str(text)
        .map_err(|e| WriteError::BadRequest(format!("{k} does not read back: {e}")))
}

/// An edited resource back to YAML text (comments are lost).
pub(crate) fn write_text(k: &str, value: &serde_json::Value) -> Result<String, WriteError> {
    serde_saphyr::to_string(value)
        .map_err(|e| WriteError::BadRequest(format!("cannot write {k}: {e}")))
}

fn same(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            a == b || {
                let value = |t| serde_saphyr::from_str::<serde_json::Value>(t).ok();
                value(a).is_some_and(|v| Some(v) == value(b))
            }
        }
        (None, None) => true,
        _ => false,
    }
}

fn lines(diags: &[Diagnostic]) -> String {
    diags.iter().map(|d| format!("\n  {d}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    const GATEWAY: &str = "apiVersion: meshgate.io/v1\nkind: Gateway\nmetadata: {name: public}\nspec:\n  listeners: [{name: web, address: \"127.0.0.1:8080\"}]\n---\n";
    const SERVICE: &str = "apiVersion: meshgate.io/v1\nkind: Service\nmetadata: {name: users}\nspec:\n  endpoints: [{address: \"127.0.0.1:9001\"}]\n";

    fn api(path: &str, service: &str) -> String {
        format!(
            "apiVersion: meshgate.io/v1\nkind: Api\nmetadata: {{name: get-user}}\nspec:\n  request: {{path: \"{path}\"}}\n  invoke: {{service: {service}}}\n"
        )
    }

    fn file(name: &str, text: &str) -> Write {
        Write {
            files: vec![Source {
                file: name.into(),
                text: text.into(),
            }],
            ..Write::default()
        }
    }

    fn who(message: &str) -> Meta {
        Meta {
            author: "ana".into(),
            message: message.into(),
        }
    }

    #[tokio::test]
    async fn writes_are_compiled_whole_and_roll_back_as_new_revisions() {
        let store = Embedded::in_memory().unwrap_or_else(|e| panic!("{e}"));
        let plane = Plane::new(store).await.unwrap_or_else(|e| panic!("{e}"));
        let both = format!("{GATEWAY}{SERVICE}---\n{}", api("/users/{id}", "users"));
        let w = plane
            .write(who("first"), file("users.yaml", &both))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((w.revision, w.changes.len()), (1, 3));

        // Valid alone, invalid with the rest: the Service it names does not exist.
        let Err(WriteError::Invalid(diags)) = plane
            .write(who("bad"), file("api.yaml", &api("/u", "nope")))
            .await
        else {
            panic!("a dangling Service must be refused");
        };
        let text: Vec<String> = diags.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|d| d.starts_with("api.yaml:6: Api/get-user: spec.invoke.service")),
            "{text:?}"
        );
        assert_eq!(plane.revision().await.ok(), Some(1), "nothing was written");

        // Deleting a Service an Api still uses is refused the same way.
        let Err(WriteError::Invalid(_)) = plane
            .write(
                who("drop"),
                Write {
                    deletes: vec!["Service/users".into()],
                    ..Write::default()
                },
            )
            .await
        else {
            panic!("deleting a used Service must be refused");
        };

        // A dry run validates and writes nothing; a real one moves the revision.
        let dry = Write {
            dry_run: true,
            ..file("api.yaml", &api("/v2/users/{id}", "users"))
        };
        let w = plane
            .write(who("dry"), dry)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((w.revision, w.dry_run), (1, true));
        let w = plane
            .write(who("v2"), file("api.yaml", &api("/v2/users/{id}", "users")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.revision, 2);
        let diff = plane
            .diff(1, None, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(diff.len(), 1);
        assert!(
            diff[0].diff.contains("-  request: {path: \"/users/{id}\"}"),
            "{}",
            diff[0].diff
        );
        assert!(
            diff[0]
                .diff
                .contains("+  request: {path: \"/v2/users/{id}\"}")
        );

        // Rolling the Api back to revision 1 is revision 3, with revision 1's text.
        let w = plane
            .rollback(who("undo"), 1, Some("Api/get-user".into()), false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.revision, 3);
        let (_, items) = plane
            .get(Kind::Api, Some("get-user"), None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(items[0].json["spec"]["request"]["path"], "/users/{id}");
        assert_eq!(items[0].revision, 3);
        let h = plane
            .history(Some("Api/get-user"), 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            h.iter().map(|c| c.message.as_str()).collect::<Vec<_>>(),
            ["undo", "v2", "first"]
        );
        // Rolling everything back to revision 0 empties the config: valid (a mesh
        // needs no Gateway; edge proxies refuse it and keep serving), and a dry run
        // shows every delete.
        let w = plane
            .rollback(who("all"), 0, None, true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let deleted: Vec<&str> = w.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(deleted, ["Api/get-user", "Gateway/public", "Service/users"]);
        assert!(w.dry_run);
    }
}
