//! GCRA (the generic cell rate algorithm), the token bucket as one timestamp per key.
//!
//! A limit of `count` per `period` spaces requests `interval = period / count` apart
//! and lets `burst` of them arrive at once. The only state is the *theoretical
//! arrival time* (TAT) of the next request; a request at `now` is admitted when
//! `max(TAT, now) - now <= (burst - 1) * interval`, and then moves TAT one interval
//! on. The same arithmetic runs in-process (`scope: local`) and inside the Redis
//! script (`scope: cluster`), in whole units of the caller's clock (nanoseconds
//! locally, microseconds in Redis). Pure functions: tests drive them with a made-up
//! clock.

use std::time::Duration;

/// One limit: `count` requests per `period`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub period: Duration,
    pub burst: u64,
}

/// What one limit says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub allowed: bool,
    /// Requests that could still be made right now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When refused: until one request would be admitted.
    pub retry_after: Duration,
}

impl Limit {
    /// `"100/s"`, `"20/m"`, `"1000/h"`, `"5/d"`, or with a period length: `"10/30s"`.
    /// `burst` defaults to `count` (one period's worth at once).
    pub fn parse(rate: &str, burst: Option<u64>) -> Result<Self, String> {
        let (n, per) = rate.split_once('/').ok_or_else(|| {
            format!("{rate:?} is not a rate (write it as 100/s, 20/m, 1000/h or 5/d)")
        })?;
        let count: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{n:?} is not a whole number of requests"))?;
        let period = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            other => meshgate_core::parse_duration(other)
                .map_err(|e| format!("rate period {other:?}: {e}"))?,
        };
        if count == 0 {
            return Err("a rate needs at least 1 request per period".into());
        }
        if period.is_zero() || period > Duration::from_secs(366 * 86_400) {
            return Err("the rate's period must be between 1ns and a year".into());
        }
        let burst = burst.unwrap_or(count);
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        if burst > 1_000_000_000 {
            return Err("burst must be at most 1000000000".into());
        }
        Ok(Self {
            count,
            period,
            burst,
        })
    }

    /// The spacing between requests in clock units of `unit` (at least 1).
    pub fn interval(&self, unit: Duration) -> u64 {
        let per = self.period.as_nanos() / unit.as_nanos().max(1);
        (per / u128::from(self.count)).clamp(1, u128::from(u64::MAX / 4)) as u64
    }

    /// How far past `now` the TAT may run and still admit a request.
    pub fn tolerance(&self, unit: Duration) -> u64 {
        self.interval(unit).saturating_mul(self.burst - 1)
    }

    /// True when a request at `now` is admitted given the stored `tat` (0 = fresh).
    pub fn admits(&self, tat: u64, now: u64, unit: Duration) -> bool {
        tat.saturating_sub(now) <= self.tolerance(unit)
    }

    /// The TAT to store after admitting a request at `now`.
    pub fn advance(&self, tat: u64, now: u64, unit: Duration) -> u64 {
        tat.max(now).saturating_add(self.interval(unit))
    }

    /// The report for a bucket whose TAT lies `ahead` units past now: after the
    /// request when it was admitted, before it when it was refused.
    pub fn report(&self, allowed: bool, ahead: u64, unit: Duration) -> Report {
        let interval = self.interval(unit);
        let to_time = |u: u64| Duration::from_nanos(u.saturating_mul(unit.as_nanos() as u64));
        let capacity = interval.saturating_mul(self.burst);
        Report {
            allowed,
            remaining: if allowed {
                capacity.saturating_sub(ahead) / interval
            } else {
                0
            },
            reset: to_time(ahead),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                to_time(ahead.saturating_sub(self.tolerance(unit)))
            },
        }
    }

    /// The window for `RateLimit-Policy`'s `w`, in whole seconds (at least 1).
    pub fn window_secs(&self) -> u64 {
        self.period.as_secs().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: Duration = Duration::from_nanos(1);
    const SEC: u64 = 1_000_000_000;

    /// Drive a bucket at the given times; return which requests were admitted.
    fn run(limit: &Limit, times: &[u64]) -> Vec<bool> {
        let mut tat = 0;
        times
            .iter()
            .map(|&now| {
                let ok = limit.admits(tat, now, NS);
                if ok {
                    tat = limit.advance(tat, now, NS);
                }
                ok
            })
            .collect()
    }

    #[test]
    fn parses_rates() {
        let l = Limit::parse("100/s", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (l.count, l.period, l.burst),
            (100, Duration::from_secs(1), 100)
        );
        assert_eq!(
            Limit::parse("20/m", Some(5))
                .unwrap_or_else(|e| panic!("{e}"))
                .burst,
            5
        );
        assert_eq!(
            Limit::parse("10/30s", None)
                .unwrap_or_else(|e| panic!("{e}"))
                .period,
            Duration::from_secs(30)
        );
        assert_eq!(
            Limit::parse("5/d", None)
                .unwrap_or_else(|e| panic!("{e}"))
                .period,
            Duration::from_secs(86_400)
        );
        for bad in ["100", "0/s", "x/s", "10/fortnight", "10/0s"] {
            assert!(Limit::parse(bad, None).is_err(), "{bad}");
        }
        assert!(Limit::parse("10/s", Some(0)).is_err());
    }

    #[test]
    fn admits_the_burst_at_once_then_one_per_interval() {
        let l = Limit::parse("10/s", Some(3)).unwrap_or_else(|e| panic!("{e}"));
        // Four at t=0: three pass. Then one every 100 ms.
        assert_eq!(run(&l, &[0, 0, 0, 0]), [true, true, true, false]);
        let times = [0, 0, 0, 0, SEC / 10 - 1, SEC / 10, SEC / 10, SEC / 5];
        assert_eq!(
            run(&l, &times),
            [true, true, true, false, false, true, false, true]
        );
    }

    #[test]
    fn sustained_rate_is_the_configured_rate() {
        // 1000 requests spread evenly over 10 s against 50/s: 500 pass, plus the burst.
        let l = Limit::parse("50/s", Some(10)).unwrap_or_else(|e| panic!("{e}"));
        let times: Vec<u64> = (0..1000).map(|i| i * 10 * SEC / 1000).collect();
        let passed = run(&l, &times).iter().filter(|&&b| b).count();
        assert!((500..=510).contains(&passed), "{passed}");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let l = Limit::parse("1/s", Some(2)).unwrap_or_else(|e| panic!("{e}"));
        let t = 100 * SEC;
        assert_eq!(run(&l, &[0, t, t, t]), [true, true, true, false]);
    }

    #[test]
    fn reports_remaining_reset_and_retry_after() {
        let l = Limit::parse("10/s", Some(3)).unwrap_or_else(|e| panic!("{e}"));
        let tat = l.advance(0, 0, NS);
        let r = l.report(true, tat, NS);
        assert_eq!((r.remaining, r.reset), (2, Duration::from_millis(100)));
        let tat = l.advance(l.advance(tat, 0, NS), 0, NS);
        let r = l.report(true, tat, NS);
        assert_eq!((r.remaining, r.reset), (0, Duration::from_millis(300)));
        assert!(!l.admits(tat, 0, NS));
        let r = l.report(false, tat, NS);
        assert_eq!(r.retry_after, Duration::from_millis(100));
        // 50 ms later the wait is 50 ms.
        let later = 50_000_000;
        let r = l.report(false, tat - later, NS);
        assert_eq!(r.retry_after, Duration::from_millis(50));
    }

    #[test]
    fn microsecond_clock_gives_the_same_answers() {
        let us = Duration::from_micros(1);
        let l = Limit::parse("10/s", Some(3)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.interval(us), 100_000);
        assert_eq!(l.tolerance(us), 200_000);
        let r = l.report(true, 100_000, us);
        assert_eq!((r.remaining, r.reset), (2, Duration::from_millis(100)));
    }
}
