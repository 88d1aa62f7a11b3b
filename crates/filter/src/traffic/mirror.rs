//! `mirror`: send a copy of a share of requests to another Service and ignore the
//! answers (shadow traffic).
//!
//! The filter only picks requests and reserves a slot; the proxy sends each copy in
//! a task of its own once the request is about to go upstream, so the main request
//! never waits for the mirror. Copies in flight are bounded (`maxInFlight`): when
//! the mirror Service is slow, further copies are dropped rather than queued.

use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Flow, Step};
use meshgate_core::{MirrorOutcome, MirrorTicket, MirrorTo, Mirrors, RequestCtx};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    service: String,
    #[serde(default = "all")]
    percent: f64,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
}

fn all() -> f64 {
    100.0
}

fn default_max_body() -> u64 {
    1 << 20
}

fn default_max_in_flight() -> usize {
    100
}

/// Results, as [`Kind::metric`] names them.
const ANSWERED: usize = 0;
const FAILED: usize = 1;
const SKIPPED: usize = 2;
const DROPPED: usize = 3;

#[derive(Debug)]
pub struct Mirror {
    service: Arc<str>,
    percent: f64,
    timeout: Duration,
    max_body_bytes: u64,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    _state: Arc<super::SharedState>,
}

/// One copy's slot: counts how it went, and frees the slot when dropped.
#[derive(Debug)]
struct Ticket {
    in_flight: Arc<AtomicUsize>,
    counters: Arc<Counters>,
}

impl MirrorTicket for Ticket {
    fn finished(&self, outcome: MirrorOutcome) {
        self.counters.record(match outcome {
            MirrorOutcome::Answered => ANSWERED,
            MirrorOutcome::Failed => FAILED,
            MirrorOutcome::Skipped => SKIPPED,
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Mirror {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if !ctx.services.contains(&cfg.service) {
            return Err(BuildError::new(
                "config.service",
                format!("unknown Service {:?}", cfg.service),
            ));
        }
        if !(0.0..=100.0).contains(&cfg.percent) {
            return Err(BuildError::new(
                "config.percent",
                "a percentage from 0 to 100",
            ));
        }
        if cfg.max_in_flight == 0 {
            return Err(BuildError::new("config.maxInFlight", "must be at least 1"));
        }
        let timeout = crate::duration_or(
            "config.timeout",
            cfg.timeout.as_deref(),
            Duration::from_secs(5),
        )?;
        if timeout.is_zero() {
            return Err(BuildError::new("config.timeout", "must be above zero"));
        }
        let shared = shared_state(ctx.site, Kind::Mirror, value);
        Ok(Self {
            service: cfg.service.into(),
            percent: cfg.percent,
            timeout,
            max_body_bytes: cfg.max_body_bytes,
            max_in_flight: cfg.max_in_flight,
            in_flight: Arc::default(),
            counters: shared.counters(),
            _state: shared,
        })
    }

    /// A slot for one more copy, unless `maxInFlight` copies are out.
    fn reserve(&self) -> Option<Ticket> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_in_flight).then_some(n + 1)
            });
        taken.is_ok().then(|| Ticket {
            in_flight: self.in_flight.clone(),
            counters: self.counters.clone(),
        })
    }
}

impl crate::Filter for Mirror {
    fn name(&self) -> &'static str {
        "mirror"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        _req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        if self.percent < 100.0 && fastrand::f64() * 100.0 >= self.percent {
            return Step::Done(Ok(Flow::Continue));
        }
        let Some(ticket) = self.reserve() else {
            self.counters.record(DROPPED);
            return Step::Done(Ok(Flow::Continue));
        };
        let to = MirrorTo {
            service: self.service.clone(),
            timeout: self.timeout,
            max_body_bytes: self.max_body_bytes,
            ticket: Arc::new(ticket),
        };
        match ctx.extensions.get_mut::<Mirrors>() {
            Some(m) => m.0.push(to),
            None => {
                ctx.extensions.insert(Mirrors(vec![to]));
            }
        }
        Step::Done(Ok(Flow::Continue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Filter;
    use meshgate_core::RequestId;

    fn mirror(config: serde_json::Value) -> Result<Mirror, BuildError> {
        let consumers = Arc::new(crate::ConsumerSet::default());
        let services = ["shadow".to_string()].into_iter().collect();
        let ctx = BuildCtx {
            captures: &[],
            consumers: &consumers,
            base: None,
            site: "Api/t spec.filters.0",
            services: &services,
        };
        Mirror::from_config(&config, ctx)
    }

    fn copies(f: &Mirror) -> Option<Mirrors> {
        let mut ctx = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
        let mut parts = http::Request::new(()).into_parts().0;
        let _ = f.on_request(&mut ctx, &mut parts);
        ctx.extensions.remove::<Mirrors>()
    }

    #[test]
    fn copies_are_bounded_by_max_in_flight_and_freed_when_done() {
        let f = mirror(serde_json::json!({"service": "shadow", "maxInFlight": 2}))
            .unwrap_or_else(|e| panic!("{e}"));
        let first = copies(&f);
        let second = copies(&f);
        assert!(first.is_some() && second.is_some());
        // A third while two are out is dropped and counted.
        assert!(copies(&f).is_none());
        assert_eq!(f.counters.get(DROPPED), 1);
        if let Some(m) = first {
            m.0[0].ticket.finished(MirrorOutcome::Answered);
        }
        // The first copy is done (its ticket dropped): room for one more.
        assert!(copies(&f).is_some());
        assert_eq!(f.counters.get(ANSWERED), 1);
    }

    #[test]
    fn a_share_of_requests_is_copied() {
        let f =
            mirror(serde_json::json!({"service": "shadow", "percent": 25, "maxInFlight": 100000}))
                .unwrap_or_else(|e| panic!("{e}"));
        let n = (0..4000).filter(|_| copies(&f).is_some()).count();
        assert!((800..1200).contains(&n), "{n}");
        let none = mirror(serde_json::json!({"service": "shadow", "percent": 0}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!((0..100).all(|_| copies(&none).is_none()));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                serde_json::json!({"service": "nope"}),
                "config.service",
                "unknown Service \"nope\"",
            ),
            (
                serde_json::json!({"service": "shadow", "percent": 101}),
                "config.percent",
                "percentage",
            ),
            (
                serde_json::json!({"service": "shadow", "maxInFlight": 0}),
                "config.maxInFlight",
                "at least 1",
            ),
            (
                serde_json::json!({"service": "shadow", "timeout": "0s"}),
                "config.timeout",
                "above zero",
            ),
        ];
        for (config, path, message) in cases {
            let Err(e) = mirror(config.clone()) else {
                panic!("{config} was accepted");
            };
            assert_eq!(e.path, path, "{config}");
            assert!(e.message.contains(message), "{config}: {}", e.message);
        }
    }
}
