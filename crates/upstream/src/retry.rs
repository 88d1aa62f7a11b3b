use http::Method;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Conditions under which a failed try may be repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    pub statuses: Vec<u16>,
}

impl RetryOn {
    /// Parse one `retry.on` entry: `connect-failure`, `reset`, `timeout`,
    /// `gateway-error` (502, 503, 504), `5xx`, or a status code.
    pub fn add(&mut self, s: &str) -> Result<(), String> {
        match s {
            "connect-failure" => self.connect_failure = true,
            "reset" => self.reset = true,
            "timeout" | "per-try-timeout" => self.timeout = true,
            "gateway-error" => self.statuses.extend([502, 503, 504]),
            "5xx" => self.statuses.extend(500..=599),
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => self.statuses.push(c),
                _ => {
                    return Err(format!(
                        "{s:?} is not a retry condition: use connect-failure, reset, timeout, gateway-error, 5xx or a status code"
                    ));
                }
            },
        }
        Ok(())
    }
}

/// How a try ended, as far as retrying cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    ConnectFailure,
    Reset,
    Timeout,
    Status(u16),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra tries after the first.
    pub attempts: u32,
    pub on: RetryOn,
    pub per_try_timeout: Option<Duration>,
    /// Replay POST/PATCH (and other non-idempotent methods) too.
    pub non_idempotent: bool,
    pub backoff: Backoff,
}

/// The pause before a retry: exponential with full jitter, as Envoy does it. Retry
/// n waits a random time in `[0, min(max, base × (2ⁿ − 1))]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    /// The pause before retry `n` (1 for the first), for a random `roll` in [0, 1).
    pub fn pause(&self, n: u32, roll: f64) -> Duration {
        let factor = (1u64 << n.clamp(1, 32)) - 1;
        let ceiling = self
            .base
            .saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX))
            .min(self.max);
        ceiling.mul_f64(roll.clamp(0.0, 1.0))
    }
}

/// `Service.spec.retryBudget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Retries may add at most this share (percent) of the requests in the window...
    pub percent: u32,
    /// ...plus this many per second, so low traffic can still retry.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 3,
            window: Duration::from_secs(10),
        }
    }
}

const BUDGET_BUCKETS: usize = 10;

/// A retry budget for one Service (linkerd's and Envoy's answer to retry storms): over a
/// sliding window of ten buckets, retries may not exceed `percent` of the requests
/// plus a floor. Lock-free and approximate: a bucket being recycled by one thread may
/// lose a count of another, which errs by a request or two.
#[derive(Debug)]
pub struct RetryBudget {
    cfg: BudgetConfig,
    epoch: Instant,
    /// (bucket number, requests, retries)
    buckets: [(AtomicU64, AtomicU32, AtomicU32); BUDGET_BUCKETS],
    exhausted: AtomicU64,
}

impl RetryBudget {
    pub fn new(cfg: BudgetConfig, now: Instant) -> Self {
        Self {
            cfg,
            epoch: now,
            buckets: std::array::from_fn(|_| {
                (
                    AtomicU64::new(u64::MAX),
                    AtomicU32::new(0),
                    AtomicU32::new(0),
                )
            }),
            exhausted: AtomicU64::new(0),
        }
    }

    fn bucket(&self, now: Instant) -> u64 {
        let width = (self.cfg.window / BUDGET_BUCKETS as u32).max(Duration::from_millis(1));
        (now.saturating_duration_since(self.epoch).as_nanos() / width.as_nanos()) as u64
    }

    /// The current bucket's number and slot, recycled if it holds an old one.
    fn current(&self, now: Instant) -> (u64, &(AtomicU64, AtomicU32, AtomicU32)) {
        let b = self.bucket(now);
        let slot = &self.buckets[(b % BUDGET_BUCKETS as u64) as usize];
        let seen = slot.0.load(Ordering::Acquire);
        if seen != b
            && slot
                .0
                .compare_exchange(seen, b, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.1.store(0, Ordering::Relaxed);
            slot.2.store(0, Ordering::Relaxed);
        }
        (b, slot)
    }

    /// Count a request that may retry.
    pub fn request(&self, now: Instant) {
        self.current(now).1.1.fetch_add(1, Ordering::Relaxed);
    }

    /// May one more retry go out now? Counts it when it may.
    pub fn withdraw(&self, now: Instant) -> bool {
        let (b, slot) = self.current(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for (id, req, ret) in &self.buckets {
            let id = id.load(Ordering::Acquire);
            if id != u64::MAX && id + BUDGET_BUCKETS as u64 > b {
                requests += u64::from(req.load(Ordering::Relaxed));
                retries += u64::from(ret.load(Ordering::Relaxed));
            }
        }
        let floor =
            u64::from(self.cfg.min_per_second) * self.cfg.window.as_millis().max(1) as u64 / 1000;
        let allowed = requests * u64::from(self.cfg.percent) / 100 + floor;
        if retries < allowed {
            slot.2.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Retries refused for want of budget.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &BudgetConfig {
        &self.cfg
    }
}

impl RetryPolicy {
    /// May try number `done + 1` follow a try that ended with `outcome`?
    /// A connect failure never reached the upstream, so it is safe for any method;
    /// anything else is replayed only for idempotent methods unless configured.
    pub fn allows(&self, method: &Method, done: u32, outcome: TryOutcome) -> bool {
        if done > self.attempts {
            return false;
        }
        let wanted = match outcome {
            TryOutcome::ConnectFailure => return self.on.connect_failure,
            TryOutcome::Reset => self.on.reset,
            TryOutcome::Timeout => self.on.timeout,
            TryOutcome::Status(s) => self.on.statuses.contains(&s),
        };
        wanted && (self.non_idempotent || method.is_idempotent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let mut on = RetryOn::default();
        for s in ["connect-failure", "reset", "503"] {
            assert!(on.add(s).is_ok());
        }
        assert!(on.add("sometimes").is_err());
        let p = RetryPolicy {
            attempts: 2,
            on,
            ..Default::default()
        };
        let cases = [
            (Method::GET, 1, TryOutcome::Status(503), true),
            (Method::GET, 1, TryOutcome::Status(500), false),
            (Method::GET, 2, TryOutcome::Reset, true),
            (Method::GET, 3, TryOutcome::Reset, false),
            (Method::POST, 1, TryOutcome::Reset, false),
            (Method::POST, 1, TryOutcome::Status(503), false),
            (Method::POST, 1, TryOutcome::ConnectFailure, true),
            (Method::GET, 1, TryOutcome::Timeout, false),
        ];
        for (m, done, out, want) in cases {
            assert_eq!(p.allows(&m, done, out), want, "{m} {done} {out:?}");
        }
        let np = RetryPolicy {
            non_idempotent: true,
            ..p
        };
        assert!(np.allows(&Method::POST, 1, TryOutcome::Reset));
    }

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_and_a_cap() {
        let b = Backoff::default();
        let ms = Duration::from_millis;
        // (retry number, roll, pause)
        let table = [
            (1, 0.0, ms(0)),
            (1, 0.5, Duration::from_micros(12_500)),
            (1, 1.0, ms(25)),
            (2, 1.0, ms(75)),
            (3, 1.0, ms(175)),
            (4, 1.0, ms(250)), // 375 ms capped
            (40, 1.0, ms(250)),
            (2, 0.2, ms(15)),
        ];
        for (n, roll, want) in table {
            assert_eq!(b.pause(n, roll), want, "retry {n} roll {roll}");
        }
    }

    #[test]
    fn budget_allows_a_share_of_requests_plus_a_floor() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let cfg = BudgetConfig {
            percent: 20,
            min_per_second: 1,
            window: s(10),
        };
        let b = RetryBudget::new(cfg, t0);
        // No traffic: the floor alone, 1/s over 10 s.
        let floor = (0..20).filter(|_| b.withdraw(t0)).count();
        assert_eq!(floor, 10);
        assert_eq!(b.exhausted(), 10);
        // 100 requests add 20 retries.
        for _ in 0..100 {
            b.request(t0 + s(1));
        }
        let more = (0..50).filter(|_| b.withdraw(t0 + s(1))).count();
        assert_eq!(more, 20);
        // Once the window has passed, the old requests and retries are forgotten.
        let later = t0 + s(12);
        assert_eq!((0..20).filter(|_| b.withdraw(later)).count(), 10);
        // Just inside the window of the requests at 1 s: they count again.
        let b = RetryBudget::new(cfg, t0);
        for _ in 0..100 {
            b.request(t0);
        }
        assert_eq!((0..100).filter(|_| b.withdraw(t0 + s(9))).count(), 30);
    }
}
