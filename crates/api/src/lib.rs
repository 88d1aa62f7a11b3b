//! Resource envelope and spec types of the meshgate DSL (SPEC §3), exactly as users write
//! them: serde shapes, camelCase, unknown fields rejected. Nothing here is validated
//! beyond its shape; `meshgate-config` turns these into checked model types. This crate
//! must not depend on tokio or hyper: the control plane and tools share it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const API_VERSION: &str = "meshgate.io/v1";

/// The kinds of resource the DSL knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Gateway,
    Service,
    Api,
    Consumer,
    Policy,
    Mesh,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "Gateway",
            Self::Service => "Service",
            Self::Api => "Api",
            Self::Consumer => "Consumer",
            Self::Policy => "Policy",
            Self::Mesh => "Mesh",
        }
    }

    pub const ALL: [Kind; 6] = [
        Self::Gateway,
        Self::Service,
        Self::Api,
        Self::Consumer,
        Self::Policy,
        Self::Mesh,
    ];

    /// The kind's name in admin API paths: `apis`, `services`, `consumers`,
    /// `gateways`, `policies`, `meshes`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Gateway => "gateways",
            Self::Service => "services",
            Self::Api => "apis",
            Self::Consumer => "consumers",
            Self::Policy => "policies",
            Self::Mesh => "meshes",
        }
    }

    /// A kind from its name, its plural, or either in lower case (`api`, `Api`,
    /// `apis`).
    pub fn parse(s: &str) -> Option<Kind> {
        Self::ALL
            .into_iter()
            .find(|k| s.eq_ignore_ascii_case(k.as_str()) || s.eq_ignore_ascii_case(k.plural()))
    }
}

/// The first pass over a document: enough to know its kind and name.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Head {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: serde::de::IgnoredAny,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A whole resource of one kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

// ---------------------------------------------------------------- Gateway

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
    /// Policies applied to every Api served by this gateway, before the Api's filters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Grace period for in-flight requests on SIGTERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// Serve draft Apis too (a test or staging gateway).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serve_drafts: bool,
    /// Serve only the Apis that name this gateway in their `spec.gateways`, not
    /// those that leave it out (an internal gateway; a sidecar's listeners).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_named_apis: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    #[default]
    Http,
    Https,
    Tcp,
    /// Mesh mTLS: the proxy's mesh certificate, and clients must present one.
    Mesh,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerTlsSpec {
    pub certificates: Vec<CertificateSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateSpec {
    pub cert_file: String,
    pub key_file: String,
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminSpec {
    pub address: String,
}

/// Edge limits; every field has a safe default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    pub max_header_bytes: Option<u64>,
    pub max_headers: Option<u64>,
    pub max_request_line: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_concurrent_streams: Option<u32>,
    /// A relayed TCP connection (a sidecar's outbound, not HTTP) idle this long is closed.
    pub tcp_idle_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogSpec {
    /// `stdout` (default), `off`, or a file path.
    pub path: Option<String>,
}

// ---------------------------------------------------------------- Service

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoverySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTlsSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
    /// What the sidecars of this service do with requests for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundSpec>,
}

/// `Service.spec.inbound`: the inbound side of the service's own sidecars.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundSpec {
    /// Policies whose filters run on every request a sidecar of this service
    /// takes from the mesh (`authz`, say), before it reaches the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// `Service.spec.retryBudget`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

/// `Service.spec.healthCheck`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// `http` (the default when `path` is set) or `tcp`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Status codes (`200`), classes (`2xx`) or ranges (`200-399`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

/// `Service.spec.outlierDetection`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    #[serde(
        default,
        rename = "consecutive5xx",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u8>,
}

/// `Service.spec.circuitBreaker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate_threshold: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<MockSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
    Grpc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiscoverySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// The longest time between DNS resolutions; records are re-resolved on their TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// The endpoint is where each connection was going before iptables redirected
    /// it to the proxy (`SO_ORIGINAL_DST`): Envoy's ORIGINAL_DST cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub original_destination: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub policy: LbPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// Below this share (percent) of usable endpoints, balance over all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTlsSpec {
    pub mode: String,
    /// `simple`: the name sent as SNI and verified in the upstream's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// `simple`: PEM roots to verify the upstream with, instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// `simple`: a client certificate chain (PEM) for upstreams that ask for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// `simple`: accept any certificate (encryption without authentication).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

// ---------------------------------------------------------------- Api

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    pub request: RequestSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<FilterRef>,
    pub invoke: InvokeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<LifecycleSpec>,
    /// This Api is a grey release of another: it serves part of that Api's traffic
    /// until it is promoted (it becomes that Api) or rolled back (deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseSpec>,
}

/// Who a grey release serves. With none of `percent` and `headers`, every request
/// for the released Api on the chosen proxies; with both, the share of the requests
/// that match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseSpec {
    /// The Api this one is a new revision of.
    pub of: String,
    /// Only proxies carrying all of these labels (`--labels`) serve this revision;
    /// every proxy when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, String>,
    /// The share of requests (0 to 100, to two decimals), chosen by a stable hash
    /// of `by`, so one key always lands on the same side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// What `percent` hashes: `header:NAME`, `cookie:NAME`, `query:NAME`, `ip`
    /// (the default) or `consumer` (the authenticated Consumer's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Only requests whose headers match these regexes (header name → regex).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Only requests from Consumers carrying all of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumers: BTreeMap<String, String>,
    /// Roll the release back on its own when too many of its answers fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<AutoRollbackSpec>,
}

/// When the control plane rolls a release back on its own: more than
/// `errorPercent` of the release's answers were 5xx over the last `window`, with at
/// least `minRequests` answers in it (summed over the proxies that report to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoRollbackSpec {
    pub error_percent: f64,
    #[serde(default = "default_rollback_window")]
    pub window: String,
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_rollback_window() -> String {
    "60s".into()
}

fn default_min_requests() -> u64 {
    20
}

impl ReleaseSpec {
    /// Whether proxies with `labels` serve this release.
    pub fn placed_on(&self, labels: &BTreeMap<String, String>) -> bool {
        self.nodes.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether only part of the traffic goes to the release (else all of it, on
    /// the proxies it is placed on).
    pub fn splits_traffic(&self) -> bool {
        self.percent.is_some() || !self.headers.is_empty() || !self.consumers.is_empty()
    }

    /// Whether the side depends on the Consumer, so it is chosen once the request
    /// is authenticated rather than right after routing.
    pub fn keys_on_consumer(&self) -> bool {
        self.by.as_deref() == Some("consumer") || !self.consumers.is_empty()
    }
}

/// Where an Api is in its life, and what its callers are told about it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleSpec {
    #[serde(default)]
    pub stage: Stage,
    /// When it was deprecated (RFC 3339): the `Deprecation` header's date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at: Option<String>,
    /// When it stops (RFC 3339): the `Sunset` header; after it, 410.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<String>,
    /// Where callers read about the change: `Link: <URL>; rel="deprecation"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Served only on gateways with `serveDrafts: true`.
    Draft,
    #[default]
    Published,
    /// Served, with `Deprecation` (and `Sunset`, `Link`) headers.
    Deprecated,
    /// Answers 410 until it is deleted.
    Offline,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Draft,
        Stage::Published,
        Stage::Deprecated,
        Stage::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Draft => "draft",
            Stage::Published => "published",
            Stage::Deprecated => "deprecated",
            Stage::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodySpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BodySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
}

/// One entry of `filters:` — a built-in filter with its config, or a Policy reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InvokeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<SplitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Allow replaying non-idempotent methods (POST, PATCH). Off by default.
    #[serde(default)]
    pub non_idempotent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
}

/// `invoke.retry.backoff`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<SplitMatchSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SplitMatchSpec {
    #[serde(default)]
    pub header: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MockSpec {
    #[serde(default = "default_mock_status")]
    pub status: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A string is sent as is; any other YAML value is sent as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

fn default_mock_status() -> u16 {
    200
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderOpsSpec>,
}

/// Header edits used by `response.headers` and the `transform` filter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOpsSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

// ---------------------------------------------------------------- Policy

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub filters: Vec<FilterRef>,
}

// ---------------------------------------------------------------- Mesh

/// Settings for every proxy of the mesh. At most one Mesh resource per config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MeshMtlsSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshMtlsSpec {
    /// `perService` (each Service's `tls` decides), `permissive` (every sidecar's
    /// inbound takes mTLS and plaintext: the step while callers move to mTLS) or
    /// `strict` (every registry Service is called over mesh mTLS, and every
    /// sidecar's inbound requires it).
    pub mode: String,
}

// ---------------------------------------------------------------- Consumer

/// An API caller: who it is (groups, labels) and how it proves it (credentials).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerSpec {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<CredentialSpec>,
    /// Requests per day or month, enforced where an Api has the `quota` filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CredentialSpec {
    Key {
        key: SecretSpec,
    },
    Hmac {
        #[serde(rename = "keyId")]
        key_id: String,
        secret: SecretSpec,
    },
    Jwt {
        issuer: String,
        subject: String,
    },
}

/// A secret: inline, or read from an environment variable or a file when the config
/// is compiled. Serializing never reveals an inline value.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SecretSpec {
    Inline(String),
    From(SecretSource),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl SecretSource {
    /// Read the secret: the variable's value, or the file's bytes (relative to `base`,
    /// trailing line breaks dropped: they are the editor's, not the secret's).
    /// Messages never include the secret.
    pub fn read(&self, base: &std::path::Path) -> Result<Vec<u8>, String> {
        let value = match (&self.env, &self.file) {
            (Some(name), None) => std::env::var_os(name)
                .ok_or_else(|| format!("environment variable {name:?} is not set"))?
                .into_encoded_bytes(),
            (None, Some(f)) => {
                let full = base.join(f);
                let mut v = std::fs::read(&full)
                    .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
                while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    v.pop();
                }
                v
            }
            _ => return Err("give exactly one of env or file".into()),
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(value)
    }
}

/// What an inline secret serializes as (`GET /config`, logs).
pub const REDACTED: &str = "<redacted>";

impl Serialize for SecretSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Inline(_) => s.serialize_str(REDACTED),
            Self::From(src) => src.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaSpec {
    pub requests: u64,
    /// Without it, the period of the `quota` filter that counts the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<QuotaPeriod>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
}
