//! The embedded store: one redb file, no other process needed.
//!
//! Tables:
//! - `versions`: (key, revision) → the text written then, or `None` for a delete.
//!   Every version is kept, so any revision can be read back.
//! - `commits`: revision → the commit's author, time, message and keys (JSON).
//! - `meta`: `id` → the store's id, made when the file is created; `kept/NAME` →
//!   values kept with [`Store::keep`] (the mesh CA's root).
//!
//! The newest revision is the last key of `commits`. Writes run in one redb write
//! transaction each, and redb allows one writer at a time, so the compare-and-set
//! on the revision holds inside one process; a second process cannot open the file.

use crate::store::{Commit, Config, NewCommit, Store, StoreError, Stored};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const VERSIONS: TableDefinition<(&str, u64), Option<&str>> = TableDefinition::new("versions");
const COMMITS: TableDefinition<u64, &str> = TableDefinition::new("commits");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

#[derive(Debug, Clone)]
pub struct Embedded {
    db: Arc<Database>,
    id: Arc<str>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Embedded {
    /// Open (or create) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| backend(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => backend(format!(
                "{} is in use by another process (share a store between control planes with etcd)",
                path.display()
            )),
            e => backend(format!("cannot open {}: {e}", path.display())),
        })?;
        Self::init(db)
    }

    /// A store in memory only (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(backend)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, StoreError> {
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(VERSIONS).map_err(backend)?;
        tx.open_table(COMMITS).map_err(backend)?;
        let id = {
            let mut meta = tx.open_table(META).map_err(backend)?;
            let known = meta
                .get("id")
                .map_err(backend)?
                .map(|v| v.value().to_string());
            match known {
                Some(id) => id,
                None => {
                    let id = crate::store::new_id();
                    meta.insert("id", id.as_str()).map_err(backend)?;
                    id
                }
            }
        };
        tx.commit().map_err(backend)?;
        Ok(Self {
            db: Arc::new(db),
            id: id.into(),
        })
    }

    fn newest(commits: &impl ReadableTable<u64, &'static str>) -> Result<u64, StoreError> {
        Ok(commits
            .last()
            .map_err(backend)?
            .map_or(0, |(k, _)| k.value()))
    }

    fn load_now(&self, revision: Option<u64>) -> Result<Config, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let newest = Self::newest(&tx.open_table(COMMITS).map_err(backend)?)?;
        let at = revision.unwrap_or(newest);
        if at > newest {
            return Err(StoreError::NoRevision(at, newest));
        }
        let versions = tx.open_table(VERSIONS).map_err(backend)?;
        let mut config = Config {
            revision: at,
            ..Config::default()
        };
        // Versions are ordered by key, then revision: the last one at or before `at`
        // of each key wins.
        for row in versions.iter().map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            let (key, rev) = k.value();
            if rev > at {
                continue;
            }
            match v.value() {
                Some(text) => {
                    config.resources.insert(
                        key.to_string(),
                        Stored {
                            text: text.to_string(),
                            revision: rev,
                        },
                    );
                }
                None => {
                    config.resources.remove(key);
                }
            }
        }
        Ok(config)
    }

    fn commit_now(&self, base: u64, commit: &NewCommit) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let revision = {
            let mut commits = tx.open_table(COMMITS).map_err(backend)?;
            let newest = Self::newest(&commits)?;
            if newest != base {
                return Err(StoreError::Conflict(newest));
            }
            let revision = base + 1;
            let record = serde_json::to_string(&commit.summary(revision)).map_err(backend)?;
            commits.insert(revision, record.as_str()).map_err(backend)?;
            let mut versions = tx.open_table(VERSIONS).map_err(backend)?;
            for c in &commit.changes {
                versions
                    .insert((c.key.as_str(), revision), c.text.as_deref())
                    .map_err(backend)?;
            }
            revision
        };
        tx.commit().map_err(backend)?;
        Ok(revision)
    }

    fn keep_now(&self, name: &str, fresh: String) -> Result<String, StoreError> {
        let key = format!("kept/{name}");
        let tx = self.db.begin_write().map_err(backend)?;
        let value = {
            let mut meta = tx.open_table(META).map_err(backend)?;
            let known = meta
                .get(key.as_str())
                .map_err(backend)?
                .map(|v| v.value().to_string());
            match known {
                Some(v) => v,
                None => {
                    meta.insert(key.as_str(), fresh.as_str()).map_err(backend)?;
                    fresh
                }
            }
        };
        tx.commit().map_err(backend)?;
        Ok(value)
    }

    fn history_now(&self, key: Option<&str>, limit: usize) -> Result<Vec<Commit>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let commits = tx.open_table(COMMITS).map_err(backend)?;
        let read = |rev: u64| -> Result<Option<Commit>, StoreError> {
            let Some(v) = commits.get(rev).map_err(backend)? else {
                return Ok(None);
            };
            serde_json::from_str(v.value()).map(Some).map_err(backend)
        };
        let mut out = Vec::new();
        match key {
            None => {
                for row in commits.iter().map_err(backend)?.rev().take(limit) {
                    let (_, v) = row.map_err(backend)?;
                    out.push(serde_json::from_str(v.value()).map_err(backend)?);
                }
            }
            Some(key) => {
                let versions = tx.open_table(VERSIONS).map_err(backend)?;
                for row in versions
                    .range((key, 0)..=(key, u64::MAX))
                    .map_err(backend)?
                    .rev()
                    .take(limit)
                {
                    let (k, _) = row.map_err(backend)?;
                    if let Some(c) = read(k.value().1)? {
                        out.push(c);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// redb is blocking: its calls run on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(backend)?
}

impl Store for Embedded {
    fn id(&self) -> &str {
        &self.id
    }

    async fn load(&self, revision: Option<u64>) -> Result<Config, StoreError> {
        let this = self.clone();
        blocking(move || this.load_now(revision)).await
    }

    async fn commit(&self, base: u64, commit: NewCommit) -> Result<u64, StoreError> {
        let this = self.clone();
        blocking(move || this.commit_now(base, &commit)).await
    }

    async fn history(&self, key: Option<&str>, limit: usize) -> Result<Vec<Commit>, StoreError> {
        let this = self.clone();
        let key = key.map(str::to_string);
        blocking(move || this.history_now(key.as_deref(), limit)).await
    }

    async fn keep(&self, name: &str, fresh: String) -> Result<String, StoreError> {
        let (this, name) = (self.clone(), name.to_string());
        blocking(move || this.keep_now(&name, fresh)).await
    }
}
