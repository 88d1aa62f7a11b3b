//! Stage 2: check each document on its own, collecting every problem.

use crate::diag::Diagnostic;
use crate::load::{Doc, Resource};
use crate::model::*;
use http::{HeaderName, Method};
use meshgate_api::{
    ApiSpec, ConsumerSpec, CredentialSpec, GatewaySpec, SecretSpec, ServiceSpec, UpstreamProtocol,
};
use meshgate_core::parse_duration;
use meshgate_route::{HeaderMatch, PathPattern};
use meshgate_upstream::{HashOn, LbPolicy};
use rustls_pki_types::pem::PemObject;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A gateway before linking (policies not yet resolved, no router).
#[derive(Debug)]
pub struct GatewayDraft {
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    pub access_log: AccessLog,
    pub policies: Vec<String>,
    pub drain_timeout: std::time::Duration,
    pub serve_drafts: bool,
    pub only_named_apis: bool,
}

/// An Api before linking.
#[derive(Debug)]
pub struct ApiDraft {
    pub gateways: Vec<String>,
    pub hosts: Vec<String>,
    pub pattern: PathPattern,
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderMatch>,
    pub max_body_bytes: Option<u64>,
    pub lifecycle: Lifecycle,
    pub release: Option<ReleaseDraft>,
}

/// `spec.release`, checked on its own (the released Api is resolved in linking).
#[derive(Debug)]
pub struct ReleaseDraft {
    pub spec: meshgate_api::ReleaseSpec,
    pub permyriad: Option<u32>,
    pub by: crate::model::GreyKey,
    pub headers: Vec<HeaderMatch>,
}

/// Everything that passed stage 2, by document index.
#[derive(Debug, Default)]
pub struct Checked {
    pub gateways: Vec<(usize, GatewayDraft)>,
    pub services: BTreeMap<String, (usize, Service)>,
    pub apis: Vec<(usize, ApiDraft)>,
    pub policies: BTreeMap<String, usize>,
    pub consumers: Vec<(usize, ConsumerDraft)>,
    /// The Mesh resource's mTLS mode.
    pub mesh_mtls: MeshMtls,
}

/// A Consumer with its secrets resolved.
#[derive(Debug)]
pub struct ConsumerDraft {
    pub groups: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// API keys, with the index of their credential entry.
    pub keys: Vec<(usize, Vec<u8>)>,
    /// HMAC signing keys: credential index, key id, secret.
    pub hmac: Vec<(usize, String, Vec<u8>)>,
    /// JWT identities: credential index, issuer, subject.
    pub jwts: Vec<(usize, String, String)>,
    pub quota: Option<meshgate_core::Quota>,
}

fn consumer(c: &mut Check<'_>, spec: &ConsumerSpec) -> Option<ConsumerDraft> {
    let before = c.diags.len();
    for (j, g) in spec.groups.iter().enumerate() {
        if g.is_empty() {
            c.err(format!("spec.groups.{j}"), "a group name must not be empty");
        }
    }
    let (mut keys, mut hmac, mut jwts) = (Vec::new(), Vec::new(), Vec::new());
    for (j, cred) in spec.credentials.iter().enumerate() {
        match cred {
            CredentialSpec::Key { key } => {
                if let Some(k) = secret(c, key, &format!("spec.credentials.{j}.key")) {
                    keys.push((j, k));
                }
            }
            CredentialSpec::Hmac { key_id, secret: s } => {
                let at = format!("spec.credentials.{j}.secret");
                if key_id.is_empty() {
                    c.err(format!("spec.credentials.{j}.keyId"), "must not be empty");
                } else if let Some(k) = secret(c, s, &at) {
                    // RFC 2104 keys shorter than the hash output weaken HMAC-SHA256.
                    if k.len() < 32 {
                        c.err(at, "an HMAC secret must be at least 32 bytes");
                    } else {
                        hmac.push((j, key_id.clone(), k));
                    }
                }
            }
            CredentialSpec::Jwt { issuer, subject } => {
                if issuer.is_empty() || subject.is_empty() {
                    c.err(
                        format!("spec.credentials.{j}"),
                        "a jwt credential needs a non-empty issuer and subject",
                    );
                } else {
                    jwts.push((j, issuer.clone(), subject.clone()));
                }
            }
        }
    }
    if let Some(q) = &spec.quota
        && q.requests == 0
    {
        c.err("spec.quota.requests", "must be at least 1");
    }
    (c.diags.len() == before).then(|| ConsumerDraft {
        groups: spec.groups.clone(),
        labels: spec.labels.clone(),
        keys,
        hmac,
        jwts,
        quota: spec.quota.as_ref().map(|q| meshgate_core::Quota {
            requests: q.requests,
            per: q.per.map(|p| match p {
                meshgate_api::QuotaPeriod::Day => meshgate_core::QuotaPeriod::Day,
                meshgate_api::QuotaPeriod::Month => meshgate_core::QuotaPeriod::Month,
            }),
        }),
    })
}

/// Resolve a secret: inline, `{env: NAME}` or `{file: PATH}` (relative to the config
/// file). Messages never include the secret.
fn secret(c: &mut Check<'_>, s: &SecretSpec, path: &str) -> Option<Vec<u8>> {
    let read = match s {
        SecretSpec::Inline(v) if v.is_empty() => Err("the secret is empty".to_string()),
        SecretSpec::Inline(v) => Ok(v.as_bytes().to_vec()),
        SecretSpec::From(src) => {
            let base = std::path::Path::new(&*c.doc.file)
                .parent()
                .unwrap_or(std::path::Path::new(""));
            src.read(base)
        }
    };
    read.map_err(|e| c.err(path, e)).ok()
}

/// `retryBudget`: retries may add 20% of the requests (that may retry) over 10 s,
/// plus 3 a second. It is always on; raise it to allow more.
fn retry_budget(
    c: &mut Check<'_>,
    b: Option<&meshgate_api::RetryBudgetSpec>,
) -> meshgate_upstream::BudgetConfig {
    const AT: &str = "spec.retryBudget";
    let mut out = meshgate_upstream::BudgetConfig::default();
    let Some(b) = b else {
        return out;
    };
    if let Some(p) = b.percent {
        if p > 1000 {
            c.err(
                format!("{AT}.percent"),
                "at most 1000 (ten retries per request)",
            );
        }
        out.percent = p;
    }
    if let Some(m) = b.min_retries_per_second {
        out.min_per_second = m;
    }
    if let Some(w) = c.duration(&format!("{AT}.window"), b.window.as_ref()) {
        if w < std::time::Duration::from_secs(1) {
            c.err(format!("{AT}.window"), "must be at least 1s");
        }
        out.window = w;
    }
    out
}

/// `healthCheck`: an HTTP GET of `path` every 5 s with a 1 s timeout, 3 failures to
/// mark an endpoint unhealthy and 2 passes to bring it back; or a TCP connect.
fn health_check(
    c: &mut Check<'_>,
    h: &meshgate_api::HealthCheckSpec,
) -> Option<meshgate_upstream::HealthCheckConfig> {
    const AT: &str = "spec.healthCheck";
    let before = c.diags.len();
    let probe = match (h.kind.as_deref(), &h.path) {
        (Some("tcp"), None) => {
            if h.host.is_some() || !h.expected_statuses.is_empty() {
                c.err(AT, "host and expectedStatuses apply to http checks only");
            }
            Some(meshgate_upstream::Probe::Tcp)
        }
        (Some("tcp"), Some(_)) => {
            c.err(format!("{AT}.path"), "a tcp check has no path");
            None
        }
        (None | Some("http"), Some(path)) => {
            if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                c.err(format!("{AT}.path"), format!("{path:?} is not a path"));
            }
            if let Some(host) = &h.host
                && http::HeaderValue::from_str(host).is_err()
            {
                c.err(format!("{AT}.host"), format!("{host:?} is not a host"));
            }
            let mut expected = Vec::new();
            for (i, v) in h.expected_statuses.iter().enumerate() {
                match status_range(v) {
                    Some(r) => expected.push(r),
                    None => c.err(
                        format!("{AT}.expectedStatuses.{i}"),
                        format!("{v} is not a status: use 200, 2xx or 200-399"),
                    ),
                }
            }
            if expected.is_empty() {
                expected.push((200, 299));
            }
            Some(meshgate_upstream::Probe::Http {
                path: path.clone(),
                host: h.host.clone(),
                expected,
            })
        }
        (None | Some("http"), None) => {
            c.err(
                format!("{AT}.path"),
                "an http check needs a path (or set type: tcp)",
            );
            None
        }
        (Some(other), _) => {
            c.err(
                format!("{AT}.type"),
                format!("{other:?} is not a check type: use http or tcp"),
            );
            None
        }
    };
    let interval = c
        .duration(&format!("{AT}.interval"), h.interval.as_ref())
        .unwrap_or(std::time::Duration::from_secs(5));
    let timeout = c
        .duration(&format!("{AT}.timeout"), h.timeout.as_ref())
        .unwrap_or(std::time::Duration::from_secs(1));
    if interval < std::time::Duration::from_millis(100) {
        c.err(format!("{AT}.interval"), "must be at least 100ms");
    }
    if timeout.is_zero() || timeout > interval {
        c.err(
            format!("{AT}.timeout"),
            "must be above zero and at most the interval",
        );
    }
    let unhealthy_threshold = h.unhealthy_threshold.unwrap_or(3);
    let healthy_threshold = h.healthy_threshold.unwrap_or(2);
    for (field, v) in [
        ("unhealthyThreshold", unhealthy_threshold),
        ("healthyThreshold", healthy_threshold),
    ] {
        if v == 0 {
            c.err(format!("{AT}.{field}"), "must be at least 1");
        }
    }
    let probe = probe?;
    (c.diags.len() == before).then_some(meshgate_upstream::HealthCheckConfig {
        probe,
        interval,
        timeout,
        unhealthy_threshold,
        healthy_threshold,
    })
}

/// `200`, `"2xx"` or `"200-399"` as an inclusive range.
fn status_range(v: &serde_json::Value) -> Option<(u16, u16)> {
    let valid = |n: u16| (100..=599).contains(&n);
    let range = match v {
        serde_json::Value::Number(n) => {
            let n = u16::try_from(n.as_u64()?).ok()?;
            (n, n)
        }
        serde_json::Value::String(s) => {
            if let Some(class) = s.strip_suffix("xx") {
                let c: u16 = class.parse().ok()?;
                (c * 100, c * 100 + 99)
            } else if let Some((a, b)) = s.split_once('-') {
                (a.trim().parse().ok()?, b.trim().parse().ok()?)
            } else {
                let n = s.parse().ok()?;
                (n, n)
            }
        }
        _ => return None,
    };
    (valid(range.0) && valid(range.1) && range.0 <= range.1).then_some(range)
}

/// `outlierDetection`, with Envoy's defaults: eject after 5 consecutive 5xx for 30 s
/// (times the number of recent ejections, at most 300 s), at most 10% of endpoints.
fn outlier_detection(
    c: &mut Check<'_>,
    o: &meshgate_api::OutlierDetectionSpec,
) -> Option<meshgate_upstream::OutlierConfig> {
    const AT: &str = "spec.outlierDetection";
    let before = c.diags.len();
    let consecutive_5xx = match (o.consecutive_5xx, o.consecutive_gateway_errors) {
        (None, None) => Some(5),
        (n, _) => n,
    };
    for (field, v) in [
        ("consecutive5xx", o.consecutive_5xx),
        ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
    ] {
        if v == Some(0) {
            c.err(format!("{AT}.{field}"), "must be at least 1");
        }
    }
    let base = c
        .duration(
            &format!("{AT}.baseEjectionTime"),
            o.base_ejection_time.as_ref(),
        )
        .unwrap_or(std::time::Duration::from_secs(30));
    let max = c
        .duration(
            &format!("{AT}.maxEjectionTime"),
            o.max_ejection_time.as_ref(),
        )
        .unwrap_or(std::time::Duration::from_secs(300).max(base));
    if base.is_zero() {
        c.err(format!("{AT}.baseEjectionTime"), "must be above zero");
    }
    if max < base {
        c.err(
            format!("{AT}.maxEjectionTime"),
            "must be at least baseEjectionTime",
        );
    }
    let max_ejection_percent = o.max_ejection_percent.unwrap_or(10);
    if max_ejection_percent > 100 {
        c.err(
            format!("{AT}.maxEjectionPercent"),
            "a percentage from 0 to 100",
        );
    }
    (c.diags.len() == before).then_some(meshgate_upstream::OutlierConfig {
        consecutive_5xx,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent,
    })
}

/// `circuitBreaker`, with Envoy-like defaults: open at 50% failures over 10 s once 20
/// requests were seen, for 30 s, then one probe.
fn circuit_breaker(
    c: &mut Check<'_>,
    cb: &meshgate_api::CircuitBreakerSpec,
    protocol: UpstreamProtocol,
) -> Option<crate::CircuitBreaker> {
    const AT: &str = "spec.circuitBreaker";
    let before = c.diags.len();
    for (field, v) in [
        ("maxConnections", cb.max_connections),
        ("maxPendingRequests", cb.max_pending_requests),
    ] {
        match v {
            Some(0) => c.err(format!("{AT}.{field}"), "must be at least 1"),
            // An HTTP/2 Service multiplexes every request over one connection per
            // endpoint: nothing waits for a connection of its own.
            Some(_) if protocol != UpstreamProtocol::Http1 => c.err(
                format!("{AT}.{field}"),
                "only applies to HTTP/1.1 Services, where each request in flight needs \
                 a connection of its own; HTTP/2 multiplexes requests, so limit them \
                 with maxRequests",
            ),
            _ => {}
        }
    }
    let failure_rate = cb.failure_rate_threshold.unwrap_or(50);
    if !(1..=100).contains(&failure_rate) {
        c.err(
            format!("{AT}.failureRateThreshold"),
            "a percentage from 1 to 100",
        );
    }
    if cb.max_requests == Some(0) {
        c.err(format!("{AT}.maxRequests"), "must be at least 1");
    }
    let probes = cb.half_open_requests.unwrap_or(1);
    if probes == 0 {
        c.err(format!("{AT}.halfOpenRequests"), "must be at least 1");
    }
    let window = c
        .duration(&format!("{AT}.window"), cb.window.as_ref())
        .unwrap_or(std::time::Duration::from_secs(10));
    let open_for = c
        .duration(&format!("{AT}.openFor"), cb.open_for.as_ref())
        .unwrap_or(std::time::Duration::from_secs(30));
    if window < std::time::Duration::from_millis(10) {
        c.err(format!("{AT}.window"), "must be at least 10ms");
    }
    let fallback = cb
        .fallback
        .as_ref()
        .and_then(|m| crate::link::mock(c, m, &format!("{AT}.fallback")));
    (c.diags.len() == before).then(|| crate::CircuitBreaker {
        config: meshgate_upstream::BreakerConfig {
            max_requests: cb.max_requests,
            failure_rate,
            minimum_requests: cb.minimum_requests.unwrap_or(20),
            window,
            open_for,
            probes,
        },
        max_connections: cb.max_connections,
        max_pending: cb.max_pending_requests,
        fallback,
    })
}

/// Collects diagnostics for one document.
pub struct Check<'a> {
    pub doc: &'a Doc,
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Check<'_> {
    pub fn err(&mut self, path: impl AsRef<str>, message: impl Into<String>) {
        self.diags.push(self.doc.diag(path.as_ref(), message));
    }

    pub(crate) fn duration(
        &mut self,
        path: &str,
        v: Option<&String>,
    ) -> Option<std::time::Duration> {
        let s = v?;
        parse_duration(s).map_err(|e| self.err(path, e)).ok()
    }

    fn addr(&mut self, path: &str, s: &str) -> Option<SocketAddr> {
        s.parse()
            .map_err(|_| {
                self.err(
                    path,
                    format!(
                        "{s:?} is not an address: use IP:PORT, like 127.0.0.1:8080 or [::1]:8080"
                    ),
                )
            })
            .ok()
    }

    fn not_built(&mut self, path: &str, what: &str) {
        self.err(
            path,
            format!("{what} is not built yet in this version of meshgate"),
        );
    }
}

pub fn validate(docs: &[Doc], diags: &mut Vec<Diagnostic>) -> Checked {
    let mut out = Checked {
        mesh_mtls: mesh(docs, diags),
        ..Checked::default()
    };
    let mut seen: HashSet<(meshgate_api::Kind, &str)> = HashSet::new();
    for (i, doc) in docs.iter().enumerate() {
        let mut c = Check { doc, diags };
        if !valid_name(&doc.name) {
            c.err(
                "metadata.name",
                format!("{:?} is not a valid name: use lowercase letters, digits, '-' and '.' (at most 253)", doc.name),
            );
            continue;
        }
        if doc.name.starts_with(crate::sidecar::RESERVED_PREFIX)
            && &*doc.file != crate::sidecar::FILE
        {
            c.err(
                "metadata.name",
                format!(
                    "names starting with {:?} are reserved for the resources a sidecar adds",
                    crate::sidecar::RESERVED_PREFIX
                ),
            );
            continue;
        }
        if !seen.insert((doc.kind, doc.name.as_str())) {
            c.err(
                "metadata.name",
                format!("duplicate {} {:?}", doc.kind.as_str(), doc.name),
            );
            continue;
        }
        match &doc.resource {
            Resource::Gateway(e) => {
                if let Some(g) = gateway(&mut c, &e.spec) {
                    out.gateways.push((i, g));
                }
            }
            Resource::Service(e) => {
                if let Some(s) = service(&mut c, &doc.name, &e.spec, out.mesh_mtls) {
                    out.services.insert(doc.name.clone(), (i, s));
                }
            }
            Resource::Api(e) => {
                if let Some(a) = api(&mut c, &e.spec) {
                    out.apis.push((i, a));
                }
            }
            Resource::Policy(_) => {
                out.policies.insert(doc.name.clone(), i);
            }
            Resource::Consumer(e) => {
                if let Some(d) = consumer(&mut c, &e.spec) {
                    out.consumers.push((i, d));
                }
            }
            // Read before the loop: Services depend on it.
            Resource::Mesh(_) => {}
        }
    }
    out
}

/// The config's one Mesh resource, checked: its mTLS mode.
fn mesh(docs: &[Doc], diags: &mut Vec<Diagnostic>) -> MeshMtls {
    let mut meshes = docs.iter().filter_map(|d| match &d.resource {
        Resource::Mesh(e) => Some((d, &e.spec)),
        _ => None,
    });
    let Some((first, spec)) = meshes.next() else {
        return MeshMtls::PerService;
    };
    for (doc, _) in meshes {
        Check { doc, diags }.err(
            "metadata.name",
            format!(
                "a config has one Mesh resource: Mesh {:?} ({}:{}) is already declared",
                first.name, first.file, first.span.first_line
            ),
        );
    }
    match spec.mtls.as_ref().map(|m| m.mode.as_str()) {
        None | Some("perService") => MeshMtls::PerService,
        Some("permissive") => MeshMtls::Permissive,
        Some("strict") => MeshMtls::Strict,
        Some(other) => {
            Check { doc: first, diags }.err(
                "spec.mtls.mode",
                format!("unknown mode {other:?} (perService, permissive or strict)"),
            );
            MeshMtls::PerService
        }
    }
}

/// Whether `n` may name a resource: lower-case letters, digits, `-` and `.`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !n.starts_with('-')
}

fn gateway(c: &mut Check<'_>, spec: &GatewaySpec) -> Option<GatewayDraft> {
    let before = c.diags.len();
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    if spec.listeners.is_empty() {
        c.err("spec.listeners", "a Gateway needs at least one listener");
    }
    for (i, l) in spec.listeners.iter().enumerate() {
        let p = format!("spec.listeners.{i}");
        if !names.insert(l.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        let address = c.addr(&format!("{p}.address"), &l.address);
        let mut certificates = Vec::new();
        match (l.protocol, &l.tls) {
            (ListenerProtocol::Tcp, _) => c.not_built(&format!("{p}.protocol"), "protocol tcp"),
            (ListenerProtocol::Https, None) => {
                c.err(
                    format!("{p}.tls"),
                    "an https listener needs tls.certificates",
                );
            }
            (ListenerProtocol::Https, Some(tls)) => {
                if tls.certificates.is_empty() {
                    c.err(
                        format!("{p}.tls.certificates"),
                        "at least one certificate is needed",
                    );
                }
                for (j, cert) in tls.certificates.iter().enumerate() {
                    let cp = format!("{p}.tls.certificates.{j}");
                    for (field, file) in
                        [("certFile", &cert.cert_file), ("keyFile", &cert.key_file)]
                    {
                        if !std::path::Path::new(file).is_file() {
                            c.err(format!("{cp}.{field}"), format!("{file:?} does not exist"));
                        }
                    }
                    certificates.push(Certificate {
                        cert_file: PathBuf::from(&cert.cert_file),
                        key_file: PathBuf::from(&cert.key_file),
                        hosts: cert.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    });
                }
            }
            (ListenerProtocol::Http | ListenerProtocol::Mesh, Some(_)) => {
                c.err(
                    format!("{p}.tls"),
                    "tls is only valid on an https listener (a mesh listener presents the proxy's mesh certificate)",
                );
            }
            (ListenerProtocol::Http | ListenerProtocol::Mesh, None) => {}
        }
        if let Some(address) = address {
            listeners.push(Listener {
                name: l.name.clone(),
                address,
                protocol: l.protocol,
                certificates,
                plaintext_too: false,
            });
        }
    }
    let admin = spec
        .admin
        .as_ref()
        .and_then(|a| c.addr("spec.admin.address", &a.address));
    let mut limits = Limits::default();
    if let Some(l) = &spec.limits {
        let size =
            |c: &mut Check<'_>, field: &str, v: Option<u64>, min: u64, max: u64| -> Option<u64> {
                let v = v?;
                if v < min || v > max {
                    c.err(
                        format!("spec.limits.{field}"),
                        format!("must be between {min} and {max}"),
                    );
                    return None;
                }
                Some(v)
            };
        if let Some(v) = size(c, "maxHeaderBytes", l.max_header_bytes, 1024, 1 << 20) {
            limits.max_header_bytes = v as usize;
        }
        if let Some(v) = size(c, "maxHeaders", l.max_headers, 8, 1000) {
            limits.max_headers = v as usize;
        }
        if let Some(v) = size(c, "maxRequestLine", l.max_request_line, 256, 1 << 20) {
            limits.max_request_line = v as usize;
        }
        if let Some(v) = size(c, "maxBodyBytes", l.max_body_bytes, 0, u64::MAX >> 1) {
            limits.max_body_bytes = v;
        }
        if let Some(v) = size(
            c,
            "maxConcurrentStreams",
            l.max_concurrent_streams.map(u64::from),
            1,
            10_000,
        ) {
            limits.max_concurrent_streams = v as u32;
        }
        if let Some(d) = c.duration(
            "spec.limits.headerReadTimeout",
            l.header_read_timeout.as_ref(),
        ) {
            limits.header_read_timeout = d;
        }
        if let Some(d) = c.duration("spec.limits.idleTimeout", l.idle_timeout.as_ref()) {
            limits.idle_timeout = d;
        }
        match c.duration("spec.limits.tcpIdleTimeout", l.tcp_idle_timeout.as_ref()) {
            Some(d) if d.is_zero() => {
                c.err("spec.limits.tcpIdleTimeout", "give a duration above 0s")
            }
            Some(d) => limits.tcp_idle_timeout = d,
            None => {}
        }
    }
    let access_log = match spec.access_log.as_ref().and_then(|a| a.path.as_deref()) {
        None | Some("stdout") => AccessLog::Stdout,
        Some("off") => AccessLog::Off,
        Some(p) => AccessLog::File(PathBuf::from(p)),
    };
    let drain_timeout = c
        .duration("spec.drainTimeout", spec.drain_timeout.as_ref())
        .unwrap_or(std::time::Duration::from_secs(30));
    (c.diags.len() == before).then(|| GatewayDraft {
        listeners,
        admin,
        limits,
        access_log,
        policies: spec.policies.clone(),
        drain_timeout,
        serve_drafts: spec.serve_drafts,
        only_named_apis: spec.only_named_apis,
    })
}

/// The fields that only `mode: simple` takes are an error with any other mode.
fn simple_only(c: &mut Check<'_>, t: &meshgate_api::ServiceTlsSpec, mode: &str) {
    let given = [
        ("sni", t.sni.is_some()),
        ("caFile", t.ca_file.is_some()),
        ("certFile", t.cert_file.is_some()),
        ("keyFile", t.key_file.is_some()),
        ("insecureSkipVerify", t.insecure_skip_verify),
    ];
    for (field, set) in given {
        if set {
            c.err(
                format!("spec.tls.{field}"),
                format!("only for mode: simple (this Service's mode is {mode})"),
            );
        }
    }
}

/// `tls: {mode: simple, ...}`: the name to verify, and files that exist and hold PEM.
fn simple_tls(
    c: &mut Check<'_>,
    t: &meshgate_api::ServiceTlsSpec,
    dns_host: Option<&str>,
) -> SimpleTls {
    let (field, name) = match (&t.sni, dns_host) {
        (Some(sni), _) => ("spec.tls.sni", Some(sni.as_str())),
        (None, host) => ("spec.discovery.dns", host),
    };
    let server_name =
        name.and_then(
            |n| match rustls_pki_types::ServerName::try_from(n.to_ascii_lowercase()) {
                Ok(name) => Some(name),
                Err(_) => {
                    c.err(field, format!("{n:?} is not a DNS name or IP address"));
                    None
                }
            },
        );
    let ca_file = t
        .ca_file
        .as_ref()
        .and_then(|f| pem_file(c, "spec.tls.caFile", f, certificates));
    if t.insecure_skip_verify && (ca_file.is_some() || t.sni.is_some()) {
        c.err(
            "spec.tls.insecureSkipVerify",
            "with insecureSkipVerify nothing is verified: drop caFile and sni, or this",
        );
    }
    let client_cert = match (&t.cert_file, &t.key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let cert = pem_file(c, "spec.tls.certFile", cert, certificates);
            let key = pem_file(c, "spec.tls.keyFile", key, |p| {
                rustls_pki_types::PrivateKeyDer::from_pem_file(p)
                    .map(drop)
                    .map_err(|e| e.to_string())
            });
            cert.zip(key)
        }
        (Some(_), None) => {
            c.err("spec.tls.keyFile", "certFile needs keyFile");
            None
        }
        (None, Some(_)) => {
            c.err("spec.tls.certFile", "keyFile needs certFile");
            None
        }
    };
    SimpleTls {
        server_name,
        ca_file,
        client_cert,
        insecure_skip_verify: t.insecure_skip_verify,
    }
}

/// A PEM file of certificates: every one readable, and at least one.
fn certificates(p: &std::path::Path) -> Result<(), String> {
    let mut count = 0;
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(p).map_err(|e| e.to_string())? {
        cert.map_err(|e| e.to_string())?;
        count += 1;
    }
    if count == 0 {
        return Err("no certificate in it".into());
    }
    Ok(())
}

/// `file` as a path, when `check` can read what it should hold from it.
fn pem_file(
    c: &mut Check<'_>,
    field: &str,
    file: &str,
    check: impl FnOnce(&std::path::Path) -> Result<(), String>,
) -> Option<PathBuf> {
    let path = PathBuf::from(file);
    if !path.is_file() {
        c.err(field, format!("{file:?} does not exist"));
        return None;
    }
    match check(&path) {
        Ok(()) => Some(path),
        Err(e) => {
            c.err(field, format!("{file:?}: {e}"));
            None
        }
    }
}

/// `mesh_mtls`: a strict Mesh puts every Service found through the registry on mTLS.
fn service(
    c: &mut Check<'_>,
    name: &str,
    spec: &ServiceSpec,
    mesh_mtls: MeshMtls,
) -> Option<Service> {
    let before = c.diags.len();
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().enumerate() {
        let p = format!("spec.endpoints.{i}");
        if e.weight == Some(0) {
            c.err(format!("{p}.weight"), "weight must be at least 1");
        }
        if let Some(address) = c.addr(&format!("{p}.address"), &e.address) {
            endpoints.push(EndpointConfig {
                address,
                weight: e.weight.unwrap_or(1),
                labels: e.labels.clone(),
            });
        }
    }
    let mut dns = None;
    let mut registry = None;
    let mut original_destination = false;
    match &spec.discovery {
        None if spec.endpoints.is_empty() => {
            c.err("spec.endpoints", "a Service needs endpoints or discovery");
        }
        None => {}
        Some(_) if !spec.endpoints.is_empty() => {
            c.err(
                "spec.discovery",
                "use either endpoints or discovery, not both",
            );
        }
        Some(d) => match (&d.dns, &d.registry, d.original_destination) {
            (Some(h), None, false) => {
                let refresh = c
                    .duration("spec.discovery.refresh", d.refresh.as_ref())
                    .unwrap_or(DEFAULT_DNS_REFRESH);
                match h
                    .rsplit_once(':')
                    .map(|(host, port)| (host, port.parse::<u16>()))
                {
                    Some((host, Ok(port))) if !host.is_empty() && port > 0 => {
                        dns = Some(DnsDiscovery {
                            host: host.to_string(),
                            port,
                            refresh,
                        });
                    }
                    _ => c.err("spec.discovery.dns", format!("{h:?} must be HOST:PORT")),
                }
            }
            (None, Some(r), false) if valid_name(r) => registry = Some(r.clone()),
            (None, Some(r), false) => c.err(
                "spec.discovery.registry",
                format!("{r:?} is not a service name: use lowercase letters, digits, '-' and '.'"),
            ),
            (None, None, true) => {
                original_destination = true;
                if spec.protocol != UpstreamProtocol::Http1 {
                    c.err(
                        "spec.protocol",
                        "originalDestination Services are called over HTTP/1.1",
                    );
                }
                if spec.health_check.is_some() {
                    c.err(
                        "spec.healthCheck",
                        "an originalDestination Service has no endpoints to check",
                    );
                }
            }
            (None, None, false) => c.err(
                "spec.discovery",
                "discovery needs dns, registry or originalDestination",
            ),
            _ => c.err(
                "spec.discovery",
                "use one of dns, registry and originalDestination",
            ),
        },
    }
    let lb = spec.load_balancer.clone().unwrap_or_default();
    let policy = match lb.policy {
        meshgate_api::LbPolicy::RoundRobin => LbPolicy::RoundRobin,
        meshgate_api::LbPolicy::LeastRequest => LbPolicy::LeastRequest,
        meshgate_api::LbPolicy::Random => LbPolicy::Random,
        meshgate_api::LbPolicy::RingHash => LbPolicy::RingHash,
    };
    let hash_on = match (&lb.hash_on, policy) {
        (Some(h), LbPolicy::RingHash) => HashOn::parse(h)
            .map_err(|e| c.err("spec.loadBalancer.hashOn", e))
            .ok(),
        (None, LbPolicy::RingHash) => {
            c.err(
                "spec.loadBalancer.hashOn",
                "ring-hash needs hashOn (header:NAME, cookie:NAME, query:NAME or ip)",
            );
            None
        }
        (Some(_), _) => {
            c.err(
                "spec.loadBalancer.hashOn",
                "hashOn is only used by the ring-hash policy",
            );
            None
        }
        (None, _) => None,
    };
    let timeout = c.duration("spec.timeout", spec.timeout.as_ref());
    let connect_timeout = c
        .duration("spec.connectTimeout", spec.connect_timeout.as_ref())
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let circuit_breaker = spec
        .circuit_breaker
        .as_ref()
        .and_then(|cb| circuit_breaker(c, cb, spec.protocol));
    let health_check = spec.health_check.as_ref().and_then(|h| health_check(c, h));
    let outlier = spec
        .outlier_detection
        .as_ref()
        .and_then(|o| outlier_detection(c, o));
    let retry_budget = retry_budget(c, spec.retry_budget.as_ref());
    let panic_threshold = lb
        .panic_threshold
        .unwrap_or(meshgate_upstream::DEFAULT_PANIC_THRESHOLD);
    if panic_threshold > 100 {
        c.err(
            "spec.loadBalancer.panicThreshold",
            "a percentage from 0 to 100",
        );
    }
    let strict = registry.is_some() && mesh_mtls == MeshMtls::Strict;
    let tls = match spec.tls.as_ref().map(|t| (t, t.mode.as_str())) {
        None if strict => UpstreamTls::Mesh,
        Some((_, mode)) if strict && mode != "mesh" => {
            c.err(
                "spec.tls.mode",
                format!("the Mesh's mtls.mode is strict: a registry Service is called over mesh mTLS, not {mode:?} (leave tls out, or set mode mesh)"),
            );
            UpstreamTls::Mesh
        }
        None => UpstreamTls::Disable,
        Some((t, "disable")) => {
            simple_only(c, t, "disable");
            UpstreamTls::Disable
        }
        Some((t, "mesh")) => {
            simple_only(c, t, "mesh");
            UpstreamTls::Mesh
        }
        Some((t, "simple")) => UpstreamTls::Simple(simple_tls(
            c,
            t,
            dns.as_ref().map(|d: &DnsDiscovery| d.host.as_str()),
        )),
        Some((_, other)) => {
            c.err(
                "spec.tls.mode",
                format!("unknown mode {other:?} (disable, simple or mesh)"),
            );
            UpstreamTls::Disable
        }
    };
    if tls != UpstreamTls::Disable && original_destination {
        c.err(
            "spec.tls.mode",
            "an originalDestination Service is called as the app called it, in plaintext",
        );
    }
    (c.diags.len() == before).then(|| Service {
        name: name.to_string(),
        protocol: spec.protocol,
        endpoints,
        dns,
        registry,
        original_destination,
        policy,
        hash_on,
        timeout,
        connect_timeout,
        selectors: Vec::new(),
        circuit_breaker,
        health_check,
        outlier,
        panic_threshold,
        retry_budget,
        tls,
    })
}

fn api(c: &mut Check<'_>, spec: &ApiSpec) -> Option<ApiDraft> {
    let before = c.diags.len();
    let r = &spec.request;
    let pattern = PathPattern::parse(&r.path)
        .map_err(|e| c.err("spec.request.path", e.to_string()))
        .ok();
    let mut methods = Vec::new();
    for (i, m) in r.methods.iter().enumerate() {
        match Method::from_bytes(m.as_bytes()) {
            Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => {
                if methods.contains(&method) {
                    c.err(
                        format!("spec.request.methods.{i}"),
                        format!("duplicate method {m}"),
                    );
                }
                methods.push(method);
            }
            _ => c.err(
                format!("spec.request.methods.{i}"),
                format!("{m:?} is not an HTTP method (use upper case, like GET)"),
            ),
        }
    }
    for (i, h) in r.hosts.iter().enumerate() {
        if !valid_host(h) {
            c.err(
                format!("spec.request.hosts.{i}"),
                format!("{h:?} is not a host: use a DNS name or *.suffix, without port or scheme"),
            );
        }
    }
    let headers = header_matches(c, &r.headers, "spec.request.headers");
    let max_body_bytes = r.body.as_ref().and_then(|b| b.max_bytes);
    let inv = &spec.invoke;
    let kinds = [
        inv.service.is_some(),
        inv.mock.is_some(),
        inv.steps.is_some(),
    ];
    match kinds.iter().filter(|k| **k).count() {
        0 => c.err("spec.invoke", "invoke needs one of service, mock or steps"),
        1 => {}
        _ => c.err("spec.invoke", "use only one of service, mock or steps"),
    }
    if inv.steps.is_some() {
        c.not_built("spec.invoke.steps", "orchestration (invoke.steps)");
    }
    if let Some(m) = &inv.mock {
        if http::StatusCode::from_u16(m.status).is_err() || m.status < 200 {
            c.err(
                "spec.invoke.mock.status",
                format!("{} is not a final HTTP status", m.status),
            );
        }
        for n in m.headers.keys() {
            if HeaderName::from_bytes(n.as_bytes()).is_err() {
                c.err(
                    format!("spec.invoke.mock.headers.{n}"),
                    format!("{n:?} is not a header name"),
                );
            }
        }
        if inv.path.is_some() || inv.retry.is_some() || !inv.split.is_empty() {
            c.err(
                "spec.invoke",
                "mock cannot be combined with path, retry or split",
            );
        }
    }
    let lifecycle = lifecycle(c, spec.lifecycle.as_ref());
    let release = spec
        .release
        .as_ref()
        .and_then(|r| release(c, r, &lifecycle));
    (c.diags.len() == before).then_some(())?;
    Some(ApiDraft {
        lifecycle,
        gateways: spec.gateways.clone(),
        hosts: r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        pattern: pattern?,
        methods,
        headers,
        max_body_bytes,
        release,
    })
}

/// Header name → regex, as `request.headers` and `release.headers` take them.
fn header_matches(
    c: &mut Check<'_>,
    spec: &BTreeMap<String, String>,
    at: &str,
) -> Vec<HeaderMatch> {
    let mut headers = Vec::new();
    for (n, re) in spec {
        let p = format!("{at}.{n}");
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| c.err(&p, format!("{n:?} is not a header name")))
            .ok();
        let regex = regex::RegexBuilder::new(re)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| {
                c.err(
                    &p,
                    format!("bad regex: {}", e.to_string().lines().last().unwrap_or("")),
                )
            })
            .ok();
        if let (Some(name), Some(regex)) = (name, regex) {
            headers.push(HeaderMatch { name, regex });
        }
    }
    headers
}

/// `spec.release`: the share, its key and the header match.
fn release(
    c: &mut Check<'_>,
    spec: &meshgate_api::ReleaseSpec,
    lifecycle: &Lifecycle,
) -> Option<ReleaseDraft> {
    let before = c.diags.len();
    if !valid_name(&spec.of) {
        c.err(
            "spec.release.of",
            format!("{:?} is not an Api name", spec.of),
        );
    }
    if matches!(
        lifecycle.stage,
        meshgate_api::Stage::Draft | meshgate_api::Stage::Offline
    ) {
        c.err(
            "spec.lifecycle.stage",
            "a release serves traffic: it cannot be a draft or offline (try it as a draft under its own path first)",
        );
    }
    let permyriad = match spec.percent {
        Some(p) if (0.0..=100.0).contains(&p) => {
            let scaled = p * 100.0;
            if (scaled - scaled.round()).abs() > 1e-6 {
                c.err("spec.release.percent", "use at most two decimals");
            }
            // In 0..=10_000 and rounded: the cast is exact.
            Some(scaled.round() as u32)
        }
        Some(p) => {
            c.err(
                "spec.release.percent",
                format!("{p} is not a percentage: use 0 to 100"),
            );
            None
        }
        None => None,
    };
    let by = match (&spec.by, spec.percent) {
        (Some(_), None) => {
            c.err(
                "spec.release.by",
                "by chooses who falls in the percent: give percent too",
            );
            None
        }
        (Some(b), Some(_)) if b == "consumer" => Some(GreyKey::Consumer),
        (Some(b), Some(_)) => HashOn::parse(b)
            .map(GreyKey::Request)
            .map_err(|_| {
                c.err(
                    "spec.release.by",
                    format!("{b:?} is not a release key: use header:NAME, cookie:NAME, query:NAME, ip or consumer"),
                )
            })
            .ok(),
        (None, _) => Some(GreyKey::Request(HashOn::ClientIp)),
    };
    if let Some(r) = &spec.rollback {
        if !(r.error_percent > 0.0 && r.error_percent <= 100.0) {
            c.err(
                "spec.release.rollback.errorPercent",
                format!(
                    "{} is not a percentage above 0: use more than 0, up to 100",
                    r.error_percent
                ),
            );
        }
        match parse_duration(&r.window) {
            Ok(w) if (1..=3600).contains(&w.as_secs()) => {}
            Ok(_) => c.err("spec.release.rollback.window", "use 1s to 1h"),
            Err(e) => c.err("spec.release.rollback.window", e),
        }
        if r.min_requests == 0 {
            c.err("spec.release.rollback.minRequests", "use at least 1");
        }
    }
    for (k, v) in &spec.consumers {
        if k.is_empty() || v.is_empty() {
            c.err(
                format!("spec.release.consumers.{k}"),
                "Consumer labels need a name and a value",
            );
        }
    }
    for (k, v) in &spec.nodes {
        if k.is_empty() || v.is_empty() {
            c.err(
                format!("spec.release.nodes.{k}"),
                "node labels need a name and a value",
            );
        }
    }
    let headers = header_matches(c, &spec.headers, "spec.release.headers");
    (c.diags.len() == before).then_some(())?;
    Some(ReleaseDraft {
        spec: spec.clone(),
        permyriad,
        by: by?,
        headers,
    })
}

/// `spec.lifecycle`: the stage, and for a deprecated Api the headers its answers
/// carry (RFC 9745 `Deprecation`, RFC 8594 `Sunset`, a `Link` with
/// `rel="deprecation"`).
fn lifecycle(c: &mut Check<'_>, spec: Option<&meshgate_api::LifecycleSpec>) -> Lifecycle {
    use http::HeaderValue;
    use meshgate_api::Stage;
    let Some(spec) = spec else {
        return Lifecycle::default();
    };
    let mut out = Lifecycle {
        stage: spec.stage,
        ..Lifecycle::default()
    };
    let time = |c: &mut Check<'_>, field: &str, v: &Option<String>| {
        let v = v.as_deref()?;
        let path = format!("spec.lifecycle.{field}");
        if !matches!(spec.stage, Stage::Deprecated | Stage::Offline) {
            c.err(
                &path,
                format!("only a deprecated (or offline) Api has a {field}"),
            );
            return None;
        }
        v.parse::<jiff::Timestamp>()
            .map_err(|e| c.err(&path, format!("{v:?} is not an RFC 3339 time ({e})")))
            .ok()
    };
    let deprecated_at = time(c, "deprecatedAt", &spec.deprecated_at);
    let sunset = time(c, "sunset", &spec.sunset);
    if spec.stage == Stage::Deprecated && spec.deprecated_at.is_none() {
        c.err(
            "spec.lifecycle.deprecatedAt",
            "a deprecated Api needs deprecatedAt, the date its Deprecation header gives (meshgate ctl lifecycle sets it)",
        );
    }
    if let Some(link) = &spec.link {
        let ok = (link.starts_with("https://") || link.starts_with("http://"))
            && link.parse::<http::Uri>().is_ok();
        match HeaderValue::from_str(&format!("<{link}>; rel=\"deprecation\"")) {
            Ok(v) if ok => out.headers.push((http::header::LINK, v)),
            _ => c.err(
                "spec.lifecycle.link",
                format!("{link:?} is not an http(s) URL"),
            ),
        }
    }
    if spec.stage == Stage::Deprecated {
        if let Some(at) = deprecated_at
            && let Ok(v) = HeaderValue::from_str(&format!("@{}", at.as_second()))
        {
            out.headers
                .push((HeaderName::from_static("deprecation"), v));
        }
        if let Some(at) = sunset
            && let Ok(v) =
                HeaderValue::from_str(&at.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string())
        {
            out.headers.push((HeaderName::from_static("sunset"), v));
        }
    }
    out.sunset = sunset.map(std::time::SystemTime::from);
    out
}

fn valid_host(h: &str) -> bool {
    let body = h.strip_prefix("*.").unwrap_or(h);
    !body.is_empty()
        && body.len() <= 253
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

pub fn captures_of(d: &ApiDraft) -> Vec<Arc<str>> {
    d.pattern.capture_names()
}
