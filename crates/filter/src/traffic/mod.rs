//! Traffic-control filters and the state they keep across config snapshots.
//!
//! A snapshot's filters are rebuilt on every reload, but a limit that restarted from
//! a full bucket on each reload would be a free burst. So limiter state lives in a
//! process-wide registry keyed by the filter's identity — where it is written
//! (`Api/orders spec.filters.1`) and its config — and a rebuilt filter with the same
//! identity picks up the same state. Entries go when no snapshot uses them.

mod cache;
mod concurrency;
mod fault;
mod gcra;
mod mirror;
mod quota;
mod rate_limit;
mod redis;

pub(crate) use cache::Cache;
pub(crate) use concurrency::ConcurrencyLimit;
pub(crate) use fault::Fault;
pub(crate) use mirror::Mirror;
pub(crate) use quota::Quota;
pub(crate) use rate_limit::RateLimit;

use rate_limit::LocalBuckets;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

/// Add `item` to a list-valued header (`RateLimit-Policy`, `RateLimit`), so that
/// `rate-limit` and `quota` on one Api both show.
pub(super) fn append_item(
    headers: &mut http::HeaderMap,
    name: http::HeaderName,
    item: http::HeaderValue,
) {
    let joined = headers.get(&name).and_then(|prev| {
        let mut v = prev.as_bytes().to_vec();
        v.extend_from_slice(b", ");
        v.extend_from_slice(item.as_bytes());
        http::HeaderValue::from_bytes(&v).ok()
    });
    headers.insert(name, joined.unwrap_or(item));
}

/// Which kind of filter a registry entry is, for its metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RateLimit,
    Concurrency,
    Cache,
    Fault,
    Quota,
    Mirror,
}

/// How a kind's counters appear in metrics.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The family under `meshgate_`.
    pub name: &'static str,
    pub help: &'static str,
    /// The label that names the filter (where it is written).
    pub label: &'static str,
    /// The `result` label of each counter, by index.
    pub results: &'static [&'static str],
}

impl Kind {
    pub const ALL: [Self; 6] = [
        Self::RateLimit,
        Self::Concurrency,
        Self::Cache,
        Self::Fault,
        Self::Quota,
        Self::Mirror,
    ];

    pub fn metric(self) -> Metric {
        match self {
            Self::RateLimit => Metric {
                name: "rate_limit_decisions",
                help: "Rate-limit decisions by limiter (where the filter is written) and result",
                label: "limiter",
                results: &["allowed", "limited", "failed_open", "failed_closed"],
            },
            Self::Concurrency => Metric {
                name: "concurrency_limit_decisions",
                help: "Concurrency-limit decisions by limiter (where the filter is written) and result",
                label: "limiter",
                results: &["admitted", "queued", "rejected", "isolated"],
            },
            Self::Cache => Metric {
                name: "cache_lookups",
                help: "Response-cache lookups by cache (where the filter is written) and result",
                label: "cache",
                results: &["hit", "miss", "bypass"],
            },
            Self::Fault => Metric {
                name: "fault_injections",
                help: "Faults injected by fault filter (where it is written) and kind",
                label: "fault",
                results: &["delayed", "aborted"],
            },
            Self::Quota => Metric {
                name: "quota_decisions",
                help: "Quota decisions by quota filter (where it is written) and result",
                label: "quota",
                results: &["admitted", "exceeded", "failed_open", "failed_closed"],
            },
            Self::Mirror => Metric {
                name: "mirror_requests",
                help: "Mirrored copies by mirror filter (where it is written) and result",
                label: "mirror",
                results: &["answered", "failed", "skipped", "dropped"],
            },
        }
    }
}

/// Decision counts of one limiter, indexed as [`Kind::metric`] names them.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU64; 4],
}

impl Counters {
    fn record(&self, i: usize) {
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, i: usize) -> u64 {
        self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// One live limiter, as the metrics endpoint shows it.
#[derive(Debug)]
pub struct LimiterStats {
    pub site: String,
    pub kind: Kind,
    pub counters: Arc<Counters>,
    /// Requests holding a slot now (concurrency limiters).
    pub in_flight: Option<u64>,
    /// Apis a concurrency limiter holds to their share now, being slow.
    pub isolated: Vec<Arc<str>>,
}

/// The state one filter identity owns.
#[derive(Debug)]
struct SharedState {
    id: String,
    site: String,
    kind: Kind,
    counters: Arc<Counters>,
    buckets: Mutex<Option<Arc<LocalBuckets>>>,
    slots: Mutex<Option<Arc<concurrency::Slots>>>,
    cache: Mutex<Option<Arc<cache::Store>>>,
}

impl SharedState {
    fn id(&self) -> &str {
        &self.id
    }

    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn slots(&self, max: usize) -> Arc<concurrency::Slots> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.get_or_insert_with(|| Arc::new(concurrency::Slots::new(max)))
            .clone()
    }

    fn cache(&self, max_entries: u64, max_bytes: u64) -> Arc<cache::Store> {
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.get_or_insert_with(|| Arc::new(cache::Store::new(max_entries, max_bytes)))
            .clone()
    }

    fn buckets(&self, max_keys: usize) -> Arc<LocalBuckets> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        b.get_or_insert_with(|| Arc::new(LocalBuckets::new(max_keys)))
            .clone()
    }
}

type Registry = Mutex<HashMap<String, Weak<SharedState>>>;

static REGISTRY: LazyLock<Registry> = LazyLock::new(Default::default);

/// The state for the filter written at `site` with this config (created or reused).
fn shared_state(site: &str, kind: Kind, config: &serde_json::Value) -> Arc<SharedState> {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{site}\n{config}").as_bytes(),
    );
    let id: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reg.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = reg.get(&id).and_then(Weak::upgrade) {
        return s;
    }
    let s = Arc::new(SharedState {
        id: id.clone(),
        site: site.to_string(),
        kind,
        counters: Arc::default(),
        buckets: Mutex::new(None),
        slots: Mutex::new(None),
        cache: Mutex::new(None),
    });
    reg.insert(id, Arc::downgrade(&s));
    s
}

/// Every live limiter's site and decision counts, for the metrics endpoint.
pub fn limiter_stats() -> Vec<LimiterStats> {
    let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<LimiterStats> = reg
        .values()
        .filter_map(Weak::upgrade)
        .map(|s| LimiterStats {
            site: s.site.clone(),
            kind: s.kind,
            counters: s.counters.clone(),
            in_flight: s
                .slots
                .lock()
                .ok()
                .and_then(|sl| sl.as_ref().map(|sl| sl.in_flight())),
            isolated: s
                .slots
                .lock()
                .ok()
                .and_then(|sl| sl.as_ref().map(|sl| sl.slow_apis()))
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| a.site.cmp(&b.site));
    out
}
