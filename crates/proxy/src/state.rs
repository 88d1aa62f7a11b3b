//! The running state: the active snapshot with its per-Service runtime, swapped whole
//! on reload. Each request loads one `Arc<Active>` and keeps it to the end, so
//! in-flight work finishes on the config it started with.

use crate::client::{self, Transport};
use crate::metrics::{ApiStats, Metrics, ServiceStats};
use meshgate_config::{Api, Gateway, Invoke, Service, Snapshot};
use meshgate_upstream::{Cluster, Endpoint};
use std::collections::HashMap;
use std::sync::Arc;

/// A Service's runtime: balancer state, connection pool, DNS refresh.
#[derive(Debug)]
pub struct ClusterRt {
    pub service: Arc<Service>,
    pub cluster: Arc<Cluster>,
    pub transport: Transport,
    pub stats: ServiceStats,
    pub breaker: Option<meshgate_upstream::Breaker>,
    pub budget: meshgate_upstream::RetryBudget,
    /// Follows DNS or the registry.
    _discovery: Option<AbortOnDrop>,
    _sweep: Option<AbortOnDrop>,
    _health: Option<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What clusters draw on besides their config: the registry's instances and the
/// mesh certificate.
pub type Sources<'a> = (
    &'a crate::discovery::Registry,
    &'a Arc<crate::mesh::MeshTls>,
);

impl ClusterRt {
    fn new(service: Arc<Service>, metrics: &Metrics, (registry, mesh): Sources<'_>) -> Arc<Self> {
        let endpoints = service
            .endpoints
            .iter()
            .map(|e| Endpoint::new(e.address, e.weight, e.labels.clone()))
            .collect();
        let cluster = Arc::new(
            Cluster::new(
                service.name.clone(),
                service.policy,
                service.hash_on.clone(),
                service.selectors.clone(),
                endpoints,
            )
            .with_health(service.outlier.clone(), service.panic_threshold),
        );
        let stats = metrics.service(&service.name);
        stats.health.publish(&cluster);
        let health = service.health_check.clone().map(|cfg| {
            let h2 = service.protocol != meshgate_config::UpstreamProtocol::Http1;
            // Probes go over the TLS the Service's calls use.
            let tls = client::secure(&service, mesh);
            AbortOnDrop(tokio::spawn(crate::health::check_forever(
                cluster.clone(),
                Arc::new(cfg),
                crate::health::Probing { h2, tls },
                stats.health.clone(),
            )))
        });
        let transport = client::build(&service, stats.connections.clone(), mesh);
        let sweep = match &transport {
            Transport::H1(pool) => Some(AbortOnDrop(tokio::spawn(crate::h1::H1Pool::sweep(
                Arc::downgrade(pool),
                std::time::Duration::from_secs(15),
            )))),
            Transport::H2(_) => None,
        };
        let dns = service
            .dns
            .clone()
            .map(|d| AbortOnDrop(tokio::spawn(crate::discovery::follow(cluster.clone(), d))));
        let registered = service
            .registry
            .as_deref()
            .map(|r| AbortOnDrop(tokio::spawn(registry.follow(cluster.clone(), r))));
        let breaker = service.circuit_breaker.as_ref().map(|cb| {
            meshgate_upstream::Breaker::new(cb.config.clone(), std::time::Instant::now())
        });
        let budget =
            meshgate_upstream::RetryBudget::new(service.retry_budget, std::time::Instant::now());
        Arc::new(Self {
            service,
            budget,
            cluster,
            transport,
            stats,
            breaker,
            _discovery: dns.or(registered),
            _sweep: sweep,
            _health: health,
        })
    }
}

/// A gateway with its metric handles, one per Api (by index) plus unmatched traffic.
#[derive(Debug)]
pub struct GatewayRt {
    pub gateway: Arc<Gateway>,
    /// The access-log writer, resolved once per snapshot.
    pub log: Option<crate::access_log::LogSink>,
    pub api_stats: Vec<Arc<ApiStats>>,
    pub unmatched: Arc<ApiStats>,
}

/// Everything a request needs, for one config revision.
#[derive(Debug)]
pub struct Active {
    pub snapshot: Arc<Snapshot>,
    /// Few per process: found by a linear scan, no hashing on the request path.
    pub gateways: Vec<GatewayRt>,
    pub clusters: HashMap<String, Arc<ClusterRt>>,
    /// Each Api's own Service runtime, by Api index (None for mocks).
    pub api_clusters: Vec<Option<Arc<ClusterRt>>>,
    pub loaded_at: std::time::SystemTime,
}

impl Active {
    pub fn gateway(&self, name: &str) -> Option<&GatewayRt> {
        self.gateways.iter().find(|g| g.gateway.name == name)
    }

    /// The metric handles of Api `api` on gateway `gateway`.
    fn stats_of(&self, gateway: &str, api: &str) -> Option<&ApiStats> {
        let i = self.snapshot.apis.iter().position(|a| &*a.name == api)?;
        self.gateway(gateway).map(|g| &*g.api_stats[i])
    }
}

impl Active {
    /// Build the runtime for a snapshot, reusing clusters (pools, counters) of
    /// Services that did not change.
    pub fn build(
        snapshot: Arc<Snapshot>,
        prev: Option<&Active>,
        metrics: &Metrics,
        loggers: &crate::access_log::Loggers,
        sources: Sources<'_>,
    ) -> Self {
        let clusters: HashMap<String, Arc<ClusterRt>> = snapshot
            .services
            .iter()
            .map(|(name, svc)| {
                let reuse = prev
                    .and_then(|p| p.clusters.get(name))
                    .filter(|c| *c.service == **svc)
                    .cloned();
                (
                    name.clone(),
                    reuse.unwrap_or_else(|| ClusterRt::new(svc.clone(), metrics, sources)),
                )
            })
            .collect();
        let gateways = snapshot
            .gateways
            .iter()
            .map(|g| {
                let api_stats = snapshot
                    .apis
                    .iter()
                    .map(|a| {
                        let stats = metrics.api(&g.name, &a.name, service_of(a));
                        if a.release_of.is_none() {
                            return Arc::new(stats);
                        }
                        // A grey release's answers count from when this proxy began
                        // to serve it, for the control plane's automatic rollback.
                        let earlier = prev.and_then(|p| p.stats_of(&g.name, &a.name));
                        Arc::new(stats.counting_from(earlier))
                    })
                    .collect();
                GatewayRt {
                    gateway: g.clone(),
                    log: loggers.sink(&g.access_log, &metrics.access_log_dropped),
                    api_stats,
                    unmatched: Arc::new(metrics.api(&g.name, "", "")),
                }
            })
            .collect();
        let api_clusters = snapshot
            .apis
            .iter()
            .map(|a| clusters.get(service_of(a)).cloned())
            .collect();
        Self {
            snapshot,
            gateways,
            clusters,
            api_clusters,
            loaded_at: std::time::SystemTime::now(),
        }
    }
}

pub fn service_of(api: &Api) -> &str {
    match &api.invoke {
        Invoke::Upstream(u) => &u.service,
        Invoke::Mock(_) => "",
    }
}
