//! The etcd v3 store: several control planes share one state.
//!
//! Keys, under a prefix (default `/meshgate`):
//! - `id`: the store's id, made by the first control plane.
//! - `revision`: the newest revision, in decimal: the compare-and-set anchor.
//! - `commits/{revision:020}`: the commit's author, time, message and keys (JSON).
//! - `versions/{Kind}/{name}/{revision:020}`: the text written then (JSON string),
//!   or `null` for a delete. Every version is kept, so any revision reads back.
//! - `current/{Kind}/{name}`: the newest text and the revision that wrote it, so
//!   the newest config is one range read.
//! - `kept/{name}`: values kept with [`Store::keep`] (the mesh CA's root).
//! - `nodes/{name}`: a proxy's status, written by the control plane it streams
//!   from under that control plane's lease ([`NODE_TTL`]), so every control plane
//!   can list every proxy and a dead control plane's records expire.
//! - `registry/{node}`: a registered instance (`registry::Record`, JSON), written
//!   under the same lease by the control plane the sidecar streams to.
//!
//! A commit is one etcd transaction: if `revision` still holds the base, write all
//! of the above. Resource names cannot hold `/` (validation), so each key's
//! versions are a prefix of their own. Other control planes learn of a commit by
//! watching `revision`.

use crate::store::{Commit, Config, NewCommit, Store, StoreError, Stored};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Most operations one transaction carries (etcd's `--max-txn-ops` is 128 by default).
const OPS_PER_TXN: usize = 100;
/// Seconds a node's record outlives the control plane that wrote it.
pub const NODE_TTL: i64 = 30;

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: Arc<str>,
    id: Arc<str>,
    /// This control plane's lease for its nodes' records, once granted.
    lease: Arc<tokio::sync::Mutex<Option<HeldLease>>>,
    /// The registry records last written, and the lease they were written under.
    instances: Arc<tokio::sync::Mutex<Written>>,
}

/// A lease and the task keeping it alive. Dropping it stops the keep-alives, so a
/// forgotten lease lapses within [`NODE_TTL`] and takes with it the records that were
/// not written again under its successor.
#[derive(Debug)]
struct HeldLease {
    id: i64,
    keeper: tokio::task::AbortHandle,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Registry records (JSON by node) as written under a lease.
#[derive(Debug, Default)]
struct Written {
    lease: Option<i64>,
    records: BTreeMap<String, String>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .field("id", &self.id)
            .finish()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    let text = e.to_string();
    if text.contains("too many operations in txn request") {
        return StoreError::Backend(format!(
            "etcd: {text}: one write must fit one etcd transaction (2 operations per resource); raise etcd's --max-txn-ops or write in parts"
        ));
    }
    StoreError::Backend(format!("etcd: {text}"))
}

fn rev_key(rev: u64) -> String {
    format!("{rev:020}")
}

/// TLS towards etcd (`https://` endpoints): the CA that signs the members'
/// certificates, and this client's certificate and key when etcd asks for one.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Etcd {
    /// Connect to the etcd members `endpoints` (`host:port`) and keep the config
    /// under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<EtcdTls>,
    ) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        let client_cert = tls.as_ref().is_none_or(|t| t.client.is_some());
        if let Some(t) = tls {
            let mut o = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(t.ca));
            if let Some((cert, key)) = t.client {
                o = o.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(o);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| backend(format!("cannot connect to {}: {e}", endpoints.join(","))))?;
        let mut this = Self {
            client,
            prefix: prefix.trim_end_matches('/').into(),
            id: "".into(),
            lease: Arc::default(),
            instances: Arc::default(),
        };
        // The first control plane names the store; the others read its name.
        let id_key = this.key("id");
        let txn = Txn::new()
            .when([Compare::create_revision(
                id_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(id_key.clone(), crate::store::new_id(), None)]);
        // The first request is where a refused TLS handshake (say, etcd wants a
        // client certificate) shows.
        this.client.kv_client().txn(txn).await.map_err(|e| {
            backend(format!(
                "cannot use etcd at {}: {e}{}",
                endpoints.join(","),
                if client_cert { "" } else { " (if etcd checks client certificates, give one with --etcd-cert and --etcd-key)" }
            ))
        })?;
        let got = this
            .client
            .kv_client()
            .get(id_key, None)
            .await
            .map_err(backend)?;
        let id = got
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .ok_or_else(|| backend("the store's id vanished"))?;
        this.id = id.into();
        Ok(this)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    async fn newest(&self) -> Result<u64, StoreError> {
        let got = self
            .client
            .kv_client()
            .get(self.key("revision"), None)
            .await
            .map_err(backend)?;
        parse_revision(got.kvs().first().map(|kv| kv.value()))
    }

    /// The newest config, read in one transaction so the revision and the
    /// resources agree.
    async fn load_newest(&self) -> Result<Config, StoreError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.key("revision"), None),
            TxnOp::get(self.key("current/"), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.client.kv_client().txn(txn).await.map_err(backend)?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(rev), Some(current)) = (gets.next(), gets.next()) else {
            return Err(backend("a read transaction answered short"));
        };
        let mut config = Config {
            revision: parse_revision(rev.kvs().first().map(|kv| kv.value()))?,
            ..Config::default()
        };
        let skip = self.key("current/").len();
        for kv in current.kvs() {
            let k = kv.key_str().map_err(backend)?;
            let stored: Stored = serde_json::from_slice(kv.value()).map_err(backend)?;
            config.resources.insert(k[skip..].to_string(), stored);
        }
        Ok(config)
    }

    /// The config at a past revision: the newest version of each key at or before it.
    async fn load_at(&self, at: u64) -> Result<Config, StoreError> {
        let versions = self.key("versions/");
        let got = self
            .client
            .kv_client()
            .get(versions.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let mut config = Config {
            revision: at,
            ..Config::default()
        };
        // Keys sort by resource, then revision: the last one at or before `at` wins.
        for kv in got.kvs() {
            let k = kv.key_str().map_err(backend)?;
            let Some((key, rev)) = k[versions.len()..].rsplit_once('/') else {
                continue;
            };
            let rev: u64 = rev.parse().map_err(backend)?;
            if rev > at {
                continue;
            }
            let text: Option<String> = serde_json::from_slice(kv.value()).map_err(backend)?;
            match text {
                Some(text) => {
                    config.resources.insert(
                        key.to_string(),
                        Stored {
                            text,
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

    /// The commits at these revisions, in order, skipping any that are missing.
    async fn commits(&self, revs: &[u64]) -> Result<Vec<Commit>, StoreError> {
        let mut out = Vec::new();
        for chunk in revs.chunks(OPS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|r| TxnOp::get(self.key(&format!("commits/{}", rev_key(*r))), None))
                .collect();
            let resp = self
                .client
                .kv_client()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(backend)?;
            for r in resp.op_responses() {
                if let TxnOpResponse::Get(g) = r
                    && let Some(kv) = g.kvs().first()
                {
                    out.push(serde_json::from_slice(kv.value()).map_err(backend)?);
                }
            }
        }
        Ok(out)
    }
}

/// Run `watch` again a second after each time it ends, until nobody listens to `tx`.
async fn keep_watching<T, W>(what: &str, tx: &watch::Sender<T>, mut watch: impl FnMut() -> W)
where
    W: std::future::Future<Output = Result<(), StoreError>>,
{
    loop {
        if let Err(e) = watch().await {
            tracing::warn!(error = %e, "lost the etcd watch on the {what}; watching again");
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn parse_revision(value: Option<&[u8]>) -> Result<u64, StoreError> {
    match value {
        None => Ok(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| backend("the revision key holds no number")),
    }
}

impl Store for Etcd {
    fn id(&self) -> &str {
        &self.id
    }

    async fn load(&self, revision: Option<u64>) -> Result<Config, StoreError> {
        let newest = self.load_newest().await?;
        match revision {
            None => Ok(newest),
            Some(at) if at == newest.revision => Ok(newest),
            Some(at) if at > newest.revision => Err(StoreError::NoRevision(at, newest.revision)),
            Some(at) => self.load_at(at).await,
        }
    }

    async fn commit(&self, base: u64, commit: NewCommit) -> Result<u64, StoreError> {
        let revision = base + 1;
        let anchor = self.key("revision");
        let unchanged = if base == 0 {
            Compare::create_revision(anchor.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(anchor.clone(), CompareOp::Equal, base.to_string())
        };
        let record = serde_json::to_string(&commit.summary(revision)).map_err(backend)?;
        let mut ops = vec![
            TxnOp::put(anchor, revision.to_string(), None),
            TxnOp::put(
                self.key(&format!("commits/{}", rev_key(revision))),
                record,
                None,
            ),
        ];
        for c in &commit.changes {
            let version = serde_json::to_string(&c.text).map_err(backend)?;
            ops.push(TxnOp::put(
                self.key(&format!("versions/{}/{}", c.key, rev_key(revision))),
                version,
                None,
            ));
            let current = self.key(&format!("current/{}", c.key));
            ops.push(match &c.text {
                Some(text) => {
                    let stored = Stored {
                        text: text.clone(),
                        revision,
                    };
                    TxnOp::put(
                        current,
                        serde_json::to_string(&stored).map_err(backend)?,
                        None,
                    )
                }
                None => TxnOp::delete(current, None),
            });
        }
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when([unchanged]).and_then(ops))
            .await
            .map_err(backend)?;
        if resp.succeeded() {
            Ok(revision)
        } else {
            Err(StoreError::Conflict(self.newest().await?))
        }
    }

    async fn keep(&self, name: &str, fresh: String) -> Result<String, StoreError> {
        let key = self.key(&format!("kept/{name}"));
        let mut kv = self.client.kv_client();
        // Put only if absent, then read whichever value won.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), fresh, None)]);
        kv.txn(txn).await.map_err(backend)?;
        let got = kv.get(key, None).await.map_err(backend)?;
        got.kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_string)
            .ok_or_else(|| backend(format!("the kept value {name:?} vanished")))
    }

    async fn history(&self, key: Option<&str>, limit: usize) -> Result<Vec<Commit>, StoreError> {
        let newest_first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(limit as i64);
        let mut kv = self.client.kv_client();
        match key {
            None => {
                let got = kv
                    .get(self.key("commits/"), Some(newest_first))
                    .await
                    .map_err(backend)?;
                got.kvs()
                    .iter()
                    .map(|kv| serde_json::from_slice(kv.value()).map_err(backend))
                    .collect()
            }
            Some(key) => {
                let got = kv
                    .get(
                        self.key(&format!("versions/{key}/")),
                        Some(newest_first.with_keys_only()),
                    )
                    .await
                    .map_err(backend)?;
                let revs: Vec<u64> = got
                    .kvs()
                    .iter()
                    .filter_map(|kv| kv.key_str().ok()?.rsplit('/').next()?.parse().ok())
                    .collect();
                self.commits(&revs).await
            }
        }
    }

    fn shares_nodes(&self) -> bool {
        true
    }

    async fn share_nodes(&self, nodes: Vec<(String, Option<String>)>) -> Result<(), StoreError> {
        let lease = self.lease().await?;
        if let Err(e) = self.put_nodes(&nodes, lease).await {
            // The lease may have expired under us: take a new one, once.
            forget_lease(&self.lease, lease).await;
            tracing::debug!(error = %e, "writing node records failed; retrying on a new lease");
            let lease = self.lease().await?;
            self.put_nodes(&nodes, lease).await?;
        }
        Ok(())
    }

    async fn shared_nodes(&self) -> Result<Vec<String>, StoreError> {
        let got = self
            .client
            .kv_client()
            .get(self.key("nodes/"), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        got.kvs()
            .iter()
            .map(|kv| kv.value_str().map(str::to_string).map_err(backend))
            .collect()
    }

    async fn share_instances(&self, mine: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let lease = self.lease().await?;
        let result = self.put_instances(mine, lease).await;
        if result.is_err() {
            // The lease may have expired under us: the next call takes a new one
            // and writes every record again.
            forget_lease(&self.lease, lease).await;
        }
        result
    }

    async fn follow_instances(&self, records: watch::Sender<BTreeMap<String, String>>) {
        let (prefix, tx) = (&self.key("registry/"), &records);
        keep_watching("registry", tx, move || {
            self.follow_instances_once(prefix, tx)
        })
        .await;
    }

    async fn follow(&self, revisions: watch::Sender<u64>) {
        let (anchor, tx) = (&self.key("revision"), &revisions);
        keep_watching("revision", tx, move || self.follow_once(anchor, tx)).await;
    }
}

/// Forget `lease` if it is still the one held in `slot`, and so stop keeping it
/// alive: the next write takes a new one.
async fn forget_lease(slot: &tokio::sync::Mutex<Option<HeldLease>>, lease: i64) {
    let mut held = slot.lock().await;
    if held.as_ref().is_some_and(|h| h.id == lease) {
        *held = None;
    }
}

impl Etcd {
    /// This control plane's lease, granted on first use and kept alive until etcd
    /// stops answering; then it is forgotten and the next write takes a new one.
    async fn lease(&self) -> Result<i64, StoreError> {
        let mut held = self.lease.lock().await;
        if let Some(h) = &*held {
            return Ok(h.id);
        }
        let mut client = self.client.clone();
        let id = client
            .lease_grant(NODE_TTL, None)
            .await
            .map_err(backend)?
            .id();
        let (mut keeper, mut answers) = client.lease_keep_alive(id).await.map_err(backend)?;
        let slot = self.lease.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(NODE_TTL as u64 / 3));
            loop {
                tick.tick().await;
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match answers.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    _ => break,
                }
            }
            tracing::warn!(
                lease = id,
                "the etcd lease for node records lapsed; taking a new one"
            );
            forget_lease(&slot, id).await;
        });
        *held = Some(HeldLease {
            id,
            keeper: task.abort_handle(),
        });
        Ok(id)
    }

    async fn put_instances(
        &self,
        mine: &BTreeMap<String, String>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let mut written = self.instances.lock().await;
        if written.lease != Some(lease) {
            // A new lease: what went under the old one is gone (or going).
            *written = Written {
                lease: Some(lease),
                records: BTreeMap::new(),
            };
        }
        let key = |node: &str| self.key(&format!("registry/{node}"));
        let changed: Vec<(&String, &String)> = mine
            .iter()
            .filter(|(node, json)| written.records.get(*node) != Some(*json))
            .collect();
        let mut kv = self.client.kv_client();
        for chunk in changed.chunks(OPS_PER_TXN) {
            // Each record is written only over what was read here, and never over
            // a later claim: the proxy moved to the control plane that wrote it
            // (this one learns so from its watch and drops its lease).
            let reads: Vec<TxnOp> = chunk
                .iter()
                .map(|(node, _)| TxnOp::get(key(node), None))
                .collect();
            let read = kv.txn(Txn::new().and_then(reads)).await.map_err(backend)?;
            let mut compares = Vec::with_capacity(chunk.len());
            let mut puts = Vec::with_capacity(chunk.len());
            for ((node, json), got) in chunk.iter().zip(read.op_responses()) {
                let TxnOpResponse::Get(got) = got else {
                    return Err(backend("a read transaction answered short"));
                };
                let now = got.kvs().first();
                if now.is_some_and(|kv| {
                    crate::registry::claimed_later(&String::from_utf8_lossy(kv.value()), json)
                }) {
                    tracing::debug!(node = %node, "not writing a registry record over a later claim");
                    continue;
                }
                let k = key(node);
                compares.push(Compare::mod_revision(
                    k.as_str(),
                    CompareOp::Equal,
                    now.map_or(0, |kv| kv.mod_revision()),
                ));
                puts.push(TxnOp::put(
                    k,
                    json.as_str(),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                ));
            }
            let done = kv
                .txn(Txn::new().when(compares).and_then(puts))
                .await
                .map_err(backend)?;
            if done.succeeded() {
                let chunk = chunk.iter().map(|(n, j)| ((*n).clone(), (*j).clone()));
                written.records.extend(chunk);
            } else {
                // Left unwritten: the next call (within a second) tries again.
                tracing::debug!("registry records changed while being written");
            }
        }
        let gone: Vec<String> = written
            .records
            .keys()
            .filter(|n| !mine.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            // Only while it is still under this control plane's lease: the proxy
            // may have moved to another control plane, which wrote it since.
            let k = key(&node);
            kv.txn(
                Txn::new()
                    .when([Compare::lease(k.as_str(), CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(k.as_str(), None)]),
            )
            .await
            .map_err(backend)?;
            written.records.remove(&node);
        }
        Ok(())
    }

    /// Load every registry record, then follow them until the watch breaks.
    async fn follow_instances_once(
        &self,
        prefix: &str,
        records: &watch::Sender<BTreeMap<String, String>>,
    ) -> Result<(), StoreError> {
        let got = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let node =
            |key: &[u8]| String::from_utf8_lossy(&key[prefix.len().min(key.len())..]).into_owned();
        let mut all: BTreeMap<String, String> = got
            .kvs()
            .iter()
            .map(|kv| {
                (
                    node(kv.key()),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect();
        records.send_replace(all.clone());
        let from = got.header().map_or(0, |h| h.revision()) + 1;
        self.watch_from(prefix, WatchOptions::new().with_prefix(), from, |events| {
            for ev in events {
                let Some(kv) = ev.kv() else { continue };
                match ev.event_type() {
                    etcd_client::EventType::Put => {
                        all.insert(
                            node(kv.key()),
                            String::from_utf8_lossy(kv.value()).into_owned(),
                        );
                    }
                    etcd_client::EventType::Delete => {
                        all.remove(&node(kv.key()));
                    }
                }
            }
            records.send_replace(all.clone());
            Ok(())
        })
        .await
    }

    /// Watch `key` (with `options`) from revision `from`, passing each answer's
    /// events to `on_events`, until the watch or `on_events` fails.
    async fn watch_from(
        &self,
        key: &str,
        options: WatchOptions,
        from: i64,
        mut on_events: impl FnMut(&[etcd_client::Event]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stream = self
            .client
            .watch_client()
            .watch(key, Some(options.with_start_revision(from)))
            .await
            .map_err(backend)?;
        while let Some(resp) = stream.message().await.map_err(backend)? {
            if resp.canceled() {
                return Err(backend(format!(
                    "watch cancelled: {}",
                    resp.cancel_reason()
                )));
            }
            on_events(resp.events())?;
        }
        Ok(())
    }

    async fn put_nodes(
        &self,
        nodes: &[(String, Option<String>)],
        lease: i64,
    ) -> Result<(), StoreError> {
        for chunk in nodes.chunks(OPS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(name, status)| {
                    let k = self.key(&format!("nodes/{name}"));
                    match status {
                        Some(json) => TxnOp::put(
                            k,
                            json.as_str(),
                            Some(etcd_client::PutOptions::new().with_lease(lease)),
                        ),
                        None => TxnOp::delete(k, None),
                    }
                })
                .collect();
            self.client
                .kv_client()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(backend)?;
        }
        Ok(())
    }

    /// Catch up on the newest revision, then follow it until the watch breaks.
    async fn follow_once(
        &self,
        anchor: &str,
        revisions: &watch::Sender<u64>,
    ) -> Result<(), StoreError> {
        let got = self
            .client
            .kv_client()
            .get(anchor, None)
            .await
            .map_err(backend)?;
        let seen = |rev: u64| crate::store::raise(revisions, rev);
        seen(parse_revision(got.kvs().first().map(|kv| kv.value()))?);
        let from = got.header().map_or(0, |h| h.revision()) + 1;
        self.watch_from(anchor, WatchOptions::new(), from, |events| {
            for ev in events {
                if let Some(kv) = ev.kv() {
                    seen(parse_revision(Some(kv.value()))?);
                }
            }
            Ok(())
        })
        .await
    }
}
