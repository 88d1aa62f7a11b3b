//! The control plane's side of the push stream (`proto/.../push.proto`): it keeps
//! the newest config in memory as [`Published`], sends each proxy a snapshot (or a
//! delta from the revision the proxy already holds), then one delta per revision,
//! and records every proxy's acknowledgements in [`Nodes`].
//!
//! A delta between two revisions is computed once and shared by every stream that
//! held the older one; a stream that fell behind gets a delta of its own, computed
//! from the two resource maps. Whole snapshots go out only on a first connection or
//! when the proxy's config came from another store.

use crate::plane::Plane;
use crate::store::{Config, Key, Store};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("meshgate.control.v1");
}

/// How often a proxy says it is alive when it has nothing else to say.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A stream with no message from its proxy for this long is closed.
const SILENCE: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());
/// A disconnected node is listed this long, then forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Messages queued for one proxy before its stream applies back-pressure.
const QUEUE: usize = 16;
/// Whole snapshots being sent at once. A snapshot holds every resource, so when a
/// fleet (re)connects at once the rest wait their turn instead of each holding a
/// copy of the whole config in memory. A turn ends when the proxy answers.
const SNAPSHOTS_IN_FLIGHT: usize = 16;
/// Snapshots go out in parts of about this many bytes of text: the gRPC encoder
/// keeps a buffer as large as the largest message of its stream, for the life of
/// the stream, so one whole-config message would cost its size per proxy.
const SNAPSHOT_PART: usize = 64 << 10;

/// Every resource's text at one revision. Texts are shared between revisions
/// (`Arc`), so a diff of two revisions compares pointers first.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub revision: u64,
    pub resources: Arc<BTreeMap<Key, Arc<str>>>,
    /// The delta from the previous published revision, shared by every stream that
    /// held it.
    delta: Option<Arc<pb::Delta>>,
}

impl Published {
    /// `config` as published; texts equal to `share`'s are taken from it.
    fn from_config(config: &Config, share: Option<&Published>) -> Self {
        let resources: BTreeMap<Key, Arc<str>> = config
            .resources
            .iter()
            .map(|(k, s)| {
                let text = share
                    .and_then(|b| b.resources.get(k))
                    .filter(|t| ***t == *s.text)
                    .cloned()
                    .unwrap_or_else(|| Arc::from(s.text.as_str()));
                (k.clone(), text)
            })
            .collect();
        Published {
            revision: config.revision,
            resources: Arc::new(resources),
            delta: None,
        }
    }

    /// `config` as the successor of `before`, with the delta from it.
    fn after(config: &Config, before: &Published) -> Self {
        let mut p = Self::from_config(config, Some(before));
        p.delta = Some(Arc::new(delta(before, &p)));
        p
    }

    /// The whole config, in parts of about [`SNAPSHOT_PART`] bytes.
    fn snapshot(&self, store_id: &str) -> Vec<pb::ControlMessage> {
        let part = |resources, more| pb::ControlMessage {
            message: Some(pb::control_message::Message::Snapshot(pb::Snapshot {
                store_id: store_id.to_string(),
                revision: self.revision,
                resources,
                more,
            })),
        };
        let mut parts = Vec::new();
        let mut resources = Vec::new();
        let mut size = 0;
        for (k, t) in self.resources.iter() {
            size += k.len() + t.len();
            resources.push(pb::Resource {
                key: k.clone(),
                text: t.to_string(),
            });
            if size >= SNAPSHOT_PART {
                parts.push(part(std::mem::take(&mut resources), true));
                size = 0;
            }
        }
        parts.push(part(resources, false));
        parts
    }
}

/// What changed from `a` to `b`.
fn delta(a: &Published, b: &Published) -> pb::Delta {
    let upserts = b
        .resources
        .iter()
        .filter(|(k, t)| {
            a.resources
                .get(*k)
                .is_none_or(|old| !Arc::ptr_eq(old, t) && old != *t)
        })
        .map(|(k, t)| pb::Resource {
            key: k.clone(),
            text: t.to_string(),
        })
        .collect();
    let removals = a
        .resources
        .keys()
        .filter(|k| !b.resources.contains_key(*k))
        .cloned()
        .collect();
    pb::Delta {
        base: a.revision,
        revision: b.revision,
        upserts,
        removals,
    }
}

/// What the control plane knows of one proxy.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub role: String,
    pub gateway: String,
    pub version: String,
    /// The proxy's address as this control plane sees it.
    pub address: String,
    pub connected: bool,
    /// The revision the proxy runs (its last ACK), 0 before the first.
    pub revision: u64,
    /// The newest revision sent to it.
    pub sent: u64,
    #[serde(with = "rfc3339_millis")]
    pub connected_at: SystemTime,
    #[serde(with = "rfc3339_millis")]
    pub last_contact: SystemTime,
    /// The last revision the proxy rejected and why, until it accepts a newer one.
    pub last_error: Option<Rejection>,
    #[serde(skip)]
    stream: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejection {
    pub revision: u64,
    pub errors: Vec<String>,
}

/// RFC 3339 times in JSON.
pub(crate) mod rfc3339_millis {
    pub fn serialize<S: serde::Serializer>(
        t: &std::time::SystemTime,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let ts = jiff::Timestamp::from_millisecond(ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        s.collect_str(&ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }
}

/// The proxies that hold (or held) a stream to this control plane.
#[derive(Debug, Default)]
pub struct Nodes {
    by_name: Mutex<HashMap<String, NodeStatus>>,
    streams: AtomicU64,
    /// Where changed statuses go to be shared with other control planes (a
    /// shared store only): the record, or `None` once the node left.
    share: Option<mpsc::UnboundedSender<(String, Option<String>)>>,
}

impl Nodes {
    /// Every node, by name; disconnected ones are listed for an hour.
    pub fn list(&self) -> Vec<NodeStatus> {
        let now = SystemTime::now();
        let Ok(mut map) = self.by_name.lock() else {
            return Vec::new();
        };
        map.retain(|_, n| {
            n.connected
                || now
                    .duration_since(n.last_contact)
                    .is_ok_and(|d| d < FORGET_AFTER)
        });
        let mut out: Vec<NodeStatus> = map.values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn update(&self, name: &str, stream: u64, f: impl FnOnce(&mut NodeStatus)) {
        if let Ok(mut map) = self.by_name.lock()
            && let Some(n) = map.get_mut(name)
            && n.stream == stream
        {
            f(n);
            self.shared(n);
        }
    }

    fn insert(&self, n: NodeStatus) {
        self.shared(&n);
        if let Ok(mut map) = self.by_name.lock() {
            map.insert(n.name.clone(), n);
        }
    }

    fn shared(&self, n: &NodeStatus) {
        if let Some(share) = &self.share {
            let record = n
                .connected
                .then(|| serde_json::to_string(n).unwrap_or_default());
            let _ = share.send((n.name.clone(), record));
        }
    }
}

/// Write node records to the store as they change, in batches: the newest record
/// of each node since the last batch.
async fn share_nodes<S: Store>(
    plane: Arc<Plane<S>>,
    mut changes: mpsc::UnboundedReceiver<(String, Option<String>)>,
) {
    while let Some((name, record)) = changes.recv().await {
        let mut batch: BTreeMap<String, Option<String>> = BTreeMap::from([(name, record)]);
        while let Ok((name, record)) = changes.try_recv() {
            batch.insert(name, record);
        }
        if let Err(e) = plane.store().share_nodes(batch.into_iter().collect()).await {
            tracing::warn!(error = %e, "cannot share node statuses with the other control planes");
        }
    }
}

/// Write this control plane's registry instances to the shared store as they
/// change, and again each second after a failure (or a lapsed lease) until the
/// store has them.
async fn share_registry<S: Store>(
    plane: Arc<Plane<S>>,
    mut mine: watch::Receiver<BTreeMap<String, String>>,
) {
    let mut failing = false;
    loop {
        let current = mine.borrow_and_update().clone();
        match plane.store().share_instances(&current).await {
            Ok(()) if failing => {
                tracing::info!("registry instances shared with the other control planes again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot share registry instances with the other control planes; retrying");
                failing = true;
            }
            Err(_) => {}
        }
        // A write under a new lease rewrites every record, so look again each
        // second even without a change: a lapsed lease is noticed so.
        tokio::select! {
            changed = mine.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Feed the other control planes' registry records to `registry` while it lives.
async fn follow_registry<S: Store>(
    plane: Arc<Plane<S>>,
    registry: std::sync::Weak<crate::registry::Registry>,
) {
    let (tx, mut rx) = watch::channel(BTreeMap::new());
    let follow = plane.store().follow_instances(tx);
    let apply = async move {
        while rx.changed().await.is_ok() {
            let Some(r) = registry.upgrade() else { return };
            let records = rx.borrow_and_update().clone();
            r.set_remote(&records);
        }
    };
    tokio::select! {
        () = follow => {}
        () = apply => {}
    }
}

/// Follows the plane's revisions and publishes each, whole, to the streams.
pub struct Publisher<S> {
    plane: Arc<Plane<S>>,
    current: watch::Sender<Arc<Published>>,
    pub nodes: Nodes,
    /// What proxies report of the grey releases they serve.
    pub observed: crate::guard::Observed,
    /// The instances sidecars registered with this control plane.
    pub registry: Arc<crate::registry::Registry>,
    /// Signs the proxies' mesh certificates.
    pub ca: Arc<crate::ca::MeshCa>,
    token: String,
    /// Becomes true when the control plane stops: every stream then ends, so the
    /// server's graceful shutdown does not wait on them for ever.
    stopping: watch::Receiver<bool>,
    snapshots: Arc<tokio::sync::Semaphore>,
}

impl<S: Store> Publisher<S> {
    /// Load the newest config and follow the plane from there. `token` is the
    /// bearer token proxies must present.
    pub async fn start(
        plane: Arc<Plane<S>>,
        token: String,
        ca: Arc<crate::ca::MeshCa>,
        stopping: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, crate::StoreError> {
        let config = plane.store().load(None).await?;
        let first = Published::from_config(&config, None);
        let mut nodes = Nodes::default();
        if plane.store().shares_nodes() {
            let (tx, rx) = mpsc::unbounded_channel();
            nodes.share = Some(tx);
            tokio::spawn(share_nodes(plane.clone(), rx));
        }
        let this = Arc::new(Self {
            plane: plane.clone(),
            current: watch::channel(Arc::new(first)).0,
            nodes,
            observed: crate::guard::Observed::default(),
            registry: Arc::new(crate::registry::Registry::default()),
            ca,
            token,
            stopping,
            snapshots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_IN_FLIGHT)),
        });
        this.registry.sweep();
        if plane.store().shares_nodes() {
            tokio::spawn(share_registry(plane.clone(), this.registry.mine()));
            tokio::spawn(follow_registry(
                plane.clone(),
                Arc::downgrade(&this.registry),
            ));
        }
        let weak = Arc::downgrade(&this);
        let mut revisions = plane.watch();
        // A write may have landed between the load above and this subscription:
        // look once at whatever the watch holds now.
        revisions.mark_changed();
        tokio::spawn(async move {
            while revisions.changed().await.is_ok() {
                let Some(this) = weak.upgrade() else { return };
                let wanted = *revisions.borrow_and_update();
                if wanted <= this.current.borrow().revision {
                    continue;
                }
                match this.plane.store().load(None).await {
                    Ok(config) => {
                        let before = this.current.borrow().clone();
                        let next = Published::after(&config, &before);
                        tracing::debug!(revision = next.revision, "publishing");
                        this.current.send_replace(Arc::new(next));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the new revision to push it; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        revisions.mark_changed();
                    }
                }
            }
        });
        Ok(this)
    }

    /// Every node this control plane serves, and, with a shared store, those the
    /// other control planes serve: by name, a connected record before a
    /// disconnected one, then the latest contact.
    pub async fn all_nodes(&self) -> Vec<serde_json::Value> {
        let mut by_name: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        let local = self
            .nodes
            .list()
            .into_iter()
            .filter_map(|n| serde_json::to_value(n).ok());
        let shared = match self.plane.store().shared_nodes().await {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other control planes' nodes");
                Vec::new()
            }
        };
        let shared = shared.iter().filter_map(|r| serde_json::from_str(r).ok());
        for n in local.chain(shared) {
            let name = n["name"].as_str().unwrap_or_default().to_string();
            let rank = |v: &serde_json::Value| {
                (
                    v["connected"].as_bool() == Some(true),
                    v["lastContact"].as_str().unwrap_or_default().to_string(),
                )
            };
            match by_name.get(&name) {
                Some(seen) if rank(seen) >= rank(&n) => {}
                _ => {
                    by_name.insert(name, n);
                }
            }
        }
        by_name.into_values().collect()
    }

    /// The newest published config.
    pub fn current(&self) -> Arc<Published> {
        self.current.borrow().clone()
    }

    /// The gRPC service, to be served beside the admin API.
    pub fn service(self: &Arc<Self>) -> pb::push_server::PushServer<Service<S>> {
        pb::push_server::PushServer::new(Service(self.clone()))
    }

    /// What a proxy that says it holds `revision` of `store_id` is sent first, the
    /// config that brings it to, and for a snapshot, its turn among the snapshots
    /// in flight.
    async fn first(&self, hello: &pb::Hello) -> Result<First, Status> {
        use pb::control_message::Message;
        let store_id = self.plane.store().id();
        let now = self.current();
        let resumable =
            hello.store_id == store_id && hello.revision > 0 && hello.revision <= now.revision;
        if resumable {
            match self.plane.store().load(Some(hello.revision)).await {
                Ok(then) => {
                    let then = Published::from_config(&then, Some(&now));
                    let message = Some(Message::Delta(delta(&then, &now)));
                    return Ok((vec![pb::ControlMessage { message }], now, None));
                }
                Err(e) => {
                    tracing::warn!(node = %hello.node, error = %e, "cannot read the node's revision; sending a snapshot")
                }
            }
        }
        let turn = self
            .snapshots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the control plane is stopping"))?;
        // The newest config, since the wait for a turn may have been long.
        let now = self.current();
        Ok((now.snapshot(store_id), now, Some(turn)))
    }
}

/// A stream's first messages (a delta, or a snapshot's parts), the config they
/// bring the proxy to, and the snapshot turn they hold (released when the proxy
/// answers).
type First = (
    Vec<pb::ControlMessage>,
    Arc<Published>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// The push gRPC service.
pub struct Service<S>(Arc<Publisher<S>>);

type Outbound =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::push_server::Push for Service<S> {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let publisher = self.0.clone();
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !crate::bearer_is(given, &publisher.token) {
            return Err(Status::unauthenticated(
                "a valid node token is required (authorization: Bearer TOKEN)",
            ));
        }
        let address = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|a| a.0.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(SILENCE, inbound.message()).await {
            Ok(Ok(Some(pb::NodeMessage {
                message: Some(pb::node_message::Message::Hello(h)),
            }))) => h,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no hello from the node")),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be a hello",
                ));
            }
        };
        if hello.node.is_empty() {
            return Err(Status::invalid_argument("the hello names no node"));
        }
        if let Some(i) = &hello.instance {
            crate::registry::check(i).map_err(Status::invalid_argument)?;
        }
        // The identity a mesh certificate of this proxy names: its service's, or
        // an edge proxy's gateway's.
        let spiffe_id = match &hello.instance {
            Some(i) => publisher.ca.service_id(&i.service),
            None if hello.gateway.is_empty() => publisher.ca.gateway_id(&hello.node),
            None => publisher.ca.gateway_id(&hello.gateway),
        };
        let certificate = if hello.csr.is_empty() {
            None
        } else {
            Some(
                certificate(&publisher.ca, &hello.csr, &spiffe_id)
                    .map_err(Status::invalid_argument)?,
            )
        };
        let first = publisher.first(&hello).await?;
        let now = first.1.clone();
        let stream = publisher.nodes.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let t = SystemTime::now();
        let status = NodeStatus {
            name: hello.node.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            role: hello.role.clone(),
            gateway: hello.gateway.clone(),
            version: hello.version.clone(),
            address,
            connected: true,
            revision: if hello.store_id == publisher.plane.store().id() {
                hello.revision
            } else {
                0
            },
            sent: now.revision,
            connected_at: t,
            last_contact: t,
            last_error: None,
            stream,
        };
        publisher.nodes.insert(status);
        tracing::info!(node = %hello.node, revision = hello.revision, "node connected");
        if let Some(i) = hello.instance {
            let ttl = crate::registry::lease(hello.lease_seconds);
            publisher
                .registry
                .register(&hello.node, i, ttl, std::time::Instant::now());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(serve_node(
            publisher,
            Peer {
                node: hello.node,
                stream,
                spiffe_id,
            },
            certificate,
            first,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A mesh certificate for `spiffe_id` from a proxy's signing request.
fn certificate(
    ca: &crate::ca::MeshCa,
    csr: &[u8],
    spiffe_id: &str,
) -> Result<pb::ControlMessage, String> {
    let issued = ca.sign(csr, spiffe_id)?;
    tracing::info!(spiffe_id, not_after = ?issued.not_after, "mesh certificate issued");
    let not_after = issued
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(pb::ControlMessage {
        message: Some(pb::control_message::Message::Certificate(pb::Certificate {
            chain: vec![issued.cert],
            roots: vec![ca.root.clone()],
            spiffe_id: issued.spiffe_id,
            not_after,
        })),
    })
}

/// The proxy at the other end of one stream.
struct Peer {
    node: String,
    stream: u64,
    /// The identity its mesh certificates name.
    spiffe_id: String,
}

/// Push every new revision to one node and record what it says, until either side
/// goes away.
async fn serve_node<S: Store>(
    publisher: Arc<Publisher<S>>,
    Peer {
        node,
        stream,
        spiffe_id,
    }: Peer,
    issued: Option<pb::ControlMessage>,
    (first, mut held, mut turn): First,
    mut inbound: Streaming<pb::NodeMessage>,
    tx: mpsc::Sender<Result<pb::ControlMessage, Status>>,
) {
    use pb::node_message::Message;
    let mut current = publisher.current.subscribe();
    current.mark_changed();
    let nodes = &publisher.nodes;
    let mut stopping = publisher.stopping.clone();
    // The registry goes first, so that a config's Services with registry discovery
    // start with their instances.
    let mut registry = publisher.registry.subscribe();
    let mut listed = registry.borrow_and_update().clone();
    let endpoints =
        crate::registry::changes(&Default::default(), &listed).map(|e| pb::ControlMessage {
            message: Some(pb::control_message::Message::Endpoints(e)),
        });
    // The certificate goes before all: the config may need it to serve.
    for m in issued.into_iter().chain(endpoints).chain(first) {
        if !matches!(
            tokio::time::timeout(SILENCE, tx.send(Ok(m))).await,
            Ok(Ok(()))
        ) {
            tracing::info!(node = %node, "node stopped taking its first config");
            nodes.update(&node, stream, |n| n.connected = false);
            return;
        }
    }
    let why = loop {
        tokio::select! {
            _ = async { let _ = stopping.wait_for(|s| *s).await; } => break "the control plane is stopping".to_string(),
            changed = current.changed() => {
                if changed.is_err() {
                    break "the control plane is stopping".to_string();
                }
                let next = current.borrow_and_update().clone();
                if next.revision <= held.revision {
                    continue;
                }
                let d = match &next.delta {
                    Some(d) if d.base == held.revision => (**d).clone(),
                    _ => delta(&held, &next),
                };
                let msg = pb::ControlMessage { message: Some(pb::control_message::Message::Delta(d)) };
                if tx.send(Ok(msg)).await.is_err() {
                    break "the node closed the stream".to_string();
                }
                nodes.update(&node, stream, |n| n.sent = next.revision);
                held = next;
            }
            changed = registry.changed() => {
                if changed.is_err() {
                    break "the control plane is stopping".to_string();
                }
                let now = registry.borrow_and_update().clone();
                if let Some(e) = crate::registry::changes(&listed, &now) {
                    let msg = pb::ControlMessage { message: Some(pb::control_message::Message::Endpoints(e)) };
                    if tx.send(Ok(msg)).await.is_err() {
                        break "the node closed the stream".to_string();
                    }
                }
                listed = now;
            }
            msg = tokio::time::timeout(SILENCE, inbound.message()) => {
                let msg = match msg {
                    Err(_) => break format!("no message from the node for {SILENCE:?}"),
                    Ok(Err(e)) => break format!("stream error: {}", e.message()),
                    Ok(Ok(None)) => break "the node closed the stream".to_string(),
                    Ok(Ok(Some(m))) => m,
                };
                let at = SystemTime::now();
                publisher.registry.renew(&node, std::time::Instant::now());
                if matches!(msg.message, Some(Message::Ack(_) | Message::Nack(_))) {
                    // The proxy has the snapshot: the next one may go.
                    drop(turn.take());
                }
                match msg.message {
                    Some(Message::Ack(a)) => nodes.update(&node, stream, |n| {
                        n.last_contact = at;
                        n.revision = n.revision.max(a.revision);
                        if n.last_error.as_ref().is_some_and(|e| e.revision <= a.revision) {
                            n.last_error = None;
                        }
                    }),
                    Some(Message::Nack(r)) => {
                        tracing::warn!(node = %node, revision = r.revision, errors = ?r.errors, "node rejected a revision");
                        nodes.update(&node, stream, |n| {
                            n.last_contact = at;
                            n.last_error = Some(Rejection { revision: r.revision, errors: r.errors });
                        });
                    }
                    Some(Message::Deregister(_)) => {
                        publisher.registry.deregister(&node);
                        nodes.update(&node, stream, |n| n.last_contact = at);
                    }
                    Some(Message::CertificateRequest(r)) => {
                        nodes.update(&node, stream, |n| n.last_contact = at);
                        match certificate(&publisher.ca, &r.csr, &spiffe_id) {
                            Ok(m) => {
                                if tx.send(Ok(m)).await.is_err() {
                                    break "the node closed the stream".to_string();
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(Status::invalid_argument(e.clone()))).await;
                                break e;
                            }
                        }
                    }
                    Some(Message::Report(r)) => {
                        publisher.observed.record(&node, r, std::time::Instant::now());
                        nodes.update(&node, stream, |n| n.last_contact = at);
                    }
                    _ => nodes.update(&node, stream, |n| n.last_contact = at),
                }
            }
        }
    };
    tracing::info!(node = %node, reason = %why, "node disconnected");
    nodes.update(&node, stream, |n| n.connected = false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Stored;

    fn config(revision: u64, items: &[(&str, &str)]) -> Config {
        Config {
            revision,
            resources: items
                .iter()
                .map(|(k, t)| {
                    (
                        k.to_string(),
                        Stored {
                            text: t.to_string(),
                            revision,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn deltas_carry_only_what_changed() {
        let one = Published::from_config(&config(1, &[("Api/a", "a"), ("Api/b", "b")]), None);
        let two = Published::after(&config(2, &[("Api/a", "a"), ("Api/c", "c")]), &one);
        // The unchanged text is the same allocation in both revisions.
        assert!(Arc::ptr_eq(
            &one.resources["Api/a"],
            &two.resources["Api/a"]
        ));
        let d = two.delta.as_deref().cloned().unwrap_or_default();
        assert_eq!((d.base, d.revision), (1, 2));
        assert_eq!(
            d.upserts.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["Api/c"]
        );
        assert_eq!(d.removals, ["Api/b"]);
        // A stream that held revision 0 (nothing) gets everything as upserts.
        let d = delta(&Published::default(), &two);
        assert_eq!(d.upserts.len(), 2);
        assert!(d.removals.is_empty());
    }
}
