//! Traffic-control filters and the state they keep across config snapshots.
//!
//! A snapshot's filters are rebuilt on every reload, but a limit that restarted from
//! a full bucket on each reload would be a free burst. So limiter state lives in a
//! process-wide registry keyed by the filter's identity — where it is written
//! (`Api/orders spec.filters.1`) and its config — and a rebuilt filter with the same
//! identity picks up the same state. Entries go when no snapshot uses them.

mod gcra;
mod rate_limit;

pub use rate_limit::RateLimit;

use rate_limit::LocalBuckets;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

/// What became of one request at a limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Limited,
    /// The shared store was unreachable and `failMode: open` let the request on.
    FailedOpen,
    /// The shared store was unreachable and `failMode: closed` refused it.
    FailedClosed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Self::Allowed,
        Self::Limited,
        Self::FailedOpen,
        Self::FailedClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Limited => "limited",
            Self::FailedOpen => "failed_open",
            Self::FailedClosed => "failed_closed",
        }
    }
}

/// Decisions of one limiter, for `meshgate_rate_limit_decisions_total`.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicU64; 4],
}

impl Counters {
    fn record(&self, o: Outcome) {
        self.counts[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.counts[o as usize].load(Ordering::Relaxed)
    }
}

/// The state one filter identity owns.
#[derive(Debug)]
struct SharedState {
    id: String,
    site: String,
    counters: Arc<Counters>,
    buckets: Mutex<Option<Arc<LocalBuckets>>>,
}

impl SharedState {
    fn id(&self) -> &str {
        &self.id
    }

    fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
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
fn shared_state(site: &str, config: &serde_json::Value) -> Arc<SharedState> {
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
        counters: Arc::default(),
        buckets: Mutex::new(None),
    });
    reg.insert(id, Arc::downgrade(&s));
    s
}

/// Every live limiter's site and decision counts, for the metrics endpoint.
pub fn rate_limit_stats() -> Vec<(String, Arc<Counters>)> {
    let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<(String, Arc<Counters>)> = reg
        .values()
        .filter_map(Weak::upgrade)
        .map(|s| (s.site.clone(), s.counters.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
