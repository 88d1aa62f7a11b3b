//! Discovery: a Service's endpoints from DNS or from the control plane's registry.
//!
//! DNS: the addresses a name resolves to, re-resolved when the records' TTL runs
//! out (never more often than once a second, and at least every `refresh`).
//! Failures keep the last good endpoints.
//!
//! Registry: the instances the control plane pushes for a service name, replaced
//! whole on every change.

use hickory_resolver::TokioResolver;
use meshgate_config::DnsDiscovery;
use meshgate_upstream::{Cluster, Endpoint};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const MIN_INTERVAL: Duration = Duration::from_secs(1);
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One resolver for the process: it reads /etc/resolv.conf and /etc/hosts once and
/// caches answers for their TTL.
fn resolver() -> Option<&'static TokioResolver> {
    static RESOLVER: OnceLock<Option<TokioResolver>> = OnceLock::new();
    RESOLVER
        .get_or_init(
            || match TokioResolver::builder_tokio().and_then(|b| b.build()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the system DNS config");
                    None
                }
            },
        )
        .as_ref()
}

/// Keep `cluster`'s endpoints in step with DNS until the task is aborted.
pub async fn follow(cluster: Arc<Cluster>, d: DnsDiscovery) {
    loop {
        let next = match resolver() {
            None => d.refresh,
            Some(r) => match r.lookup_ip(d.host.as_str()).await {
                Ok(answer) => {
                    let mut addrs: Vec<SocketAddr> = answer
                        .iter()
                        .map(|ip| SocketAddr::new(ip, d.port))
                        .collect();
                    addrs.sort();
                    addrs.dedup();
                    tracing::debug!(service = %cluster.name, host = %d.host, ?addrs, "dns resolved");
                    cluster.update(
                        addrs
                            .into_iter()
                            .map(|a| Endpoint::new(a, 1, Default::default()))
                            .collect(),
                    );
                    answer
                        .valid_until()
                        .saturating_duration_since(Instant::now())
                        .clamp(MIN_INTERVAL, d.refresh.max(MIN_INTERVAL))
                }
                Err(e) => {
                    tracing::warn!(service = %cluster.name, host = %d.host, error = %e, "dns resolution failed; keeping the last endpoints");
                    RETRY_AFTER_FAILURE.min(d.refresh.max(MIN_INTERVAL))
                }
            },
        };
        tokio::time::sleep(next).await;
    }
}

/// One registered instance of a service, as the control plane pushes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub address: SocketAddr,
    pub labels: std::collections::BTreeMap<String, String>,
}

type Instances = Arc<[Instance]>;

/// The registry as this proxy knows it: every service's instances, replaced whole
/// per service as the control plane pushes changes. Services with
/// `discovery: {registry: NAME}` follow their entry.
#[derive(Debug, Default)]
pub struct Registry {
    services: std::sync::Mutex<std::collections::HashMap<String, watch::Sender<Instances>>>,
}

impl Registry {
    /// Replace `service`'s instances.
    pub fn set(&self, service: &str, instances: Vec<Instance>) {
        let instances: Instances = instances.into();
        if let Ok(mut map) = self.services.lock() {
            match map.get(service) {
                Some(tx) => {
                    tx.send_if_modified(|now| {
                        let changed = *now != instances;
                        *now = instances;
                        changed
                    });
                }
                None => {
                    map.insert(service.to_string(), watch::channel(instances).0);
                }
            }
        }
    }

    /// `service`'s instances now, and their changes.
    fn watch(&self, service: &str) -> watch::Receiver<Instances> {
        match self.services.lock() {
            Ok(mut map) => map
                .entry(service.to_string())
                .or_insert_with(|| watch::channel(Instances::from([])).0)
                .subscribe(),
            Err(_) => watch::channel(Instances::from([])).1,
        }
    }

    /// Wait until `service`'s instances satisfy `done`.
    pub fn until(
        &self,
        service: &str,
        done: impl Fn(&[Instance]) -> bool + Send + Sync + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.watch(service);
        async move {
            let _ = rx.wait_for(|list| done(list)).await;
        }
    }

    /// Set `cluster`'s endpoints to `service`'s instances now, and keep them in step
    /// in the returned task.
    pub fn follow(
        &self,
        cluster: Arc<Cluster>,
        service: &str,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.watch(service);
        let endpoints = |list: &Instances| {
            list.iter()
                .map(|i| Endpoint::new(i.address, 1, i.labels.clone()))
                .collect()
        };
        cluster.update(endpoints(&rx.borrow_and_update()));
        async move {
            while rx.changed().await.is_ok() {
                let list = rx.borrow_and_update().clone();
                tracing::debug!(service = %cluster.name, instances = list.len(), "registry changed");
                cluster.update(endpoints(&list));
            }
        }
    }
}
