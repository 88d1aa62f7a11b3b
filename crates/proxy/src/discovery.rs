//! DNS discovery: a Service's endpoints are the addresses its name resolves to,
//! re-resolved when the records' TTL runs out (never more often than once a
//! second, and at least every `refresh`). Failures keep the last good endpoints.

use hickory_resolver::TokioResolver;
use meshgate_config::DnsDiscovery;
use meshgate_upstream::{Cluster, Endpoint};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
