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
//! Control planes sharing an etcd store share their registries: each writes the
//! instances it holds as [`Record`]s under its own etcd lease and follows the
//! others' (see `Publisher::start`). A proxy connected to any of them sees every
//! instance. Each control plane stays the authority on the instances whose
//! proxies stream to it: it expires them by their own leases, and deletes their
//! records then, unless another control plane wrote them since (the proxy moved).
//! Of two control planes holding one node, the one the proxy said Hello to last
//! (the later claim: each [`Record`] carries its time) keeps it: the other drops its
//! lingering lease, and no record is written over a later claim. The records of a
//! control plane that dies go with its etcd lease.

use crate::push::pb;
use std::collections::{BTreeMap, BTreeSet};
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
    /// When the proxy last said Hello for it here: of two control planes holding
    /// one node, the later claim is the proxy's current control plane.
    claimed_at: SystemTime,
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
    /// Milliseconds until the lease expires unless renewed; none for an instance
    /// another control plane holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
    #[serde(with = "crate::push::rfc3339_millis")]
    pub registered_at: SystemTime,
}

/// An instance as control planes sharing a store write it for each other (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The control plane that holds the instance's lease.
    holder: String,
    service: String,
    node: String,
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    zone: String,
    lease_seconds: u64,
    /// Milliseconds since the Unix epoch.
    registered_at_ms: u64,
    /// When the proxy last said Hello to the holder (milliseconds since the Unix
    /// epoch); 0 from a control plane that predates the field.
    #[serde(default)]
    claimed_at_ms: u64,
}

impl Record {
    fn of(holder: &str, l: &Lease) -> Self {
        let i = &l.instance;
        Self {
            holder: holder.to_string(),
            service: i.service.clone(),
            node: i.node.clone(),
            address: i.address.clone(),
            labels: i.labels.clone().into_iter().collect(),
            zone: i.zone.clone(),
            lease_seconds: l.ttl.as_secs(),
            registered_at_ms: unix_ms(l.registered_at),
            claimed_at_ms: unix_ms(l.claimed_at),
        }
    }

    /// As the admin API shows it; `expires_in_ms` only when this control plane
    /// holds the lease.
    fn status(self, expires_in_ms: Option<u64>) -> InstanceStatus {
        InstanceStatus {
            service: self.service,
            node: self.node,
            address: self.address,
            labels: self.labels,
            zone: self.zone,
            lease_seconds: self.lease_seconds,
            expires_in_ms,
            registered_at: SystemTime::UNIX_EPOCH + Duration::from_millis(self.registered_at_ms),
        }
    }

    fn instance(&self) -> pb::Instance {
        pb::Instance {
            service: self.service.clone(),
            node: self.node.clone(),
            address: self.address.clone(),
            labels: self.labels.clone().into_iter().collect(),
            zone: self.zone.clone(),
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether the record `theirs` (JSON) is a later claim on its node than `mine`:
/// the proxy left this control plane for the one that wrote `theirs`, which a
/// shared store must then not overwrite with `mine`.
pub fn claimed_later(theirs: &str, mine: &str) -> bool {
    let claim =
        |json: &str| serde_json::from_str::<Record>(json).map(|r| (r.holder, r.claimed_at_ms));
    match (claim(theirs), claim(mine)) {
        (Ok((holder, t)), Ok((me, m))) => holder != me && t > m,
        _ => false,
    }
}

#[derive(Debug, Default)]
struct State {
    /// The instances whose proxies stream to this control plane, by node.
    leases: BTreeMap<String, Lease>,
    /// The instances other control planes hold (a shared store), by node. A node
    /// this control plane also holds is shown as its own.
    remote: BTreeMap<String, Record>,
    /// The nodes of `leases`, and of `remote`, by service: a change rebuilds only
    /// the services it touches, in time of their size, not the registry's.
    own_by_service: BTreeMap<String, BTreeSet<String>>,
    remote_by_service: BTreeMap<String, BTreeSet<String>>,
}

impl State {
    /// Hold `lease` for `node`, in place of any it held.
    fn insert_lease(&mut self, node: &str, lease: Lease) {
        index(&mut self.own_by_service, &lease.instance.service, node);
        if let Some(b) = self.leases.insert(node.to_string(), lease)
            && b.instance.service != self.leases[node].instance.service
        {
            unindex(&mut self.own_by_service, &b.instance.service, node);
        }
    }

    fn remove_lease(&mut self, node: &str) -> Option<Lease> {
        let l = self.leases.remove(node)?;
        unindex(&mut self.own_by_service, &l.instance.service, node);
        Some(l)
    }

    fn set_remote(&mut self, remote: BTreeMap<String, Record>) -> BTreeMap<String, Record> {
        self.remote_by_service.clear();
        for (node, r) in &remote {
            index(&mut self.remote_by_service, &r.service, node);
        }
        std::mem::replace(&mut self.remote, remote)
    }

    /// The service of the record another control plane holds for `node`: a lease
    /// here hides it, so taking or dropping one changes that service too.
    fn remote_service(&self, node: &str) -> Option<String> {
        self.remote.get(node).map(|r| r.service.clone())
    }

    /// `service`'s instances, by address: this control plane's, then the others'
    /// for nodes it does not hold.
    fn instances(&self, service: &str) -> Vec<pb::Instance> {
        let own = self.own_by_service.get(service).into_iter().flatten();
        let theirs = self.remote_by_service.get(service).into_iter().flatten();
        let own = own.filter_map(|n| self.leases.get(n).map(|l| l.instance.clone()));
        let theirs = theirs
            .filter(|n| !self.leases.contains_key(*n))
            .filter_map(|n| self.remote.get(n).map(Record::instance));
        let mut list: Vec<pb::Instance> = own.chain(theirs).collect();
        list.sort_by(|a, b| a.address.cmp(&b.address));
        list
    }
}

fn index(idx: &mut BTreeMap<String, BTreeSet<String>>, service: &str, node: &str) {
    idx.entry(service.to_string())
        .or_default()
        .insert(node.to_string());
}

fn unindex(idx: &mut BTreeMap<String, BTreeSet<String>>, service: &str, node: &str) {
    if let Some(nodes) = idx.get_mut(service) {
        nodes.remove(node);
        if nodes.is_empty() {
            idx.remove(service);
        }
    }
}

/// The registered instances, by node (one instance per proxy).
#[derive(Debug)]
pub struct Registry {
    /// This control plane's name in [`Record::holder`].
    id: String,
    state: Mutex<State>,
    table: watch::Sender<Table>,
    /// This control plane's instances as records (JSON, by node), for the others;
    /// changed a node at a time.
    mine: watch::Sender<BTreeMap<String, String>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            id: crate::store::new_id(),
            state: Mutex::new(State::default()),
            table: watch::channel(Table::default()).0,
            mine: watch::channel(BTreeMap::new()).0,
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
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let before = state.leases.get(node).map(|l| l.instance.clone());
        let claimed_at = SystemTime::now();
        let registered_at = match &before {
            Some(b) if *b == instance => state.leases[node].registered_at,
            _ => claimed_at,
        };
        state.insert_lease(
            node,
            Lease {
                instance: instance.clone(),
                ttl,
                expires: now + ttl,
                registered_at,
                claimed_at,
            },
        );
        if before.as_ref() != Some(&instance) {
            tracing::info!(node, service = %instance.service, address = %instance.address, ?ttl, "instance registered");
            let touched = before
                .map(|b| b.service)
                .into_iter()
                .chain([instance.service])
                .chain(state.remote_service(node));
            self.publish(&state, touched);
        }
        // A new claim even for the same instance (a reconnection): a control plane
        // holding an older one yields the node.
        self.share(&state, [node]);
    }

    /// Renew `node`'s lease, if it holds one.
    pub fn renew(&self, node: &str, now: Instant) {
        if let Ok(mut state) = self.state.lock()
            && let Some(l) = state.leases.get_mut(node)
        {
            l.expires = now + l.ttl;
        }
    }

    /// Take `node`'s instance out now.
    pub fn deregister(&self, node: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(l) = state.remove_lease(node) {
            tracing::info!(node, service = %l.instance.service, address = %l.instance.address, "instance deregistered");
            let touched = [Some(l.instance.service), state.remote_service(node)];
            self.publish(&state, touched.into_iter().flatten());
            self.share(&state, [node]);
        }
    }

    /// Take out every instance whose lease ran out by `now`.
    fn expire(&self, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let expired: Vec<String> = state
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(node, _)| node.clone())
            .collect();
        let mut gone = Vec::new();
        for node in &expired {
            if let Some(l) = state.remove_lease(node) {
                tracing::warn!(node, service = %l.instance.service, address = %l.instance.address, ttl = ?l.ttl, "lease expired; instance removed");
                gone.push(l.instance.service);
                gone.extend(state.remote_service(node));
            }
        }
        if !gone.is_empty() {
            self.publish(&state, gone);
            self.share(&state, expired.iter().map(String::as_str));
        }
    }

    /// Take the records in a shared store as the other control planes'
    /// instances (JSON by node; this control plane's own are skipped).
    pub fn set_remote(&self, records: &BTreeMap<String, String>) {
        let remote: BTreeMap<String, Record> = records
            .iter()
            .filter_map(|(node, json)| match serde_json::from_str::<Record>(json) {
                Ok(r) if r.holder != self.id && r.node == *node => Some((node.clone(), r)),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(node, error = %e, "ignoring an unreadable registry record");
                    None
                }
            })
            .collect();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let old = state.set_remote(remote);
        let mut touched = BTreeSet::new();
        for (node, r) in old.iter().chain(state.remote.iter()) {
            if old.get(node) != state.remote.get(node) {
                touched.insert(r.service.clone());
            }
        }
        // A node claimed later elsewhere has moved there: its lease here lingers
        // only because its stream ended without a Deregister.
        let moved: Vec<String> = state
            .leases
            .iter()
            .filter(|(node, l)| {
                state
                    .remote
                    .get(*node)
                    .is_some_and(|r| r.claimed_at_ms > unix_ms(l.claimed_at))
            })
            .map(|(node, _)| node.clone())
            .collect();
        for node in &moved {
            if let Some(l) = state.remove_lease(node) {
                let holder = state.remote.get(node).map(|r| r.holder.as_str());
                tracing::info!(node, service = %l.instance.service, holder, "instance moved to another control plane; its lease here is dropped");
                touched.insert(l.instance.service);
                touched.extend(state.remote_service(node));
            }
        }
        if !touched.is_empty() {
            self.publish(&state, touched);
        }
        if !moved.is_empty() {
            self.share(&state, moved.iter().map(String::as_str));
        }
    }

    /// Publish a table in which `services` are rebuilt from `state`.
    fn publish(&self, state: &State, services: impl IntoIterator<Item = String>) {
        let mut table = (**self.table.borrow()).clone();
        for s in services {
            let list = state.instances(&s);
            if list.is_empty() {
                table.remove(&s);
            } else {
                table.insert(s, list.into());
            }
        }
        self.table.send_replace(Arc::new(table));
    }

    /// Offer this control plane's instances to the others: the records of `nodes`
    /// are written again (or dropped, for a node no longer held).
    fn share<'a>(&self, state: &State, nodes: impl IntoIterator<Item = &'a str>) {
        self.mine.send_modify(|mine| {
            for node in nodes {
                match state.leases.get(node) {
                    Some(l) => {
                        let json =
                            serde_json::to_string(&Record::of(&self.id, l)).unwrap_or_default();
                        mine.insert(node.to_string(), json);
                    }
                    None => {
                        mine.remove(node);
                    }
                }
            }
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Table> {
        self.table.subscribe()
    }

    /// This control plane's instances as records, each time they change.
    pub fn mine(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.mine.subscribe()
    }

    /// Every instance (of `service` only, if given), by service then address.
    pub fn list(&self, service: Option<&str>) -> Vec<InstanceStatus> {
        let now = Instant::now();
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        let own = state.leases.values().map(|l| {
            let expires_in = l.expires.saturating_duration_since(now).as_millis() as u64;
            Record::of(&self.id, l).status(Some(expires_in))
        });
        let theirs = state
            .remote
            .values()
            .filter(|r| !state.leases.contains_key(&r.node))
            .map(|r| r.clone().status(None));
        let mut out: Vec<InstanceStatus> = own
            .chain(theirs)
            .filter(|i| service.is_none_or(|s| s == i.service))
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

    /// The table as the registry was before the service index: every service
    /// rebuilt from every lease and record.
    fn rebuilt(r: &Registry) -> BTreeMap<String, Vec<pb::Instance>> {
        let Ok(state) = r.state.lock() else {
            return BTreeMap::new();
        };
        let own = state.leases.values().map(|l| l.instance.clone());
        let theirs = state
            .remote
            .iter()
            .filter(|(node, _)| !state.leases.contains_key(*node))
            .map(|(_, rec)| rec.instance());
        let mut table: BTreeMap<String, Vec<pb::Instance>> = BTreeMap::new();
        for i in own.chain(theirs) {
            table.entry(i.service.clone()).or_default().push(i);
        }
        for list in table.values_mut() {
            list.sort_by(|a, b| a.address.cmp(&b.address));
        }
        table
    }

    #[test]
    fn the_service_index_keeps_the_table_of_a_full_rebuild() {
        // A fixed pseudo-random walk of registrations (some moving a node to
        // another service), deregistrations, expiries and remote records.
        let (here, there) = (Registry::default(), Registry::default());
        let t0 = Instant::now();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for step in 0..3000u64 {
            let node = format!("n{}", next(12));
            let service = format!("s{}", next(4));
            let address = format!("127.0.0.1:{}", next(6));
            let now = t0 + Duration::from_millis(step);
            match next(6) {
                0 | 1 => here.register(
                    &node,
                    instance(&service, &address),
                    Duration::from_millis(40),
                    now,
                ),
                2 => there.register(&node, instance(&service, &address), DEFAULT_LEASE, now),
                3 => here.deregister(&node),
                4 => here.expire(now),
                _ => here.set_remote(&there.mine().borrow()),
            }
            let table: BTreeMap<String, Vec<pb::Instance>> = here
                .subscribe()
                .borrow()
                .iter()
                .map(|(s, l)| (s.clone(), l.to_vec()))
                .collect();
            assert_eq!(table, rebuilt(&here), "after step {step}");
            let Ok(state) = here.state.lock() else {
                panic!("poisoned")
            };
            let offered: Vec<String> = here.mine().borrow().keys().cloned().collect();
            assert_eq!(
                offered,
                state.leases.keys().cloned().collect::<Vec<_>>(),
                "after step {step}"
            );
        }
    }

    #[test]
    fn other_control_planes_instances_join_the_table_but_never_override_our_own() {
        let here = Registry::default();
        let there = Registry::default();
        let t0 = Instant::now();
        there.register("a", instance("orders", "127.0.0.1:9"), DEFAULT_LEASE, t0);
        here.register("a", instance("orders", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        there.register("b", instance("orders", "127.0.0.1:2"), DEFAULT_LEASE, t0);
        // What a shared store holds: every control plane's records.
        let mut store = here.mine().borrow().clone();
        store.extend(there.mine().borrow().clone());
        store.insert("bad".into(), "{not json".into());
        here.set_remote(&store);
        assert_eq!(
            addresses(&here, "orders"),
            ["127.0.0.1:1", "127.0.0.1:2"],
            "b joins; our own a wins over the other's"
        );
        let listed = here.list(Some("orders"));
        assert_eq!(listed[1].node, "b");
        assert_eq!(listed[1].expires_in_ms, None, "b's lease is kept elsewhere");
        // Nothing changed: the table is the same, so no stream sends anything.
        let before = here.subscribe().borrow().clone();
        here.set_remote(&store);
        assert!(changes(&before, &here.subscribe().borrow()).is_none());
        // b leaves the other control plane; our own record is never taken as remote.
        store.remove("b");
        here.set_remote(&store);
        assert_eq!(addresses(&here, "orders"), ["127.0.0.1:1"]);
        // The store holds the other's a (it wrote last): once ours is gone, that shows.
        here.deregister("a");
        assert_eq!(addresses(&here, "orders"), ["127.0.0.1:9"]);
        assert!(here.mine().borrow().is_empty());
    }

    #[test]
    fn a_node_claimed_later_elsewhere_has_moved_there() {
        let here = Registry::default();
        let there = Registry::default();
        let t0 = Instant::now();
        here.register("a", instance("orders", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        let ours = here.mine().borrow()["a"].clone();
        // Claims are compared in milliseconds.
        std::thread::sleep(Duration::from_millis(2));
        there.register("a", instance("orders", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        let theirs = there.mine().borrow()["a"].clone();
        assert!(claimed_later(&theirs, &ours));
        assert!(!claimed_later(&ours, &theirs));
        assert!(!claimed_later(&ours, &ours), "a control plane's own record");
        assert!(!claimed_later("{not json", &ours));
        // The proxy said Hello there after here: here's lease only lingered.
        here.set_remote(&BTreeMap::from([("a".to_string(), theirs.clone())]));
        assert!(here.mine().borrow().is_empty(), "here no longer offers a");
        let listed = here.list(Some("orders"));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].expires_in_ms, None, "a's lease is kept there now");
        // It comes back: the new Hello here is the later claim, and there yields.
        std::thread::sleep(Duration::from_millis(2));
        here.register("a", instance("orders", "127.0.0.1:1"), DEFAULT_LEASE, t0);
        there.set_remote(&here.mine().borrow());
        assert!(there.mine().borrow().is_empty());
        here.set_remote(&BTreeMap::from([("a".to_string(), theirs)]));
        assert_eq!(
            here.mine().borrow().len(),
            1,
            "an older claim changes nothing"
        );
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
