//! `concurrency-limit`: a bulkhead. At most `max` requests through this filter are
//! in flight in this proxy at once — from the filter until the response body has been
//! sent — so one slow or hot Api cannot take every connection and task. Requests over
//! the limit wait in a short bounded queue, or get 503 at once.

use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, FilterResult, Flow, Step};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    max: usize,
    #[serde(default)]
    queue: Option<QueueConfig>,
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
}

impl Slots {
    pub(super) fn new(max: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
            waiting: AtomicUsize::new(0),
        }
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.max.saturating_sub(self.sem.available_permits()) as u64
    }
}

/// A held slot, kept in the request context: it is released when the request is
/// complete (the context is dropped after the response body has been sent).
#[derive(Debug, Clone)]
struct Held {
    _permit: Arc<OwnedSemaphorePermit>,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Admitted = 0,
    Queued = 1,
    Rejected = 2,
}

#[derive(Debug)]
pub struct ConcurrencyLimit {
    slots: Arc<Slots>,
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
        let state = shared_state(ctx.site, Kind::Concurrency, value);
        Ok(Self {
            slots: state.slots(cfg.max),
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
    ) -> FilterResult {
        self.counters.record(o as usize);
        ctx.extensions.insert(Held {
            _permit: Arc::new(permit),
        });
        Ok(Flow::Continue)
    }

    async fn wait(&self, ctx: &mut RequestCtx) -> FilterResult {
        let acquired =
            tokio::time::timeout(self.queue_timeout, self.slots.sem.clone().acquire_owned()).await;
        self.slots.waiting.fetch_sub(1, Ordering::AcqRel);
        match acquired {
            Ok(Ok(permit)) => self.admit(ctx, permit, Outcome::Queued),
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
        if let Ok(permit) = self.slots.sem.clone().try_acquire_owned() {
            return Step::Done(self.admit(ctx, permit, Outcome::Admitted));
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
        Step::Pending(Box::pin(self.wait(ctx)))
    }
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

    #[test]
    fn a_rebuilt_filter_shares_the_slots() {
        let cfg = serde_json::json!({"max": 3});
        let a = filter(cfg.clone(), "test rebuild");
        let b = filter(cfg, "test rebuild");
        assert!(Arc::ptr_eq(&a.slots, &b.slots));
    }
}
