use crate::balancer::{HashOn, LbPolicy, Ring};
use crate::health::{self, Health, HealthCheckConfig, Observed, OutlierConfig, Verdict};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which endpoints a subset holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Endpoints carrying every label pair.
    Labels(BTreeMap<String, String>),
    /// Endpoints matching none of these label sets: the baseline of a split.
    NoneOf(Vec<BTreeMap<String, String>>),
}

impl Selector {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let has =
            |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| labels.get(k) == Some(v));
        match self {
            Self::Labels(sel) => has(sel),
            Self::NoneOf(sels) => !sels.iter().any(has),
        }
    }
}

/// One upstream address.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
    /// `ip:port`, precomputed for the upstream URI.
    pub authority: http::uri::Authority,
    in_flight: Arc<AtomicU32>,
    /// Kept across endpoint-set rebuilds, like `in_flight`.
    pub health: Arc<Health>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, weight: u32, labels: BTreeMap<String, String>) -> Self {
        let authority = http::uri::Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
        Self {
            addr,
            weight: weight.max(1),
            labels,
            authority,
            in_flight: Arc::new(AtomicU32::new(0)),
            health: Arc::default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request against its endpoint until dropped (least-request input).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoint chosen for one try.
#[derive(Debug)]
pub struct Picked {
    pub endpoint: Arc<Endpoint>,
    _in_flight: InFlight,
}

#[derive(Debug, Default)]
struct Group {
    /// The usable endpoints, or all of them in panic mode.
    members: Vec<usize>,
    /// Too few endpoints are usable, so health is ignored and all take traffic.
    panic: bool,
    /// Smooth weighted round-robin order over `members` positions.
    sequence: Vec<u32>,
    /// Cumulative weights, for weighted random picks.
    cumulative: Vec<u64>,
    ring: Ring,
}

impl Group {
    /// Balance over the usable `members`; when fewer than `panic_threshold` percent
    /// of them are usable (or none is), over all of them: Envoy's panic mode, where
    /// spreading load over doubtful endpoints beats overloading the few left.
    fn build(
        endpoints: &[Arc<Endpoint>],
        mut members: Vec<usize>,
        policy: LbPolicy,
        panic_threshold: u8,
    ) -> Self {
        let total = members.len();
        let usable = members
            .iter()
            .filter(|&&i| endpoints[i].health.usable())
            .count();
        let panic =
            total > 0 && (usable == 0 || usable * 100 < total * usize::from(panic_threshold));
        if !panic && usable < total {
            members.retain(|&i| endpoints[i].health.usable());
        }
        let weights: Vec<u32> = members.iter().map(|&i| endpoints[i].weight).collect();
        let mut cumulative = Vec::with_capacity(weights.len());
        let mut total = 0u64;
        for w in &weights {
            total += u64::from(*w);
            cumulative.push(total);
        }
        let ring = if policy == LbPolicy::RingHash {
            let keyed: Vec<(String, u32)> = members
                .iter()
                .map(|&i| (endpoints[i].addr.to_string(), endpoints[i].weight))
                .collect();
            Ring::build(&keyed)
        } else {
            Ring::default()
        };
        Self {
            sequence: smooth_wrr(&weights),
            members,
            panic,
            cumulative,
            ring,
        }
    }

    fn weighted_random(&self) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let r = fastrand::u64(..total);
        let pos = self.cumulative.partition_point(|&c| c <= r);
        self.members.get(pos).copied()
    }
}

/// nginx's smooth weighted round-robin, unrolled once into a fixed order so picking
/// is one atomic increment. Long sequences (huge weights) are capped.
fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    const CAP: u64 = 4096;
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scale = total.div_ceil(CAP).max(1);
    let w: Vec<i64> = weights
        .iter()
        .map(|x| (u64::from(*x) / scale).max(1) as i64)
        .collect();
    let sum: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        seq.push(best as u32);
    }
    seq
}

/// The endpoint label that puts an endpoint in a lane (full-link grey release):
/// only requests tagged with that lane reach it.
pub const LANE_LABEL: &str = "lane";

/// All endpoints of a cluster plus the groups balancing is done over: the baseline
/// (every endpoint without a `lane` label), one group per label selector that some
/// Api's `split` uses (within the baseline), and one per lane.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    all: Group,
    subsets: Vec<Group>,
    lanes: Vec<(Box<str>, Group)>,
}

impl EndpointSet {
    fn build(
        endpoints: Vec<Arc<Endpoint>>,
        selectors: &[Selector],
        policy: LbPolicy,
        panic_threshold: u8,
    ) -> Self {
        let lane = |i: usize| endpoints[i].labels.get(LANE_LABEL);
        let baseline: Vec<usize> = (0..endpoints.len())
            .filter(|&i| lane(i).is_none())
            .collect();
        let mut names: Vec<&String> = (0..endpoints.len()).filter_map(lane).collect();
        names.sort();
        names.dedup();
        let lanes = names
            .into_iter()
            .map(|name| {
                let members = (0..endpoints.len())
                    .filter(|&i| lane(i) == Some(name))
                    .collect();
                let group = Group::build(&endpoints, members, policy, panic_threshold);
                (name.as_str().into(), group)
            })
            .collect();
        let subsets = selectors
            .iter()
            .map(|sel| {
                let members = baseline
                    .iter()
                    .copied()
                    .filter(|&i| sel.matches(&endpoints[i].labels))
                    .collect();
                Group::build(&endpoints, members, policy, panic_threshold)
            })
            .collect();
        let all = Group::build(&endpoints, baseline, policy, panic_threshold);
        Self {
            endpoints,
            all,
            subsets,
            lanes,
        }
    }

    /// Too few endpoints are usable, so all of them take traffic.
    pub fn panic(&self) -> bool {
        self.all.panic
    }
}

/// An upstream cluster: its endpoint set (swapped whole when discovery changes it) and
/// the balancer state that must outlive a swap.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub policy: LbPolicy,
    pub hash_on: Option<HashOn>,
    selectors: Vec<Selector>,
    outlier: Option<OutlierConfig>,
    panic_threshold: u8,
    set: ArcSwap<EndpointSet>,
    /// Serialises set replacements (discovery, ejections, health changes) so none
    /// is lost to another built from an older set.
    writer: Mutex<()>,
    cursor: AtomicUsize,
}

/// Envoy's default: below half the endpoints usable, use them all.
pub const DEFAULT_PANIC_THRESHOLD: u8 = 50;

impl Cluster {
    pub fn new(
        name: impl Into<String>,
        policy: LbPolicy,
        hash_on: Option<HashOn>,
        selectors: Vec<Selector>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        let eps = endpoints.into_iter().map(Arc::new).collect();
        let set = EndpointSet::build(eps, &selectors, policy, DEFAULT_PANIC_THRESHOLD);
        Self {
            name: name.into(),
            policy,
            hash_on,
            selectors,
            outlier: None,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            set: ArcSwap::from_pointee(set),
            writer: Mutex::new(()),
            cursor: AtomicUsize::new(fastrand::usize(..1024)),
        }
    }

    /// Turn on outlier detection and set the panic threshold (percent).
    pub fn with_health(mut self, outlier: Option<OutlierConfig>, panic_threshold: u8) -> Self {
        self.outlier = outlier;
        self.panic_threshold = panic_threshold;
        let eps = self.set.load().endpoints.clone();
        self.set = ArcSwap::from_pointee(EndpointSet::build(
            eps,
            &self.selectors,
            self.policy,
            panic_threshold,
        ));
        self
    }

    pub fn outlier(&self) -> Option<&OutlierConfig> {
        self.outlier.as_ref()
    }

    fn store(&self, endpoints: Vec<Arc<Endpoint>>) {
        self.set.store(Arc::new(EndpointSet::build(
            endpoints,
            &self.selectors,
            self.policy,
            self.panic_threshold,
        )));
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tell outlier detection how a try on `endpoint` ended. When this ejects the
    /// endpoint, returns when the ejection ends: call [`Cluster::restore_due`] then.
    pub fn observe(&self, endpoint: &Endpoint, o: Observed, now: Instant) -> Option<Instant> {
        let cfg = self.outlier.as_ref()?;
        if endpoint.health.observe(o, cfg) != Verdict::Eject {
            return None;
        }
        let _w = self.writer();
        let set = self.set.load();
        let ejected = set.endpoints.iter().filter(|e| e.health.ejected()).count();
        if endpoint.health.ejected()
            || !health::may_eject(set.endpoints.len(), ejected, cfg.max_ejection_percent)
        {
            return None;
        }
        let until = endpoint.health.eject(now, cfg);
        self.store(set.endpoints.clone());
        Some(until)
    }

    /// Return ejected endpoints whose time is up; the end of the next ejection still
    /// running, if any.
    pub fn restore_due(&self, now: Instant) -> Option<Instant> {
        let _w = self.writer();
        let set = self.set.load();
        let mut back = false;
        for e in &set.endpoints {
            back |= e.health.restore_if_due(now);
        }
        if back {
            self.store(set.endpoints.clone());
        }
        set.endpoints
            .iter()
            .filter_map(|e| e.health.ejected_until())
            .min()
    }

    /// Count an active health check of `endpoint`; its new state when this changed it.
    pub fn checked(
        &self,
        endpoint: &Endpoint,
        result: Result<(), String>,
        cfg: &HealthCheckConfig,
    ) -> Option<bool> {
        let change = endpoint.health.checked(result, cfg);
        if change.is_some() {
            let _w = self.writer();
            self.store(self.set.load().endpoints.clone());
        }
        change
    }

    /// Replace the endpoints (DNS refresh, registry change). Endpoints that stay keep
    /// their in-flight counters and health.
    pub fn update(&self, endpoints: Vec<Endpoint>) {
        let _w = self.writer();
        let old = self.set.load();
        let eps = endpoints
            .into_iter()
            .map(|mut e| {
                if let Some(prev) = old.endpoints.iter().find(|p| p.addr == e.addr) {
                    e.in_flight = prev.in_flight.clone();
                    e.health = prev.health.clone();
                }
                Arc::new(e)
            })
            .collect();
        self.store(eps);
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Whether some endpoint is in a lane (then requests' lane tags matter).
    pub fn has_lanes(&self) -> bool {
        !self.set.load().lanes.is_empty()
    }

    /// Pick an endpoint: from `lane`'s endpoints when the request is tagged with a
    /// lane that has some; otherwise from the baseline, or a subset of it (index
    /// into the selectors given at construction). An empty subset falls back to the
    /// baseline, so a grey release with no matching endpoints degrades instead of
    /// failing. `avoid` steers a retry away from the endpoint that just failed when
    /// possible.
    pub fn pick(
        &self,
        subset: Option<usize>,
        hash: Option<u64>,
        avoid: Option<SocketAddr>,
        lane: Option<&str>,
    ) -> Option<Picked> {
        let set = self.set.load();
        let in_lane = lane.and_then(|l| set.lanes.iter().find(|(n, _)| **n == *l));
        let group = match (in_lane, subset.and_then(|s| set.subsets.get(s))) {
            (Some((_, g)), _) if !g.members.is_empty() => g,
            (_, Some(g)) if !g.members.is_empty() => g,
            _ => &set.all,
        };
        let mut idx = self.choose(&set, group, hash)?;
        if avoid == Some(set.endpoints[idx].addr) && group.members.len() > 1 {
            let pos = group.members.iter().position(|&m| m == idx).unwrap_or(0);
            idx = group.members[(pos + 1) % group.members.len()];
        }
        let endpoint = set.endpoints[idx].clone();
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(endpoint.in_flight.clone());
        Some(Picked {
            endpoint,
            _in_flight: guard,
        })
    }

    fn choose(&self, set: &EndpointSet, group: &Group, hash: Option<u64>) -> Option<usize> {
        let n = group.members.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return Some(group.members[0]);
        }
        match self.policy {
            LbPolicy::RoundRobin => {
                let i = self.cursor.fetch_add(1, Ordering::Relaxed) % group.sequence.len().max(1);
                let pos = *group.sequence.get(i)? as usize;
                group.members.get(pos).copied()
            }
            LbPolicy::Random => group.weighted_random(),
            LbPolicy::LeastRequest => {
                // Power of two choices, weighted: compare in_flight / weight.
                let a = group.weighted_random()?;
                let b = group.weighted_random()?;
                let load = |i: usize| {
                    let e = &set.endpoints[i];
                    (u64::from(e.in_flight()) + 1) * 1_000_000 / u64::from(e.weight)
                };
                Some(if load(b) < load(a) { b } else { a })
            }
            LbPolicy::RingHash => match hash {
                Some(h) => group
                    .ring
                    .lookup(h)
                    .and_then(|p| group.members.get(p).copied()),
                None => group.weighted_random(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
