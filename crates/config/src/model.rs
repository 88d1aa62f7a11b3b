//! Validated, linked config: what the proxy runs. Immutable once built; each request
//! holds one `Arc<Snapshot>` for its whole life.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use meshgate_filter::Chain;
use meshgate_route::{RewriteTemplate, Router};
use meshgate_upstream::{HashOn, LbPolicy, RetryPolicy, Selector};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use meshgate_api::{ListenerProtocol, UpstreamProtocol};

/// Default upstream request timeout when neither the Api nor the Service sets one
/// (Envoy's route default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);

/// One compiled config. The default is the empty config: nothing is served (a
/// proxy waiting for its first config from the control plane).
#[derive(Debug, Default)]
pub struct Snapshot {
    /// A hash of the sources: equal configs have equal revisions.
    pub revision: String,
    pub gateways: Vec<Arc<Gateway>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub apis: Vec<Arc<Api>>,
    pub consumers: Arc<meshgate_filter::ConsumerSet>,
    /// The resources as JSON, for `GET /config` (inline secrets redacted).
    pub resources: Vec<serde_json::Value>,
}

impl Snapshot {
    /// Why this config cannot be served alone (`meshgate run`): a config without
    /// a Gateway is fine in a control plane, where sidecars add their own, but a
    /// gateway run from files would listen on nothing.
    pub fn nothing_listens(&self) -> Option<&'static str> {
        self.gateways
            .is_empty()
            .then_some("the config has no Gateway resource: nothing would listen")
    }

    /// Why this config needs a control plane: mesh mTLS takes certificates from
    /// its CA.
    pub fn needs_mesh_ca(&self) -> Option<String> {
        let service = self.services.values().find(|s| s.tls == UpstreamTls::Mesh);
        let listener = self
            .gateways
            .iter()
            .flat_map(|g| g.listeners.iter().map(move |l| (g, l)))
            .find(|(_, l)| l.protocol == ListenerProtocol::Mesh);
        let what = match (service, listener) {
            (Some(s), _) => format!("Service {:?} has tls.mode mesh", s.name),
            (None, Some((g, l))) => format!(
                "Gateway {:?} listener {:?} has protocol mesh",
                g.name, l.name
            ),
            (None, None) => return None,
        };
        Some(format!(
            "{what}: mesh certificates come from the control plane's CA (run meshgate control, and meshgate proxy)"
        ))
    }
}

#[derive(Debug)]
pub struct Gateway {
    pub name: String,
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    pub access_log: AccessLog,
    /// Filters from the gateway's global policies, run before every Api's filters.
    pub global: Chain,
    /// Routes to indices into [`Snapshot::apis`].
    pub router: Router<usize>,
    pub drain_timeout: Duration,
    /// Routes draft Apis too.
    pub serve_drafts: bool,
    /// Which side of a sidecar this gateway is, if it is one.
    pub side: MeshSide,
}

/// Where a gateway stands: at the edge, or as one side of a sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MeshSide {
    #[default]
    Edge,
    /// In front of the local app: requests from other proxies.
    Inbound,
    /// The app's calls to other services.
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    pub certificates: Vec<Certificate>,
    /// A `mesh` listener that also takes plaintext: a sidecar's inbound while the
    /// Mesh's mTLS mode is `permissive`.
    pub plaintext_too: bool,
}

/// `Mesh.spec.mtls.mode`: how much of the mesh mTLS covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MeshMtls {
    /// Each Service's `tls` decides.
    #[default]
    PerService,
    /// Sidecar inbounds take mTLS and plaintext, whatever their Service's `tls`
    /// says; callers go on as each Service's `tls` says. The safe step between:
    /// Services can move to `tls: {mode: mesh}` in any order.
    Permissive,
    /// Registry Services are called over mesh mTLS, and sidecar inbounds take
    /// nothing else.
    Strict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// SNI names this certificate serves (`*.example.com` allowed); empty: the default.
    pub hosts: Vec<String>,
}

/// Edge limits of a gateway's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_request_line: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// A relayed TCP connection with no byte either way for this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_request_line: 8 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 100,
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    pub host: String,
    pub port: u16,
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub endpoints: Vec<EndpointConfig>,
    pub dns: Option<DnsDiscovery>,
    /// The service name whose registered instances are the endpoints
    /// (`discovery: {registry: NAME}`), pushed by the control plane.
    pub registry: Option<String>,
    /// `discovery: {originalDestination: true}`: no endpoints of its own; each
    /// request goes to its connection's original destination.
    pub original_destination: bool,
    pub policy: LbPolicy,
    pub hash_on: Option<HashOn>,
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Every subset some Api's split uses; splits refer to them by index.
    pub selectors: Vec<Selector>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub health_check: Option<meshgate_upstream::HealthCheckConfig>,
    pub outlier: Option<meshgate_upstream::OutlierConfig>,
    /// Percent; see `LoadBalancerSpec::panic_threshold`.
    pub panic_threshold: u8,
    pub retry_budget: meshgate_upstream::BudgetConfig,
    /// How its endpoints are called.
    pub tls: UpstreamTls,
}

/// `Service.spec.tls.mode`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpstreamTls {
    #[default]
    Disable,
    /// TLS to an upstream outside the mesh, verified as a browser would.
    Simple(SimpleTls),
    /// Mesh mTLS: the proxy's mesh certificate, and the endpoints must prove the
    /// Service's SPIFFE ID.
    Mesh,
}

/// `tls: {mode: simple}`: how the upstream is verified and what is presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleTls {
    /// The name sent as SNI and verified: `sni`, else the DNS discovery host; none
    /// means the endpoint's IP address is verified instead.
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Roots from `caFile`; the system's when none.
    pub ca_file: Option<PathBuf>,
    /// `certFile` and `keyFile`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub insecure_skip_verify: bool,
}

/// A Service's breaker settings, and what to answer while it refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub config: meshgate_upstream::BreakerConfig,
    /// Connections open (or opening) to the Service's endpoints at once, HTTP/1.1 only.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection (a free one, or one being opened) at once.
    pub max_pending: Option<u32>,
    pub fallback: Option<Mock>,
}

#[derive(Debug)]
pub struct Api {
    pub name: Arc<str>,
    pub chain: Chain,
    pub invoke: Invoke,
    /// Per-Api request body limit (below the gateway's).
    pub max_body_bytes: Option<u64>,
    pub lifecycle: Lifecycle,
    /// A grey release that takes part of this Api's traffic on this proxy.
    pub grey: Option<Grey>,
    /// This Api is a grey release of that one (`spec.release.of`).
    pub release_of: Option<Arc<str>>,
}

/// Where part of an Api's traffic goes instead: its grey release, another Api of
/// the same snapshot (`spec.release`). The side is chosen right after routing, before
/// any Api filter runs, so the two revisions may authenticate differently; unless it
/// depends on the Consumer: then it is chosen once the filters the two revisions
/// share at the start of their chains have identified the caller.
#[derive(Debug)]
pub struct Grey {
    /// The release's index in [`Snapshot::apis`].
    pub to: usize,
    /// Parts per 10,000 of the requests that carry the key; `None`: all of them.
    pub permyriad: Option<u32>,
    pub by: GreyKey,
    /// Only requests with these headers go to the release.
    pub headers: Vec<meshgate_route::HeaderMatch>,
    /// Only requests from Consumers carrying these labels go to the release.
    pub consumers: BTreeMap<String, String>,
    /// The released Api's name: each release splits its keys on its own.
    pub salt: Arc<str>,
    /// For a choice that depends on the Consumer: how many filters of the current
    /// Api's chain run first (the shared ones), and where the release's chain
    /// goes on from (its filters up to there are the same instances).
    pub identified_at: (usize, usize),
}

/// What a release's share is keyed on.
#[derive(Debug, Clone)]
pub enum GreyKey {
    Request(HashOn),
    /// The authenticated Consumer's name.
    Consumer,
}

/// Which side a request is on, as far as routing can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Current,
    Release,
    /// It depends on the Consumer: ask [`Grey::picks_consumer`] once the shared
    /// filters have run.
    AfterIdentity,
}

impl Grey {
    /// Which side this request goes to. A request without the hash key stays on
    /// the current revision.
    pub fn side(&self, headers: &HeaderMap, query: Option<&str>, client: IpAddr) -> Side {
        let matches = self.headers.iter().all(|h| {
            headers
                .get_all(&h.name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| h.regex.is_match(s)))
        });
        if !matches {
            return Side::Current;
        }
        let in_share = match (self.permyriad, &self.by) {
            (Some(share), GreyKey::Request(by)) => by
                .hash_with(headers, query, client, |k| {
                    meshgate_upstream::stable_hash(self.salt.as_bytes(), k)
                })
                .is_some_and(|h| in_share(h, share)),
            // No share, or one of Consumers: decided later.
            _ => true,
        };
        match (in_share, self.keys_on_consumer()) {
            (false, _) => Side::Current,
            (true, true) => Side::AfterIdentity,
            (true, false) => Side::Release,
        }
    }

    /// Whether a request from `consumer` (after [`Side::AfterIdentity`]) goes to
    /// the release. An anonymous request stays on the current revision.
    pub fn picks_consumer(&self, consumer: Option<&meshgate_core::Consumer>) -> bool {
        let Some(c) = consumer else {
            return false;
        };
        if !self
            .consumers
            .iter()
            .all(|(k, v)| c.labels.get(k) == Some(v))
        {
            return false;
        }
        match (self.permyriad, &self.by) {
            (Some(share), GreyKey::Consumer) => in_share(
                meshgate_upstream::stable_hash(self.salt.as_bytes(), c.name.as_bytes()),
                share,
            ),
            // No share, or one of request keys, already checked.
            _ => true,
        }
    }

    fn keys_on_consumer(&self) -> bool {
        matches!(self.by, GreyKey::Consumer) || !self.consumers.is_empty()
    }
}

/// Whether a key's hash falls in a share of `share` parts per 10,000.
fn in_share(hash: u64, share: u32) -> bool {
    hash % 10_000 < u64::from(share)
}

/// Which proxy a config is compiled for, as far as grey releases placed by node
/// labels (`spec.release.nodes`) go.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// A proxy with these labels.
    Node(&'a BTreeMap<String, String>),
    /// As if every release were placed here: how a config is checked.
    Everywhere,
}

impl Placement<'_> {
    pub fn admits(&self, r: &meshgate_api::ReleaseSpec) -> bool {
        match self {
            Self::Node(labels) => r.placed_on(labels),
            Self::Everywhere => true,
        }
    }
}

/// An Api's stage, and what its answers say about it.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    pub stage: meshgate_api::Stage,
    /// Added to every answer: `Deprecation`, `Sunset`, `Link`.
    pub headers: Vec<(HeaderName, http::HeaderValue)>,
    /// After this the Api answers 410, as if offline.
    pub sunset: Option<std::time::SystemTime>,
}

impl Lifecycle {
    /// Whether the Api answers 410 now. Only a deprecated Api with a sunset reads
    /// the clock.
    pub fn gone(&self) -> bool {
        match self.stage {
            meshgate_api::Stage::Offline => true,
            meshgate_api::Stage::Deprecated => self
                .sunset
                .is_some_and(|s| std::time::SystemTime::now() >= s),
            _ => false,
        }
    }
}

#[derive(Debug)]
pub enum Invoke {
    Mock(Mock),
    Upstream(Upstream),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mock {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug)]
pub struct Upstream {
    pub service: String,
    pub rewrite: Option<RewriteTemplate>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub split: Split,
}

/// Grey release: header-matched targets first, then a weighted choice; what the
/// weights leave goes to the baseline.
#[derive(Debug, Default)]
pub struct Split {
    pub matched: Vec<(Vec<(HeaderName, String)>, Target)>,
    /// `(cumulative percent, target)`, ascending.
    pub weighted: Vec<(u32, Target)>,
    /// Where the rest goes: the baseline subset of the Api's Service, if any.
    pub baseline: Target,
}

/// A Service and optionally one of its subsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// `None`: the Api's own Service.
    pub service: Option<String>,
    pub subset: Option<usize>,
}
