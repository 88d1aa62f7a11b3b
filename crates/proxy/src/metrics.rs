//! Prometheus metrics. Label sets are resolved when a snapshot is activated, so the
//! request path only increments atomics it already holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub gateway: String,
    pub api: String,
    pub service: String,
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub gateway: String,
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceResultLabels {
    pub service: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceStateLabels {
    pub service: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistFamily<ApiLabels>,
    upstream_duration: HistFamily<ServiceLabels>,
    upstream_connect_errors: Family<ServiceLabels, Counter>,
    upstream_timeouts: Family<ServiceLabels, Counter>,
    upstream_retries: Family<ServiceLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    breaker_opened: Family<ServiceLabels, Counter>,
    breaker_refused: Family<ServiceLabels, Counter>,
    upstream_connections: Family<ServiceLabels, Gauge>,
    upstream_requests_active: Family<ServiceLabels, Gauge>,
    health_checks: Family<ServiceResultLabels, Counter>,
    outlier_ejections: Family<ServiceLabels, Counter>,
    upstream_endpoints: Family<ServiceStateLabels, Gauge>,
    pub reloads: Family<ResultLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub downstream_connections: Gauge,
    /// Downstream TLS handshakes that failed (a plaintext or certificate-less
    /// client on a mesh listener among them).
    pub tls_handshake_failures: Counter,
    /// Plaintext connections a permissive mesh listener took: while this grows,
    /// some caller is not on mTLS yet, and a strict Mesh would refuse it.
    pub mesh_plaintext: Counter,
    /// Redirected connections that were not HTTP, relayed to their original
    /// destination as bytes.
    pub tcp_passthrough: Counter,
    /// Relayed connections closed after `limits.tcpIdleTimeout` with no traffic.
    pub tcp_passthrough_idle: Counter,
    pub access_log_dropped: Counter,
    /// Spans the collector accepted.
    pub spans_exported: Counter,
    /// Spans dropped: the queue was full, or the collector failed.
    pub spans_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshgate");
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            upstream_duration: Family::new_with_constructor(latency),
            upstream_connect_errors: Family::default(),
            upstream_timeouts: Family::default(),
            upstream_retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            breaker_opened: Family::default(),
            breaker_refused: Family::default(),
            upstream_connections: Family::default(),
            upstream_requests_active: Family::default(),
            health_checks: Family::default(),
            outlier_ejections: Family::default(),
            upstream_endpoints: Family::default(),
            reloads: Family::default(),
            rejected: Family::default(),
            downstream_connections: Gauge::default(),
            tls_handshake_failures: Counter::default(),
            mesh_plaintext: Counter::default(),
            tcp_passthrough: Counter::default(),
            tcp_passthrough_idle: Counter::default(),
            access_log_dropped: Counter::default(),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by gateway, Api, Service and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Downstream request duration, first byte in to last byte out",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream time to response headers, per try",
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Upstream connection failures",
            m.upstream_connect_errors.clone(),
        );
        registry.register(
            "upstream_timeouts",
            "Upstream tries that timed out",
            m.upstream_timeouts.clone(),
        );
        registry.register(
            "upstream_retries",
            "Upstream retries",
            m.upstream_retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the Service's retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "circuit_breaker_opened",
            "Times a Service's circuit breaker opened",
            m.breaker_opened.clone(),
        );
        registry.register(
            "circuit_breaker_refused",
            "Requests a Service's circuit breaker refused (open, at maxRequests, or at maxPendingRequests)",
            m.breaker_refused.clone(),
        );
        registry.register(
            "upstream_connections",
            "Open upstream connections (the pool size)",
            m.upstream_connections.clone(),
        );
        registry.register(
            "upstream_requests_active",
            "Upstream requests in flight",
            m.upstream_requests_active.clone(),
        );
        registry.register(
            "health_checks",
            "Active health checks by Service and result (passed, failed)",
            m.health_checks.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.outlier_ejections.clone(),
        );
        registry.register(
            "upstream_endpoints",
            "Endpoints by Service and state (healthy, unhealthy, ejected)",
            m.upstream_endpoints.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result (accepted, rejected)",
            m.reloads.clone(),
        );
        registry.register(
            "downstream_rejected",
            "Requests refused before routing, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "downstream_connections",
            "Open downstream connections",
            m.downstream_connections.clone(),
        );
        registry.register(
            "downstream_tls_handshake_failures",
            "Downstream TLS handshakes that failed",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "mesh_plaintext_connections",
            "Plaintext connections taken by a permissive mesh listener (callers not on mTLS yet)",
            m.mesh_plaintext.clone(),
        );
        registry.register(
            "outbound_tcp_passthrough_connections",
            "Redirected outbound connections that were not HTTP, relayed to their original destination",
            m.tcp_passthrough.clone(),
        );
        registry.register(
            "outbound_tcp_passthrough_idle_timeouts",
            "Relayed outbound connections closed after limits.tcpIdleTimeout with no traffic",
            m.tcp_passthrough_idle.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.spans_exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            m.spans_dropped.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register_collector(Box::new(LimiterCollector));
        registry.register_collector(Box::new(UsageCollector));
        Self { registry, ..m }
    }
}

/// `meshgate_rate_limit_decisions_total{limiter, result}` and the concurrency-limit
/// counters and gauge, read from the limiters'
/// own counters at scrape time (they outlive snapshots, like the limits themselves).
#[derive(Debug)]
struct LimiterCollector;

impl prometheus_client::collector::Collector for LimiterCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let stats = meshgate_filter::limiter_stats();
        for kind in meshgate_filter::LimiterKind::ALL {
            let m = kind.metric();
            let samples: Vec<Sample<'_>> = stats
                .iter()
                .filter(|s| s.kind == kind)
                .flat_map(|s| {
                    m.results.iter().enumerate().map(move |(i, result)| {
                        (
                            vec![(m.label, s.site.as_str()), ("result", *result)],
                            s.counters.get(i),
                        )
                    })
                })
                .collect();
            const_family(&mut encoder, m.name, m.help, MetricType::Counter, &samples)?;
        }
        let in_flight: Vec<Sample<'_>> = stats
            .iter()
            .filter_map(|s| Some((vec![("limiter", s.site.as_str())], s.in_flight?)))
            .collect();
        const_family(
            &mut encoder,
            "concurrency_limit_in_flight",
            "Requests holding a concurrency-limit slot now",
            MetricType::Gauge,
            &in_flight,
        )?;
        let isolated: Vec<Sample<'_>> = stats
            .iter()
            .flat_map(|s| {
                s.isolated
                    .iter()
                    .map(move |a| (vec![("limiter", s.site.as_str()), ("api", &**a)], 1))
            })
            .collect();
        const_family(
            &mut encoder,
            "concurrency_limit_isolated",
            "Apis a concurrency limit holds to their share now because they answer far slower than usual (1 while isolated)",
            MetricType::Gauge,
            &isolated,
        )
    }
}

/// One sample read at scrape time: its labels and value.
type Sample<'a> = (Vec<(&'a str, &'a str)>, u64);

/// A family of samples read at scrape time; an empty one is left out.
fn const_family(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[Sample<'_>],
) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
    if samples.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = family.encode_family(labels)?;
        match kind {
            MetricType::Gauge => ConstGauge::new(*value as i64).encode(sample)?,
            _ => ConstCounter::new(*value).encode(sample)?,
        }
    }
    Ok(())
}

/// `meshgate_consumer_requests_total{consumer, api, status_class}`: the usage meter's
/// counts since start-up (the billing view over time is `GET /usage`).
#[derive(Debug)]
struct UsageCollector;

impl prometheus_client::collector::Collector for UsageCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let totals = meshgate_meter::meter().usage.totals();
        let samples: Vec<Sample<'_>> = totals
            .iter()
            .flat_map(|(consumer, api, counts)| {
                meshgate_meter::CLASSES
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(move |(class, n)| {
                        (
                            vec![
                                ("consumer", &**consumer),
                                ("api", &**api),
                                ("status_class", *class),
                            ],
                            *n,
                        )
                    })
            })
            .collect();
        const_family(
            &mut encoder,
            "consumer_requests",
            "Answered requests by Consumer, Api and status class (usage metering)",
            MetricType::Counter,
            &samples,
        )
    }
}

/// Handles for one (gateway, Api): indexed by status class 1xx..5xx.
#[derive(Debug)]
pub struct ApiStats {
    by_class: [Counter; 5],
    duration: Histogram,
    /// The counts when this proxy began to serve the Api, for [`ApiStats::totals`].
    base: (u64, u64),
}

impl ApiStats {
    pub fn record(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// Answers since this proxy began to serve the Api (see
    /// [`ApiStats::counting_from`]), and how many of them were 5xx.
    pub fn totals(&self) -> (u64, u64) {
        let (all, failed) = self.raw();
        (
            all.saturating_sub(self.base.0),
            failed.saturating_sub(self.base.1),
        )
    }

    /// Count [`ApiStats::totals`] from `earlier`'s start when it counted the same
    /// series; else from now (the series may hold the answers of an Api of the
    /// same name served before).
    pub fn counting_from(mut self, earlier: Option<&ApiStats>) -> Self {
        self.base = match earlier {
            Some(e) if std::ptr::eq(e.by_class[4].inner(), self.by_class[4].inner()) => e.base,
            _ => self.raw(),
        };
        self
    }

    fn raw(&self) -> (u64, u64) {
        let all = self.by_class.iter().map(|c| c.get()).sum();
        (all, self.by_class[4].get())
    }
}

#[derive(Debug, Clone)]
pub struct ServiceStats {
    pub duration: Histogram,
    pub connect_errors: Counter,
    pub timeouts: Counter,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub connections: Gauge,
    pub active: Gauge,
    pub breaker_opened: Counter,
    pub breaker_refused: Counter,
    pub health: HealthStats,
}

/// A Service's health-check and outlier metrics; cheap to clone into its tasks.
#[derive(Debug, Clone)]
pub struct HealthStats {
    pub checks_passed: Counter,
    pub checks_failed: Counter,
    pub ejections: Counter,
    /// Endpoints healthy, unhealthy (failed checks) and ejected.
    pub endpoints: [Gauge; 3],
}

impl HealthStats {
    /// Set the endpoint gauges from the cluster's current set.
    pub fn publish(&self, cluster: &meshgate_upstream::Cluster) {
        let set = cluster.endpoints();
        let mut counts = [0i64; 3];
        for e in &set.endpoints {
            counts[e.health.state() as usize] += 1;
        }
        for (g, n) in self.endpoints.iter().zip(counts) {
            g.set(n);
        }
    }
}

impl Metrics {
    pub fn api(&self, gateway: &str, api: &str, service: &str) -> ApiStats {
        let class = |c: &str| {
            self.requests
                .get_or_create(&RequestLabels {
                    gateway: gateway.into(),
                    api: api.into(),
                    service: service.into(),
                    status_class: c.into(),
                })
                .clone()
        };
        ApiStats {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self
                .request_duration
                .get_or_create(&ApiLabels {
                    gateway: gateway.into(),
                    api: api.into(),
                })
                .clone(),
            base: (0, 0),
        }
    }

    pub fn service(&self, service: &str) -> ServiceStats {
        let l = ServiceLabels {
            service: service.into(),
        };
        ServiceStats {
            duration: self.upstream_duration.get_or_create(&l).clone(),
            connect_errors: self.upstream_connect_errors.get_or_create(&l).clone(),
            timeouts: self.upstream_timeouts.get_or_create(&l).clone(),
            retries: self.upstream_retries.get_or_create(&l).clone(),
            budget_exhausted: self.retry_budget_exhausted.get_or_create(&l).clone(),
            breaker_opened: self.breaker_opened.get_or_create(&l).clone(),
            breaker_refused: self.breaker_refused.get_or_create(&l).clone(),
            connections: self.upstream_connections.get_or_create(&l).clone(),
            active: self.upstream_requests_active.get_or_create(&l).clone(),
            health: self.health(service),
        }
    }

    fn health(&self, service: &str) -> HealthStats {
        let check = |result: &str| {
            self.health_checks
                .get_or_create(&ServiceResultLabels {
                    service: service.into(),
                    result: result.into(),
                })
                .clone()
        };
        let endpoints = |state: &str| {
            self.upstream_endpoints
                .get_or_create(&ServiceStateLabels {
                    service: service.into(),
                    state: state.into(),
                })
                .clone()
        };
        HealthStats {
            checks_passed: check("passed"),
            checks_failed: check("failed"),
            ejections: self
                .outlier_ejections
                .get_or_create(&ServiceLabels {
                    service: service.into(),
                })
                .clone(),
            endpoints: meshgate_upstream::EndpointState::ALL.map(|s| endpoints(s.as_str())),
        }
    }

    pub fn reload(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        openmetrics_to_prometheus(&out)
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples
/// `x_total`. The classic text format (what `promtool check metrics` and most
/// scrapers' fallback parse) names the family after its samples and has no `# EOF`.
fn openmetrics_to_prometheus(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(kind);
                out.push_str(&name);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_classic_text_format() {
        let m = Metrics::default();
        m.api("g", "a", "s").record(200, 0.01);
        m.reload(true);
        let text = m.encode();
        assert!(text.contains("# TYPE meshgate_requests_total counter"));
        assert!(text.contains("# HELP meshgate_requests_total "));
        assert!(text.contains(
            "meshgate_requests_total{gateway=\"g\",api=\"a\",service=\"s\",status_class=\"2xx\"} 1"
        ));
        assert!(!text.contains("# EOF"));
    }
}
