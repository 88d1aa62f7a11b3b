//! The service registry: the instances sidecars register, each under a lease.
//!
//! A sidecar names its instance in the push stream's Hello. The lease is renewed by
//! every message the proxy sends (heartbeats at a third of the TTL at least) and
//! expires TTL after the last one: a killed process leaves the registry within its
//! TTL, while a proxy that reconnects in time (a control plane restart, a network
//! blip) keeps its place without a gap. A Deregister takes the instance out at once.
//!
//! Every change publishes a new [`Table`]: each service's instances behind an
//! `Arc`, shared with the table before for services that did not change, so the
//! push streams find what to send by comparing pointers.
//!
//! The registry lives in this control plane's memory. Replicas sharing an etcd
//! store do not share it yet: a proxy sees the instances registered with the
//! replica it is connected to.

use crate::push::pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// The lease's TTL when the proxy names none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The shortest and longest TTL a proxy may ask for.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(300);
/// How often expired leases are looked for: an instance leaves at most this long
/// after its TTL.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Every service's instances, by service name.
pub type Table = Arc<BTreeMap<String, Arc<[pb::Instance]>>>;

#[derive(Debug, Clone)]
struct Lease {
    instance: pb::Instance,
    ttl: Duration,
    expires: Instant,
    registered_at: SystemTime,
}

/// An instance as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub service: String,
    pub node: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// The lease's TTL, in seconds.
    pub lease_seconds: u64,
    /// Milliseconds until the lease expires unless renewed.
    pub expires_in_ms: u64,
    #[serde(with = "crate::push::rfc3339_millis")]
    pub registered_at: SystemTime,
}

/// The registered instances, by node (one instance per proxy).
#[derive(Debug)]
pub struct Registry {
    leases: Mutex<BTreeMap<String, Lease>>,
    table: watch::Sender<Table>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            leases: Mutex::new(BTreeMap::new()),
            table: watch::channel(Table::default()).0,
        }
    }
}

/// Why an instance cannot be registered.
pub fn check(instance: &pb::Instance) -> Result<(), String> {
    if !meshgate_config::valid_name(&instance.service) {
        return Err(format!(
            "the instance's service {:?} is not a resource name (lower-case letters, digits, '-', '.')",
            instance.service
        ));
    }
    if instance.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(format!(
            "the instance's address {:?} is not IP:PORT",
            instance.address
        ));
    }
    Ok(())
}

/// The TTL a proxy asked for (0: the default), within bounds.
pub fn lease(seconds: u32) -> Duration {
    match seconds {
        0 => DEFAULT_LEASE,
        s => Duration::from_secs(s.into()).clamp(MIN_LEASE, MAX_LEASE),
    }
}

impl Registry {
    /// Register (or re-register) `node`'s instance under a lease of `ttl`.
    pub fn register(&self, node: &str, mut instance: pb::Instance, ttl: Duration, now: Instant) {
        instance.node = node.to_string();
        let Ok(mut leases) = self.leases.lock() else {
            return;
        };
        let before = leases.get(node).map(|l| l.instance.clone());
        let registered_at = match &before {
            Some(b) if *b == instance => leases[node].registered_at,
            _ => SystemTime::now(),
        };
        leases.insert(
            node.to_string(),
            Lease {
                instance: instance.clone(),
                ttl,
                expires: now + ttl,
                registered_at,
            },
        );
        if before.as_ref() != Some(&instance) {
            tracing::info!(node, service = %instance.service, address = %instance.address, ?ttl, "instance registered");
            let touched = before
                .map(|b| b.service)
                .into_iter()
                .chain([instance.service]);
            self.publish(&leases, touched);
        }
    }

    /// Renew `node`'s lease, if it holds one.
    pub fn renew(&self, node: &str, now: Instant) {
        if let Ok(mut leases) = self.leases.lock()
            && let Some(l) = leases.get_mut(node)
        {
            l.expires = now + l.ttl;
        }
    }

    /// Take `node`'s instance out now.
    pub fn deregister(&self, node: &str) {
        let Ok(mut leases) = self.leases.lock() else {
            return;
        };
        if let Some(l) = leases.remove(node) {
            tracing::info!(node, service = %l.instance.service, address = %l.instance.address, "instance deregistered");
            self.publish(&leases, [l.instance.service]);
        }
    }

    /// Take out every instance whose lease ran out by `now`.
    fn expire(&self, now: Instant) {
        let Ok(mut leases) = self.leases.lock() else {
            return;
        };
        let mut gone = Vec::new();
        leases.retain(|node, l| {
            let keep = l.expires > now;
            if !keep {
                tracing::warn!(node, service = %l.instance.service, address = %l.instance.address, ttl = ?l.ttl, "lease expired; instance removed");
                gone.push(l.instance.service.clone());
            }
            keep
        });
        if !gone.is_empty() {
            self.publish(&leases, gone);
        }
    }

    /// Publish a table in which `services` are rebuilt from `leases`.
    fn publish(
        &self,
        leases: &BTreeMap<String, Lease>,
        services: impl IntoIterator<Item = String>,
    ) {
        let mut table = (**self.table.borrow()).clone();
        for s in services {
            let mut list: Vec<pb::Instance> = leases
                .values()
                .filter(|l| l.instance.service == s)
                .map(|l| l.instance.clone())
                .collect();
            list.sort_by(|a, b| a.address.cmp(&b.address));
            if list.is_empty() {
                table.remove(&s);
            } else {
                table.insert(s, list.into());
            }
        }
        self.table.send_replace(Arc::new(table));
    }

    pub fn subscribe(&self) -> watch::Receiver<Table> {
        self.table.subscribe()
    }

    /// Every instance (of `service` only, if given), by service then address.
    pub fn list(&self, service: Option<&str>) -> Vec<InstanceStatus> {
        let now = Instant::now();
        let Ok(leases) = self.leases.lock() else {
            return Vec::new();
        };
        let mut out: Vec<InstanceStatus> = leases
            .values()
            .filter(|l| service.is_none_or(|s| s == l.instance.service))
            .map(|l| InstanceStatus {
                service: l.instance.service.clone(),
                node: l.instance.node.clone(),
                address: l.instance.address.clone(),
                labels: l.instance.labels.clone().into_iter().collect(),
                zone: l.instance.zone.clone(),
                lease_seconds: l.ttl.as_secs(),
                expires_in_ms: l.expires.saturating_duration_since(now).as_millis() as u64,
                registered_at: l.registered_at,
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));
        out
    }

    /// Expire leases until the registry is dropped.
    pub fn sweep(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                this.expire(Instant::now());
            }
        });
    }
}

/// The services whose lists differ between `sent` and `now`, as one message
/// (`None` when nothing differs). A service gone from `now` is sent empty.
pub fn changes(sent: &Table, now: &Table) -> Option<pb::Endpoints> {
    let mut services: Vec<pb::ServiceInstances> = now
        .iter()
        .filter(|(s, list)| sent.get(*s).is_none_or(|old| !Arc::ptr_eq(old, list)))
        .map(|(s, list)| pb::ServiceInstances {
            service: s.clone(),
            instances: list.to_vec(),
        })
        .collect();
    services.extend(
        sent.keys()
            .filter(|s| !now.contains_key(*s))
            .map(|s| pb::ServiceInstances {
                service: s.clone(),
                instances: Vec::new(),
            }),
    );
    (!services.is_empty()).then_some(pb::Endpoints { services })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, address: &str) -> pb::Instance {
        pb::Instance {
            service: service.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    fn addresses(r: &Registry, service: &str) -> Vec<String> {
        r.subscribe()
            .borrow()
            .get(service)
            .map(|l| l.iter().map(|i| i.address.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let r = Registry::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        r.register("a", instance("orders", "127.0.0.1:1"), ttl, t0);
        r.register("b", instance("orders", "127.0.0.1:2"), ttl, t0);
        assert_eq!(addresses(&r, "orders"), ["127.0.0.1:1", "127.0.0.1:2"]);
        r.renew("a", t0 + Duration::from_secs(2));
        r.expire(t0 + Duration::from_millis(3500));
        assert_eq!(
            addresses(&r, "orders"),
            ["127.0.0.1:1"],
            "b's lease ran out"
        );
        r.expire(t0 + Duration::from_secs(5) + Duration::from_millis(1));
        assert!(
            r.subscribe().borrow().is_empty(),
            "a's renewed lease ran out too"
        );
        r.renew("a", t0 + Duration::from_secs(6));
        assert!(
            r.subscribe().borrow().is_empty(),
            "a renewal does not bring an instance back"
        );
    }

    #[test]
    fn only_changed_services_are_sent_again() {
        let r = Registry::default();
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        r.register("a", instance("orders", "127.0.0.1:1"), ttl, t0);
        r.register("b", instance("users", "127.0.0.1:2"), ttl, t0);
        let before = r.subscribe().borrow().clone();
        let all = changes(&Table::default(), &before).map(|e| e.services.len());
        assert_eq!(all, Some(2));
        // The same instance again (a reconnection) changes nothing.
        r.register("a", instance("orders", "127.0.0.1:1"), ttl, t0);
        assert!(changes(&before, &r.subscribe().borrow()).is_none());
        r.deregister("b");
        let sent = changes(&before, &r.subscribe().borrow());
        let sent: Vec<(String, usize)> = sent
            .map(|e| {
                e.services
                    .into_iter()
                    .map(|s| (s.service, s.instances.len()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(sent, [("users".to_string(), 0)]);
    }

    #[test]
    fn moving_to_another_service_updates_both() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.register("a", instance("orders", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        r.register("a", instance("users", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        assert!(addresses(&r, "orders").is_empty());
        assert_eq!(addresses(&r, "users"), ["127.0.0.1:1"]);
        assert_eq!(r.list(None)[0].node, "a");
    }

    #[test]
    fn bad_instances_and_leases() {
        assert!(check(&instance("", "127.0.0.1:1")).is_err());
        assert!(check(&instance("x", "somewhere")).is_err());
        assert!(check(&instance("x", "[::1]:80")).is_ok());
        assert_eq!(lease(0), DEFAULT_LEASE);
        assert_eq!(lease(100_000), MAX_LEASE);
        assert_eq!(lease(2), Duration::from_secs(2));
    }
}
