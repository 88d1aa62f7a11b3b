//! The proxy's side of the push stream: hold a stream to the control plane, keep
//! the resources it sends, hand each revision to the proxy to apply, answer ACK or
//! NACK, keep the last good config in a cache directory, and reconnect with
//! jittered backoff when the stream breaks. What "apply" means (compile, swap the
//! config in) is the caller's: this module knows nothing of the data plane.

use crate::push::{HEARTBEAT, pb};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// The largest message a proxy takes from the control plane (a snapshot of the
/// whole config).
const MAX_MESSAGE: usize = 1 << 30;
/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The cache file's name in the cache directory.
const CACHE_FILE: &str = "config.json";

/// Who this proxy is, as told to the control plane.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub role: String,
    pub gateway: String,
    /// A sidecar's own instance, registered while the agent keeps in touch.
    pub instance: Option<Registration>,
}

/// An instance to register: the service, where other proxies reach it, and the
/// lease's TTL (the agent then says something at least every third of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub service: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    pub lease: Duration,
}

/// A registered instance as the control plane lists it: what balancing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub address: String,
    pub labels: BTreeMap<String, String>,
}

/// Takes each service's instances as the control plane pushes them: the service
/// and its whole list (empty: none left).
#[derive(Clone)]
pub struct OnEndpoints(std::sync::Arc<TakeList>);

type TakeList = dyn Fn(&str, Vec<Registered>) + Send + Sync;

impl OnEndpoints {
    pub fn new(f: impl Fn(&str, Vec<Registered>) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    fn take(&self, e: pb::Endpoints) {
        for s in e.services {
            let list = s
                .instances
                .into_iter()
                .map(|i| Registered {
                    address: i.address,
                    labels: i.labels.into_iter().collect(),
                })
                .collect();
            (self.0)(&s.service, list);
        }
    }
}

/// The proxy's mesh certificate: its private key (PKCS#8 DER, made by the agent
/// and never sent), the chain the control plane signed, and the mesh's roots.
#[derive(Clone)]
pub struct MeshCertificate {
    pub key: Vec<u8>,
    pub chain: Vec<Vec<u8>>,
    pub roots: Vec<Vec<u8>>,
    pub spiffe_id: String,
    pub not_after: std::time::SystemTime,
}

impl std::fmt::Debug for MeshCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCertificate")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Takes each mesh certificate the control plane signs for the proxy.
#[derive(Clone)]
pub struct OnCertificate(std::sync::Arc<dyn Fn(MeshCertificate) + Send + Sync>);

impl OnCertificate {
    pub fn new(f: impl Fn(MeshCertificate) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for OnCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCertificate")
    }
}

/// A new key and its signing request (DER).
struct Pending {
    key: rcgen::KeyPair,
    csr: Vec<u8>,
}

impl Pending {
    fn new() -> Result<Self, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        let csr = p.serialize_request(&key).map_err(|e| e.to_string())?;
        Ok(Self {
            csr: csr.der().to_vec(),
            key,
        })
    }
}

/// When to ask for the next certificate: half-way through this one's life (at
/// least a second from now).
fn renew_at(not_after: std::time::SystemTime) -> tokio::time::Instant {
    let left = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + (left / 2).max(Duration::from_secs(1))
}

impl std::fmt::Debug for OnEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnEndpoints")
    }
}

/// A whole config as received: the store it came from, its revision and every
/// resource's text by `Kind/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub store_id: String,
    pub revision: u64,
    pub resources: BTreeMap<String, String>,
}

impl Held {
    /// The config cached in `dir`, if there is one that reads.
    pub fn load(dir: &Path) -> Result<Option<Held>, String> {
        let path = dir.join(CACHE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write this config to `dir`, atomically: a crash leaves the old file or the
    /// new one, never half of one.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        use std::io::Write as _;
        let fail = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(fail)?;
        let tmp = dir.join(format!("{CACHE_FILE}.tmp"));
        let bytes = serde_json::to_vec(self).map_err(|e| e.to_string())?;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, dir.join(CACHE_FILE)).map_err(fail)
    }

    fn take(&mut self, msg: pb::ControlMessage) -> Result<(), String> {
        match msg.message {
            Some(pb::control_message::Message::Snapshot(s)) => {
                *self = Held {
                    store_id: s.store_id,
                    revision: s.revision,
                    resources: s.resources.into_iter().map(|r| (r.key, r.text)).collect(),
                };
                Ok(())
            }
            Some(pb::control_message::Message::Delta(d)) => {
                if d.base != self.revision {
                    return Err(format!(
                        "a delta from revision {} arrived while revision {} is held",
                        d.base, self.revision
                    ));
                }
                for k in d.removals {
                    self.resources.remove(&k);
                }
                self.resources
                    .extend(d.upserts.into_iter().map(|r| (r.key, r.text)));
                self.revision = d.revision;
                Ok(())
            }
            Some(
                pb::control_message::Message::Endpoints(_)
                | pb::control_message::Message::Certificate(_),
            ) => Err("registry endpoints and certificates are not config".into()),
            None => Err("an empty message from the control plane".into()),
        }
    }
}

/// Where the control plane is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The control planes, `http://HOST:PORT`, comma-separated: the agent moves to
    /// the next one when a stream fails.
    pub url: String,
    pub token: String,
    pub identity: Identity,
    /// Where the last good config is kept (none: not kept).
    pub cache_dir: Option<PathBuf>,
    /// The CA certificates (PEM) an `https://` control plane is verified with.
    pub ca: Option<Vec<u8>>,
    /// Reads the answer counts of the grey releases served, sent every
    /// [`REPORT_EVERY`] while there are any.
    pub report: Option<Reporter>,
    /// Where the registry's instances go (none: the proxy has no use for them).
    pub endpoints: Option<OnEndpoints>,
    /// Becomes true when the proxy stops: the agent deregisters its instance and
    /// registers it no more.
    pub leaving: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where mesh certificates go (none: the proxy asks for none).
    pub certificate: Option<OnCertificate>,
}

/// How often a proxy serving grey releases reports their answer counts.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// One grey release's answers as a proxy counts them: (release, answers, 5xx
/// answers) since the proxy began to serve it.
pub type ReleaseCount = (std::sync::Arc<str>, u64, u64);

/// The proxy's reading of its grey releases' answers.
#[derive(Clone)]
pub struct Reporter(std::sync::Arc<dyn Fn() -> Vec<ReleaseCount> + Send + Sync>);

impl Reporter {
    pub fn new(read: impl Fn() -> Vec<ReleaseCount> + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(read))
    }

    /// The report to send, if any release is served.
    fn message(&self) -> Option<pb::NodeMessage> {
        let apis: Vec<pb::ApiCount> = (self.0)()
            .into_iter()
            .map(|(api, requests, errors)| pb::ApiCount {
                api: api.to_string(),
                requests,
                errors,
            })
            .collect();
        (!apis.is_empty()).then(|| message(pb::node_message::Message::Report(pb::Report { apis })))
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

/// How a session with the control plane ended.
enum Ended {
    /// After at least one message: reconnect soon.
    Served(String),
    /// Before any: back off.
    Failed(String),
}

impl Agent {
    /// Follow the control plane for ever, starting from `good` (the config the
    /// proxy serves now, if any). Every revision received is handed to `apply`,
    /// whose `Err` lines are sent back as the NACK's reasons.
    pub async fn run<F, Fut>(self, mut good: Held, mut apply: F)
    where
        F: FnMut(Held) -> Fut,
        Fut: Future<Output = Result<(), Vec<String>>>,
    {
        let urls: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let mut backoff = MIN_BACKOFF;
        for url in urls.iter().cycle() {
            match self.session(url, &mut good, &mut apply).await {
                Ended::Served(why) => {
                    tracing::warn!(control = %url, reason = %why, revision = good.revision, "control plane stream ended; serving the last good config");
                    backoff = MIN_BACKOFF;
                }
                Ended::Failed(why) => {
                    tracing::warn!(control = %url, reason = %why, revision = good.revision, retry_in = ?backoff, "control plane unreachable; serving the last good config");
                }
            }
            // Full jitter keeps a fleet of proxies from reconnecting in step.
            let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session<F, Fut>(&self, url: &str, good: &mut Held, apply: &mut F) -> Ended
    where
        F: FnMut(Held) -> Fut,
        Fut: Future<Output = Result<(), Vec<String>>>,
    {
        // A new key for every stream: its request rides in the hello.
        let mut pending = match self.certificate.as_ref().map(|_| Pending::new()) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Ended::Failed(format!("cannot make a mesh key: {e}")),
            None => None,
        };
        let csr = pending.as_ref().map(|p| p.csr.clone()).unwrap_or_default();
        let (tx, mut inbound) = match self.open(url, good, csr).await {
            Ok(s) => s,
            Err(e) => return Ended::Failed(e),
        };
        let mut renew: Option<tokio::time::Instant> = None;
        let mut held = good.clone();
        let mut parts = None;
        let mut beat = tokio::time::interval(self.heartbeat());
        beat.reset();
        let mut leaving = self.leaving.clone();
        // Told already when the stream opened: the hello registered nothing.
        let mut left = self.left();
        let mut report = tokio::time::interval(REPORT_EVERY);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                _ = beat.tick() => {
                    let _ = tx.send(message(pb::node_message::Message::Heartbeat(pb::Heartbeat {}))).await;
                    continue;
                }
                _ = async { if let Some(l) = leaving.as_mut() { let _ = l.wait_for(|l| *l).await; } }, if !left && leaving.is_some() => {
                    left = true;
                    tracing::info!("deregistering this instance");
                    let _ = tx.send(message(pb::node_message::Message::Deregister(pb::Deregister {}))).await;
                    continue;
                }
                _ = tokio::time::sleep_until(renew.unwrap_or_else(tokio::time::Instant::now)), if renew.is_some() => {
                    renew = None;
                    match Pending::new() {
                        Ok(p) => {
                            let csr = p.csr.clone();
                            pending = Some(p);
                            tracing::debug!("asking for a new mesh certificate");
                            let _ = tx.send(message(pb::node_message::Message::CertificateRequest(pb::CertificateRequest { csr }))).await;
                        }
                        Err(e) => tracing::error!(error = %e, "cannot make a mesh key; keeping the certificate held"),
                    }
                    continue;
                }
                _ = report.tick(), if self.report.is_some() => {
                    if let Some(m) = self.report.as_ref().and_then(Reporter::message) {
                        let _ = tx.send(m).await;
                    }
                    continue;
                }
                m = inbound.message() => m,
            };
            let msg = match msg {
                Ok(Some(m)) => m,
                Ok(None) => return Ended::Served("the control plane closed the stream".into()),
                Err(s) => return Ended::Served(status_text(&s)),
            };
            let msg = match assemble(&mut parts, msg) {
                Ok(Some(pb::ControlMessage {
                    message: Some(pb::control_message::Message::Endpoints(e)),
                })) => {
                    if let Some(on) = &self.endpoints {
                        on.take(e);
                    }
                    continue;
                }
                Ok(Some(pb::ControlMessage {
                    message: Some(pb::control_message::Message::Certificate(c)),
                })) => {
                    match (pending.take(), &self.certificate) {
                        (Some(p), Some(on)) => {
                            let not_after = std::time::SystemTime::UNIX_EPOCH
                                + Duration::from_secs(c.not_after.max(0) as u64);
                            tracing::info!(spiffe_id = %c.spiffe_id, ?not_after, "mesh certificate received");
                            renew = Some(renew_at(not_after));
                            (on.0)(MeshCertificate {
                                key: p.key.serialize_der(),
                                chain: c.chain,
                                roots: c.roots,
                                spiffe_id: c.spiffe_id,
                                not_after,
                            });
                        }
                        _ => tracing::warn!("a mesh certificate came unasked; ignored"),
                    }
                    continue;
                }
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return Ended::Served(e),
            };
            if let Err(e) = held.take(msg) {
                return Ended::Served(e);
            }
            let revision = held.revision;
            let reply = match apply(held.clone()).await {
                Ok(()) => {
                    *good = held.clone();
                    if let Some(dir) = &self.cache_dir {
                        let (copy, dir) = (held.clone(), dir.clone());
                        let saved = tokio::task::spawn_blocking(move || copy.save(&dir)).await;
                        if let Ok(Err(e)) = saved {
                            tracing::error!(error = %e, "cannot cache the config");
                        }
                    }
                    pb::node_message::Message::Ack(pb::Ack { revision })
                }
                Err(errors) => pb::node_message::Message::Nack(pb::Nack { revision, errors }),
            };
            if tx.send(message(reply)).await.is_err() {
                return Ended::Served("the stream closed".into());
            }
        }
    }

    /// How often to say something when there is nothing to say: often enough to
    /// keep a registered instance's lease.
    fn heartbeat(&self) -> Duration {
        match &self.identity.instance {
            Some(r) => HEARTBEAT.min(r.lease / 3).max(Duration::from_millis(100)),
            None => HEARTBEAT,
        }
    }

    /// Whether the proxy is stopping (its instance is to be registered no more).
    fn left(&self) -> bool {
        self.leaving.as_ref().is_some_and(|l| *l.borrow())
    }

    /// Connect, say hello, and return the two halves of the stream.
    async fn open(
        &self,
        url: &str,
        good: &Held,
        csr: Vec<u8>,
    ) -> Result<
        (
            mpsc::Sender<pb::NodeMessage>,
            tonic::Streaming<pb::ControlMessage>,
        ),
        String,
    > {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad control plane URL {url}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(HEARTBEAT)
            .keep_alive_timeout(CONNECT_TIMEOUT);
        if url.starts_with("https://") {
            let ca = self
                .ca
                .as_deref()
                .ok_or("an https control plane needs a CA")?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).map_err(|e| error_chain(&e))?;
        }
        let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
        // A snapshot holds the whole config: far above tonic's 4 MiB default.
        let mut client =
            pb::push_client::PushClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel(16);
        let id = &self.identity;
        let hello = pb::Hello {
            node: id.node.clone(),
            labels: id.labels.clone().into_iter().collect(),
            role: id.role.clone(),
            gateway: id.gateway.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            store_id: good.store_id.clone(),
            revision: good.revision,
            instance: id
                .instance
                .as_ref()
                .filter(|_| !self.left())
                .map(|r| pb::Instance {
                    service: r.service.clone(),
                    address: r.address.clone(),
                    labels: r.labels.clone().into_iter().collect(),
                    zone: r.zone.clone(),
                    node: id.node.clone(),
                }),
            lease_seconds: id
                .instance
                .as_ref()
                .map_or(0, |r| r.lease.as_secs().max(1) as u32),
            csr,
        };
        let _ = tx
            .send(message(pb::node_message::Message::Hello(hello)))
            .await;
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| "the node token holds characters a header cannot".to_string())?;
        request.metadata_mut().insert("authorization", bearer);
        let inbound = client
            .stream(request)
            .await
            .map_err(|s| status_text(&s))?
            .into_inner();
        Ok((tx, inbound))
    }
}

/// Gather the parts of a snapshot: `None` until the last part is in, then the
/// whole snapshot. Other messages pass through.
fn assemble(
    parts: &mut Option<pb::Snapshot>,
    msg: pb::ControlMessage,
) -> Result<Option<pb::ControlMessage>, String> {
    use pb::control_message::Message;
    let Some(Message::Snapshot(mut s)) = msg.message else {
        if parts.is_some() {
            return Err("a snapshot's parts were cut short".into());
        }
        return Ok(Some(msg));
    };
    if let Some(mut whole) = parts.take() {
        if (&whole.store_id, whole.revision) != (&s.store_id, s.revision) {
            return Err(format!(
                "a part of revision {} arrived amid the parts of revision {}",
                s.revision, whole.revision
            ));
        }
        whole.resources.append(&mut s.resources);
        whole.more = s.more;
        s = whole;
    }
    if s.more {
        *parts = Some(s);
        return Ok(None);
    }
    Ok(Some(pb::ControlMessage {
        message: Some(Message::Snapshot(s)),
    }))
}

fn message(m: pb::node_message::Message) -> pb::NodeMessage {
    pb::NodeMessage { message: Some(m) }
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// An error and its causes on one line (tonic's transport errors hide the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(key: &str, text: &str) -> pb::Resource {
        pb::Resource {
            key: key.into(),
            text: text.into(),
        }
    }

    #[test]
    fn snapshots_replace_and_deltas_apply_only_on_their_base() {
        use pb::control_message::Message;
        let mut held = Held::default();
        let snap = pb::Snapshot {
            store_id: "s1".into(),
            revision: 3,
            resources: vec![resource("Api/a", "a"), resource("Api/b", "b")],
            more: false,
        };
        let ok = held.take(pb::ControlMessage {
            message: Some(Message::Snapshot(snap)),
        });
        assert_eq!((ok, held.revision, held.resources.len()), (Ok(()), 3, 2));
        let delta = |base| pb::ControlMessage {
            message: Some(Message::Delta(pb::Delta {
                base,
                revision: 4,
                upserts: vec![resource("Api/a", "a2")],
                removals: vec!["Api/b".into()],
            })),
        };
        assert!(held.take(delta(2)).is_err(), "a delta on another base");
        assert_eq!(held.take(delta(3)), Ok(()));
        assert_eq!(held.revision, 4);
        assert_eq!(
            held.resources.into_iter().collect::<Vec<_>>(),
            [("Api/a".to_string(), "a2".to_string())]
        );
    }

    #[test]
    fn snapshot_parts_are_gathered_before_use() {
        use pb::control_message::Message;
        let part = |revision, keys: &[&str], more| pb::ControlMessage {
            message: Some(Message::Snapshot(pb::Snapshot {
                store_id: "s1".into(),
                revision,
                resources: keys.iter().map(|k| resource(k, "x")).collect(),
                more,
            })),
        };
        let mut parts = None;
        assert_eq!(assemble(&mut parts, part(5, &["Api/a"], true)), Ok(None));
        assert_eq!(assemble(&mut parts, part(5, &["Api/b"], true)), Ok(None));
        let whole = assemble(&mut parts, part(5, &["Api/c"], false));
        let Ok(Some(pb::ControlMessage {
            message: Some(Message::Snapshot(s)),
        })) = whole
        else {
            panic!("no whole snapshot: {whole:?}");
        };
        let keys: Vec<&str> = s.resources.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            (s.revision, s.more, keys),
            (5, false, vec!["Api/a", "Api/b", "Api/c"])
        );
        assert!(parts.is_none());
        // A part of another revision, or a delta, amid the parts is a broken stream.
        assert_eq!(assemble(&mut parts, part(5, &["Api/a"], true)), Ok(None));
        assert!(assemble(&mut parts, part(6, &["Api/a"], false)).is_err());
        assert_eq!(assemble(&mut parts, part(7, &["Api/a"], true)), Ok(None));
        let delta = pb::ControlMessage {
            message: Some(Message::Delta(pb::Delta::default())),
        };
        assert!(assemble(&mut parts, delta).is_err());
    }

    #[test]
    fn the_cache_round_trips_and_a_missing_one_is_none() {
        let dir = std::env::temp_dir().join(format!("mg-cache-{}", std::process::id()));
        assert_eq!(Held::load(&dir), Ok(None));
        let held = Held {
            store_id: "s".into(),
            revision: 9,
            resources: [("Api/a".to_string(), "x".to_string())].into(),
        };
        assert_eq!(held.save(&dir), Ok(()));
        assert_eq!(Held::load(&dir), Ok(Some(held)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
