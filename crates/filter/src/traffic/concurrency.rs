//! `concurrency-limit`: a bulkhead. At most `max` requests through this filter are
//! in flight in this proxy at once — from the filter until the response body has been
//! sent — so one slow or hot Api cannot take every connection and task. Requests over
//! the limit wait in a short bounded queue, or get 503 at once.
//!
//! With `isolation`, one limit shared by many Apis (a gateway Policy) also watches
//! each Api's latency: an Api whose recent latency rises far above its own normal
//! level is marked slow and may hold only `maxShare` of the slots until it recovers,
//! so its stuck requests cannot take the capacity the other Apis need.

use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, FilterResult, Flow, Step};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    max: usize,
    #[serde(default)]
    queue: Option<QueueConfig>,
    #[serde(default)]
    isolation: Option<IsolationConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct IsolationConfig {
    #[serde(default = "default_slowdown")]
    slowdown: f64,
    #[serde(default)]
    min_latency: Option<String>,
    #[serde(default = "default_max_share")]
    max_share: f64,
}

fn default_slowdown() -> f64 {
    5.0
}

fn default_max_share() -> f64 {
    20.0
}

/// How slow Apis are told apart, and how much of the limit one may hold.
#[derive(Debug, Clone, Copy)]
pub(super) struct Isolation {
    /// Slow when recent latency is this many times the Api's normal latency...
    slowdown: f64,
    /// ...and at least this (µs): fast Apis getting a little slower are no concern.
    min_latency_us: f64,
    /// Slots a slow Api may hold.
    cap: usize,
}

/// Samples an Api needs before its normal latency is trusted.
const WARMUP: u32 = 20;
/// Weight of each new sample in the recent latency (reacts within a few requests)...
const RECENT_WEIGHT: f64 = 0.2;
/// ...and in the normal latency (moves slowly, and ten times slower still while the
/// Api is slow, so an incident does not become the new normal within minutes).
const NORMAL_WEIGHT: f64 = 0.01;

/// One Api's latency as the limiter sees it (µs, exponentially weighted).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Latency {
    samples: u32,
    normal: f64,
    recent: f64,
    slow: bool,
}

impl Latency {
    /// Add one request's latency; returns the new slow flag when it changed.
    pub(super) fn observe(&mut self, us: f64, iso: &Isolation) -> Option<bool> {
        if self.samples == 0 {
            self.normal = us;
            self.recent = us;
        }
        self.samples = self.samples.saturating_add(1);
        self.recent += RECENT_WEIGHT * (us - self.recent);
        let w = if self.slow {
            NORMAL_WEIGHT / 10.0
        } else {
            NORMAL_WEIGHT
        };
        self.normal += w * (us - self.normal);
        if self.samples < WARMUP {
            return None;
        }
        let slow = if self.slow {
            // Recover at half the threshold, so a borderline Api does not flap.
            self.recent >= iso.min_latency_us && self.recent >= iso.slowdown / 2.0 * self.normal
        } else {
            self.recent >= iso.min_latency_us && self.recent >= iso.slowdown * self.normal
        };
        (slow != self.slow).then(|| {
            self.slow = slow;
            slow
        })
    }
}

/// One Api's share of a limiter with isolation.
#[derive(Debug, Default)]
pub(super) struct ApiLoad {
    in_flight: AtomicUsize,
    slow: std::sync::atomic::AtomicBool,
    latency: Mutex<Latency>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct QueueConfig {
    size: usize,
    #[serde(default)]
    timeout: Option<String>,
}

/// The slots of one limiter; shared by every snapshot that builds the same filter, so
/// a reload neither frees the slots in-flight requests hold nor doubles the limit.
#[derive(Debug)]
pub(super) struct Slots {
    sem: Arc<Semaphore>,
    max: usize,
    waiting: AtomicUsize,
    /// Per Api, with isolation only.
    apis: Mutex<HashMap<Arc<str>, Arc<ApiLoad>>>,
}

impl Slots {
    pub(super) fn new(max: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
            waiting: AtomicUsize::new(0),
            apis: Mutex::default(),
        }
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.max.saturating_sub(self.sem.available_permits()) as u64
    }

    fn api(&self, name: &Arc<str>) -> Arc<ApiLoad> {
        let mut apis = self.apis.lock().unwrap_or_else(|e| e.into_inner());
        apis.entry(name.clone()).or_default().clone()
    }

    /// The Apis marked slow now, for metrics.
    pub(super) fn slow_apis(&self) -> Vec<Arc<str>> {
        let apis = self.apis.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = apis
            .iter()
            .filter(|(_, l)| l.slow.load(Ordering::Relaxed))
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }
}

/// A held slot, kept in the request context: it is released when the request is
/// complete (the context is dropped after the response body has been sent).
#[derive(Debug, Clone)]
struct Held(Arc<HeldSlot>);

#[derive(Debug)]
struct HeldSlot {
    _permit: OwnedSemaphorePermit,
    /// The Api's share and when the request was admitted, with isolation.
    load: Option<(Arc<ApiLoad>, Instant)>,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        if let Some((load, _)) = &self.load {
            load.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Admitted = 0,
    Queued = 1,
    Rejected = 2,
    /// Refused because a slow Api holds its whole share.
    Isolated = 3,
}

#[derive(Debug)]
pub struct ConcurrencyLimit {
    slots: Arc<Slots>,
    isolation: Option<Isolation>,
    queue: usize,
    queue_timeout: Duration,
    counters: Arc<Counters>,
    _state: Arc<super::SharedState>,
}

impl ConcurrencyLimit {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if cfg.max == 0 || cfg.max > Semaphore::MAX_PERMITS {
            return Err(BuildError::new("config.max", "must be at least 1"));
        }
        let (queue, queue_timeout) = match &cfg.queue {
            None => (0, Duration::ZERO),
            Some(q) => (
                q.size,
                crate::duration_or(
                    "config.queue.timeout",
                    q.timeout.as_deref(),
                    Duration::from_millis(100),
                )?,
            ),
        };
        let isolation = cfg
            .isolation
            .as_ref()
            .map(|i| isolation(i, cfg.max))
            .transpose()?;
        let state = shared_state(ctx.site, Kind::Concurrency, value);
        Ok(Self {
            slots: state.slots(cfg.max),
            isolation,
            queue,
            queue_timeout,
            counters: state.counters(),
            _state: state,
        })
    }

    fn full(&self) -> GatewayError {
        self.counters.record(Outcome::Rejected as usize);
        GatewayError::new(
            ErrorCode::ConcurrencyLimited,
            format!(
                "more than {} requests to this API are in flight",
                self.slots.max
            ),
        )
        .retry_safe()
    }

    fn admit(
        &self,
        ctx: &mut RequestCtx,
        permit: OwnedSemaphorePermit,
        o: Outcome,
        load: Option<Arc<ApiLoad>>,
    ) -> FilterResult {
        self.counters.record(o as usize);
        let load = load.map(|l| {
            l.in_flight.fetch_add(1, Ordering::AcqRel);
            (l, Instant::now())
        });
        ctx.extensions.insert(Held(Arc::new(HeldSlot {
            _permit: permit,
            load,
        })));
        Ok(Flow::Continue)
    }

    /// The Api's share, when isolation is on; refused when the Api is slow and
    /// already holds its cap.
    fn share(&self, ctx: &RequestCtx) -> Result<Option<Arc<ApiLoad>>, GatewayError> {
        let (Some(iso), Some(api)) = (&self.isolation, &ctx.api) else {
            return Ok(None);
        };
        let load = self.slots.api(api);
        if load.slow.load(Ordering::Relaxed) && load.in_flight.load(Ordering::Acquire) >= iso.cap {
            self.counters.record(Outcome::Isolated as usize);
            return Err(GatewayError::new(
                ErrorCode::ConcurrencyLimited,
                format!(
                    "API {api:?} is answering far slower than usual; it may hold only {} of this limit's {} slots until it recovers",
                    iso.cap, self.slots.max
                ),
            )
            .retry_safe());
        }
        Ok(Some(load))
    }

    async fn wait(&self, ctx: &mut RequestCtx, load: Option<Arc<ApiLoad>>) -> FilterResult {
        let acquired =
            tokio::time::timeout(self.queue_timeout, self.slots.sem.clone().acquire_owned()).await;
        self.slots.waiting.fetch_sub(1, Ordering::AcqRel);
        match acquired {
            Ok(Ok(permit)) => self.admit(ctx, permit, Outcome::Queued, load),
            _ => Err(self.full()),
        }
    }
}

impl Filter for ConcurrencyLimit {
    fn name(&self) -> &'static str {
        "concurrency-limit"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        _req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let load = match self.share(ctx) {
            Ok(l) => l,
            Err(e) => return Step::Done(Err(e)),
        };
        if let Ok(permit) = self.slots.sem.clone().try_acquire_owned() {
            return Step::Done(self.admit(ctx, permit, Outcome::Admitted, load));
        }
        let queued = self
            .slots
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.queue).then_some(w + 1)
            })
            .is_ok();
        if !queued {
            return Step::Done(Err(self.full()));
        }
        Step::Pending(Box::pin(self.wait(ctx, load)))
    }

    fn on_complete(&self, ctx: &RequestCtx, _status: http::StatusCode) {
        let (Some(iso), Some(Held(held)), Some(api)) =
            (&self.isolation, ctx.extensions.get::<Held>(), &ctx.api)
        else {
            return;
        };
        let Some((load, since)) = &held.load else {
            return;
        };
        let us = since.elapsed().as_secs_f64() * 1e6;
        let (changed, latency) = {
            let mut l = load.latency.lock().unwrap_or_else(|e| e.into_inner());
            (l.observe(us, iso), *l)
        };
        if let Some(slow) = changed {
            load.slow.store(slow, Ordering::Relaxed);
            let (recent_ms, normal_ms) = (latency.recent / 1e3, latency.normal / 1e3);
            if slow {
                tracing::warn!(
                    api = &**api,
                    recent_ms,
                    normal_ms,
                    cap = iso.cap,
                    "slow API isolated: its share of the concurrency limit is capped"
                );
            } else {
                tracing::info!(
                    api = &**api,
                    recent_ms,
                    normal_ms,
                    "API recovered: no longer isolated"
                );
            }
        }
    }
}

fn isolation(i: &IsolationConfig, max: usize) -> Result<Isolation, BuildError> {
    if !(i.slowdown.is_finite() && i.slowdown >= 2.0) {
        return Err(BuildError::new(
            "config.isolation.slowdown",
            "a factor of at least 2 (recent latency over normal latency)",
        ));
    }
    if !(i.max_share > 0.0 && i.max_share < 100.0) {
        return Err(BuildError::new(
            "config.isolation.maxShare",
            "a percentage above 0 and below 100",
        ));
    }
    let min = crate::duration_or(
        "config.isolation.minLatency",
        i.min_latency.as_deref(),
        Duration::from_millis(50),
    )?;
    Ok(Isolation {
        slowdown: i.slowdown,
        min_latency_us: min.as_secs_f64() * 1e6,
        cap: ((max as f64 * i.max_share / 100.0).floor() as usize).max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::RequestId;

    fn filter(config: serde_json::Value, site: &str) -> ConcurrencyLimit {
        let consumers = Arc::new(crate::ConsumerSet::default());
        let ctx = BuildCtx {
            captures: &[],
            consumers: &consumers,
            base: None,
            site,
            services: &Default::default(),
        };
        ConcurrencyLimit::from_config(&config, ctx).unwrap_or_else(|e| panic!("{e}"))
    }

    fn request() -> (RequestCtx, http::request::Parts) {
        let ctx = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
        (ctx, http::Request::new(()).into_parts().0)
    }

    async fn run(f: &ConcurrencyLimit) -> Result<RequestCtx, ErrorCode> {
        let (mut ctx, mut parts) = request();
        let r = match f.on_request(&mut ctx, &mut parts) {
            Step::Done(r) => r,
            Step::Pending(p) => p.await,
        };
        r.map(|_| ctx).map_err(|e| e.code)
    }

    #[tokio::test]
    async fn slots_are_held_until_the_request_is_done() {
        let f = filter(serde_json::json!({"max": 2}), "test slots");
        let a = run(&f).await;
        let b = run(&f).await;
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(run(&f).await.err(), Some(ErrorCode::ConcurrencyLimited));
        assert_eq!(f.slots.in_flight(), 2);
        drop(a);
        assert!(run(&f).await.is_ok(), "a finished request frees its slot");
    }

    #[tokio::test]
    async fn the_queue_waits_for_a_slot_then_times_out() {
        let f = filter(
            serde_json::json!({"max": 1, "queue": {"size": 1, "timeout": "200ms"}}),
            "test queue",
        );
        let held = run(&f).await;
        assert!(held.is_ok());
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        });
        assert!(
            run(&f).await.is_ok(),
            "the queued request got the freed slot"
        );
        release.await.unwrap_or_else(|e| panic!("{e}"));
        // Now the slot is held by the (dropped) queued request's context: free again.
        let held = run(&f).await;
        let start = std::time::Instant::now();
        assert_eq!(run(&f).await.err(), Some(ErrorCode::ConcurrencyLimited));
        assert!(start.elapsed() >= Duration::from_millis(200));
        drop(held);
    }

    const ISO: Isolation = Isolation {
        slowdown: 5.0,
        min_latency_us: 50_000.0,
        cap: 2,
    };

    #[test]
    fn an_api_is_slow_when_recent_latency_is_far_above_its_normal_and_recovers() {
        let mut l = Latency::default();
        // Warm-up at 20 ms: normal, and no verdict before 20 samples.
        for _ in 0..WARMUP {
            assert_eq!(l.observe(20_000.0, &ISO), None);
        }
        // Twice as slow is not slow; 400 ms is, within a few requests.
        for _ in 0..20 {
            assert_eq!(l.observe(40_000.0, &ISO), None);
        }
        let turned = (0..10).position(|_| l.observe(400_000.0, &ISO) == Some(true));
        assert!(matches!(turned, Some(n) if n <= 5), "{turned:?} {l:?}");
        // The normal level barely moved during the incident.
        assert!(l.normal < 40_000.0, "{l:?}");
        let back = (0..30).position(|_| l.observe(20_000.0, &ISO) == Some(false));
        assert!(back.is_some(), "{l:?}");
        // A fast Api ten times slower but still under minLatency is not slow.
        let mut fast = Latency::default();
        for _ in 0..WARMUP {
            fast.observe(1_000.0, &ISO);
        }
        assert!((0..50).all(|_| fast.observe(10_000.0, &ISO).is_none()));
    }

    #[tokio::test]
    async fn a_slow_api_holds_at_most_its_share_while_others_use_the_rest() {
        let f = filter(
            serde_json::json!({"max": 10, "isolation": {"maxShare": 20}}),
            "test isolation",
        );
        let named = |api: &str| {
            let (mut ctx, _) = request();
            ctx.api = Some(api.into());
            ctx
        };
        let admit = |api: &str| {
            let mut ctx = named(api);
            let mut parts = http::Request::new(()).into_parts().0;
            let verdict = match f.on_request(&mut ctx, &mut parts) {
                Step::Done(Ok(_)) => Ok(()),
                Step::Done(Err(e)) => Err(e.message),
                Step::Pending(_) => Err("queued".to_string()),
            };
            verdict.map(|()| ctx)
        };
        f.slots
            .api(&"slow".into())
            .slow
            .store(true, Ordering::Relaxed);
        let held: Vec<_> = (0..2).map(|_| admit("slow")).collect();
        assert!(held.iter().all(Result::is_ok));
        let refused = admit("slow").err().unwrap_or_default();
        assert!(
            refused.contains("may hold only 2 of this limit's 10 slots"),
            "{refused}"
        );
        assert_eq!(f.counters.get(Outcome::Isolated as usize), 1);
        // The other Apis still get the remaining eight.
        let others: Vec<_> = (0..8).map(|_| admit("fast")).collect();
        assert!(others.iter().all(Result::is_ok));
        assert_eq!(f.slots.slow_apis(), vec![Arc::<str>::from("slow")]);
        // A finished slow request frees its share.
        drop(held);
        drop(others);
        assert!(admit("slow").is_ok());
    }

    #[test]
    fn a_rebuilt_filter_shares_the_slots() {
        let cfg = serde_json::json!({"max": 3});
        let a = filter(cfg.clone(), "test rebuild");
        let b = filter(cfg, "test rebuild");
        assert!(Arc::ptr_eq(&a.slots, &b.slots));
    }
}
