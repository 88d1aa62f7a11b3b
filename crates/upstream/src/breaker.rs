//! The circuit breaker of one Service: a request limit, and a failure-rate breaker
//! over a sliding window.
//!
//! States: **closed** (requests pass; outcomes are counted in a window of ten
//! buckets), **open** (requests are refused for `open_for`), **half-open** (up to
//! `probes` requests pass; all succeeding closes the breaker, one failing opens it
//! again). The caller passes the clock, so tests drive it with made-up instants.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BUCKETS: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Requests in flight to the Service at once (None: no limit).
    pub max_requests: Option<u32>,
    /// Open when at least this share of requests (percent) failed in the window...
    pub failure_rate: u8,
    /// ...and the window holds at least this many requests.
    pub minimum_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
    /// Requests let through while half-open.
    pub probes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The failure-rate breaker is open (or half-open with its probes out).
    Open,
    /// `max_requests` are in flight.
    Full,
    /// `maxPendingRequests` already wait for a connection (counted by the pool).
    Pending,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { out: u32, passed: u32 },
}

#[derive(Debug)]
struct Window {
    /// (bucket number, successes, failures)
    buckets: [(u64, u32, u32); BUCKETS],
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    window: Window,
}

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    epoch: Instant,
    inner: Mutex<Inner>,
    in_flight: AtomicU32,
    opened: AtomicU64,
    refused: AtomicU64,
}

/// A request the breaker let through; give it back with [`Breaker::record`]. Dropped
/// without a record (the request was abandoned), it frees its slot and counts nothing.
#[derive(Debug)]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.breaker.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.probe
            && let Ok(mut inner) = self.breaker.inner.lock()
            && let Phase::HalfOpen { out, .. } = &mut inner.phase
        {
            *out = out.saturating_sub(1);
        }
    }
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, now: Instant) -> Self {
        Self {
            cfg,
            epoch: now,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                window: Window {
                    buckets: [(u64::MAX, 0, 0); BUCKETS],
                },
            }),
            in_flight: AtomicU32::new(0),
            opened: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn bucket(&self, now: Instant) -> u64 {
        let width = (self.cfg.window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.epoch).as_nanos() / width.as_nanos()) as u64
    }

    /// Let a request through, or say why not.
    pub fn admit(&self, now: Instant) -> Result<Ticket<'_>, Refusal> {
        let refuse = |r| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(r)
        };
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel);
        // From here the slot is held; a Ticket (or the undo below) gives it back.
        if self.cfg.max_requests.is_some_and(|max| n >= max) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return refuse(Refusal::Full);
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(Ticket {
                breaker: self,
                probe: false,
            });
        };
        if let Phase::Open { until } = inner.phase
            && now >= until
        {
            inner.phase = Phase::HalfOpen { out: 0, passed: 0 };
        }
        let probe = match &mut inner.phase {
            Phase::Closed => false,
            Phase::Open { .. } => {
                drop(inner);
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return refuse(Refusal::Open);
            }
            Phase::HalfOpen { out, passed } => {
                if *out + *passed >= self.cfg.probes {
                    drop(inner);
                    self.in_flight.fetch_sub(1, Ordering::AcqRel);
                    return refuse(Refusal::Open);
                }
                *out += 1;
                true
            }
        };
        Ok(Ticket {
            breaker: self,
            probe,
        })
    }

    /// The outcome of a request let through. True when this outcome opened the breaker.
    pub fn record(&self, mut ticket: Ticket<'_>, failed: bool, now: Instant) -> bool {
        let probe = std::mem::replace(&mut ticket.probe, false);
        drop(ticket);
        let before = self.opened.load(Ordering::Relaxed);
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let inner = &mut *inner;
        match &mut inner.phase {
            Phase::HalfOpen { out, passed } if probe => {
                *out = out.saturating_sub(1);
                if failed {
                    self.open(inner, now);
                } else {
                    *passed += 1;
                    if *passed >= self.cfg.probes {
                        inner.phase = Phase::Closed;
                        inner.window.buckets = [(u64::MAX, 0, 0); BUCKETS];
                    }
                }
            }
            Phase::Closed => {
                let b = self.bucket(now);
                let slot = &mut inner.window.buckets[(b % BUCKETS as u64) as usize];
                if slot.0 != b {
                    *slot = (b, 0, 0);
                }
                if failed {
                    slot.2 += 1;
                } else {
                    slot.1 += 1;
                }
                let live = |s: &&(u64, u32, u32)| s.0 != u64::MAX && s.0 + BUCKETS as u64 > b;
                let (ok, bad) = inner
                    .window
                    .buckets
                    .iter()
                    .filter(live)
                    .fold((0u64, 0u64), |(o, f), s| {
                        (o + u64::from(s.1), f + u64::from(s.2))
                    });
                let total = ok + bad;
                if failed
                    && total >= u64::from(self.cfg.minimum_requests)
                    && bad * 100 >= u64::from(self.cfg.failure_rate) * total
                {
                    self.open(inner, now);
                }
            }
            // Late answers of requests admitted before the breaker opened.
            _ => {}
        }
        self.opened.load(Ordering::Relaxed) != before
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.phase = Phase::Open {
            until: now + self.cfg.open_for,
        };
        inner.window.buckets = [(u64::MAX, 0, 0); BUCKETS];
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.inner.lock().map(|i| match i.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now >= until => BreakerState::HalfOpen,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }) {
            Ok(s) => s,
            Err(_) => BreakerState::Closed,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Times the breaker opened, and requests it refused.
    pub fn events(&self) -> (u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            max_requests: None,
            failure_rate: 50,
            minimum_requests: 4,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
            probes: 2,
        }
    }

    fn call(b: &Breaker, failed: bool, at: Instant) -> Result<(), Refusal> {
        let t = b.admit(at)?;
        let _ = b.record(t, failed, at);
        Ok(())
    }

    #[test]
    fn opens_at_the_failure_rate_once_the_minimum_is_reached() {
        let t0 = Instant::now();
        let b = Breaker::new(cfg(), t0);
        // Three failures: under the minimum of four requests, still closed.
        for _ in 0..3 {
            assert_eq!(call(&b, true, t0), Ok(()));
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        // One success: 3 of 4 failed, but only a failure trips the breaker.
        assert_eq!(call(&b, false, t0), Ok(()));
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(call(&b, true, t0), Ok(()));
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(call(&b, false, t0), Err(Refusal::Open));
        assert_eq!(b.events(), (1, 1));
    }

    #[test]
    fn a_low_failure_rate_keeps_it_closed() {
        let t0 = Instant::now();
        let b = Breaker::new(cfg(), t0);
        for i in 0..100 {
            let _ = call(&b, i % 4 == 3, t0); // a quarter fail
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn old_outcomes_leave_the_window() {
        let t0 = Instant::now();
        let b = Breaker::new(cfg(), t0);
        for _ in 0..3 {
            let _ = call(&b, true, t0);
        }
        // Eleven seconds later those failures are outside the 10 s window.
        let later = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            let _ = call(&b, false, later);
        }
        let _ = call(&b, true, later);
        assert_eq!(
            b.state(later),
            BreakerState::Closed,
            "1 of 4 in the window failed"
        );
    }

    #[test]
    fn half_open_probes_close_or_reopen() {
        let t0 = Instant::now();
        let b = Breaker::new(cfg(), t0);
        for _ in 0..4 {
            let _ = call(&b, true, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Open);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        // Two probes may be out at once; a third request is refused meanwhile.
        let p1 = b.admit(t1).unwrap_or_else(|e| panic!("{e:?}"));
        let p2 = b.admit(t1).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(b.admit(t1).err(), Some(Refusal::Open));
        assert!(!b.record(p1, false, t1));
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(!b.record(p2, false, t1));
        assert_eq!(b.state(t1), BreakerState::Closed);
        // Open again, and a failing probe re-opens it for another period.
        for _ in 0..4 {
            let _ = call(&b, true, t1);
        }
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(call(&b, true, t2), Ok(()));
        assert_eq!(b.state(t2), BreakerState::Open);
        assert_eq!(b.state(t2 + Duration::from_secs(29)), BreakerState::Open);
        assert_eq!(b.events().0, 3);
    }

    #[test]
    fn an_abandoned_probe_frees_its_place() {
        let t0 = Instant::now();
        let b = Breaker::new(BreakerConfig { probes: 1, ..cfg() }, t0);
        for _ in 0..4 {
            let _ = call(&b, true, t0);
        }
        let t1 = t0 + Duration::from_secs(30);
        drop(b.admit(t1));
        assert!(b.admit(t1).is_ok());
    }

    #[test]
    fn max_requests_limits_what_is_in_flight() {
        let t0 = Instant::now();
        let b = Breaker::new(
            BreakerConfig {
                max_requests: Some(2),
                ..cfg()
            },
            t0,
        );
        let a = b.admit(t0);
        let c = b.admit(t0);
        assert!(a.is_ok() && c.is_ok());
        assert_eq!(b.admit(t0).err(), Some(Refusal::Full));
        drop(a);
        assert!(b.admit(t0).is_ok());
        assert_eq!(b.in_flight(), 1);
    }
}
