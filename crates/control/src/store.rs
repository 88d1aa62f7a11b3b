//! What the control plane keeps, and the [`Store`] trait its back ends implement.
//!
//! The config is a set of resources, each kept as the YAML (or JSON) text it was
//! written in, under its key `Kind/name`. Every accepted write is one [`Commit`]: a
//! new revision, one more than the last, with its author, time, message and the
//! resources it put or deleted. Any past revision can be read back whole, which is
//! what history, diff and rollback are built on.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;

/// `Kind/name`, the key of one resource.
pub type Key = String;

pub fn key(kind: meshgate_api::Kind, name: &str) -> Key {
    format!("{}/{name}", kind.as_str())
}

/// A stored resource as a compile source, named `store:Kind/name` so diagnostics
/// say where it lives. The control plane and the proxies compile these alike.
pub fn source(key: &str, text: &str) -> meshgate_config::Source {
    meshgate_config::Source {
        file: format!("store:{key}").into(),
        text: text.to_string(),
    }
}

/// Every resource at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub revision: u64,
    pub resources: BTreeMap<Key, Stored>,
}

/// One resource's text and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub text: String,
    pub revision: u64,
}

/// One resource written or deleted by a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub key: Key,
    /// The new text; `None` deletes the resource.
    pub text: Option<String>,
}

/// A write to make: the changes and who made them, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommit {
    pub author: String,
    pub message: String,
    /// Seconds since the Unix epoch.
    pub time: i64,
    pub changes: Vec<Change>,
}

/// A write that was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub revision: u64,
    pub author: String,
    pub message: String,
    pub time: i64,
    /// The keys written (`put`) or deleted (`delete`).
    pub changes: Vec<ChangeSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSummary {
    pub key: Key,
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer committed first: reload and try again.
    #[error("the store moved on to revision {0} meanwhile")]
    Conflict(u64),
    #[error("no revision {0} (the newest is {1})")]
    NoRevision(u64, u64),
    #[error("store: {0}")]
    Backend(String),
}

/// A place that keeps the config and its history. Writes are compare-and-set on the
/// revision, so several control planes may share one store.
pub trait Store: Send + Sync + 'static {
    /// Names this store's history: two stores may both have a revision 7, and a
    /// proxy's cached revision means something only to the store it came from.
    fn id(&self) -> &str;

    /// The config at `revision`, or the newest when `None`.
    fn load(
        &self,
        revision: Option<u64>,
    ) -> impl Future<Output = Result<Config, StoreError>> + Send;

    /// Make `commit` revision `base + 1`, if the newest revision is still `base`.
    fn commit(
        &self,
        base: u64,
        commit: NewCommit,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Commits that touched `key` (every commit when `None`), newest first, at most
    /// `limit`.
    fn history(
        &self,
        key: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Commit>, StoreError>> + Send;

    /// Raise `revisions` to each newer revision that other writers commit, for as
    /// long as the channel has receivers. A store only this process writes (the
    /// embedded one) has nothing to follow.
    fn follow(
        &self,
        revisions: tokio::sync::watch::Sender<u64>,
    ) -> impl Future<Output = ()> + Send {
        let _ = revisions;
        async {}
    }

    /// Whether several control planes share this store, and so share what they
    /// know of their proxies through [`Store::share_nodes`].
    fn shares_nodes(&self) -> bool {
        false
    }

    /// Record each node's status (JSON) for the other control planes, or drop it
    /// (`None`) when it left this one. A record outlives its writer by a short
    /// lease only.
    fn share_nodes(
        &self,
        nodes: Vec<(String, Option<String>)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = nodes;
        async { Ok(()) }
    }

    /// The value kept under `name` (the mesh CA's root), keeping `fresh` first if
    /// there is none: every control plane on one store ends up with the same value.
    fn keep(
        &self,
        name: &str,
        fresh: String,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Every node's status as recorded by any control plane (JSON each).
    fn shared_nodes(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }

    /// Make the registry records this control plane holds (JSON by node) what the
    /// store keeps for it: new and changed ones written under its lease (unless the
    /// store holds a later claim on the node: see `registry::claimed_later`), gone
    /// ones deleted while they are still its own (another control plane may have
    /// written the node since). Only for a store that [`Store::shares_nodes`].
    fn share_instances(
        &self,
        mine: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = mine;
        async { Ok(()) }
    }

    /// Keep `records` equal to every control plane's registry records (JSON by
    /// node), for as long as the channel has receivers.
    fn follow_instances(
        &self,
        records: tokio::sync::watch::Sender<BTreeMap<String, String>>,
    ) -> impl Future<Output = ()> + Send {
        let _ = records;
        async {}
    }
}

/// Raise `revisions` to `rev` if it is newer; revisions never go back.
pub(crate) fn raise(revisions: &tokio::sync::watch::Sender<u64>, rev: u64) {
    revisions.send_if_modified(|r| {
        let newer = rev > *r;
        if newer {
            *r = rev;
        }
        newer
    });
}

impl NewCommit {
    pub(crate) fn summary(&self, revision: u64) -> Commit {
        Commit {
            revision,
            author: self.author.clone(),
            message: self.message.clone(),
            time: self.time,
            changes: self
                .changes
                .iter()
                .map(|c| ChangeSummary {
                    key: c.key.clone(),
                    op: if c.text.is_some() {
                        Op::Put
                    } else {
                        Op::Delete
                    },
                })
                .collect(),
        }
    }
}

/// A new store id: 128 random bits in hex.
pub(crate) fn new_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
