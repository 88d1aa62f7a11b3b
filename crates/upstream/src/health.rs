//! Endpoint health: the counters behind active health checks and passive outlier
//! detection. Like the breaker, this is plain state driven by the caller's clock:
//! the prober, its sockets and the timers that return ejected endpoints live in the
//! proxy. An endpoint is *usable* when it neither failed its active checks nor is
//! ejected; the cluster balances over usable endpoints (see `Cluster::rebuild`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `Service.spec.healthCheck`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that mark a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that mark an unhealthy endpoint healthy again.
    pub healthy_threshold: u32,
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect that succeeds within the timeout.
    Tcp,
    /// A GET of `path` answered within the timeout with a status in `expected`
    /// (inclusive ranges).
    Http {
        path: String,
        host: Option<String>,
        expected: Vec<(u16, u16)>,
    },
}

/// `Service.spec.outlierDetection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Eject after this many 5xx answers or local errors (connect failure, reset,
    /// timeout) in a row.
    pub consecutive_5xx: Option<u32>,
    /// Eject after this many 502/503/504 answers or local errors in a row.
    pub consecutive_gateway_errors: Option<u32>,
    /// The first ejection lasts this long; each repeated one a multiple of it.
    pub base_ejection_time: Duration,
    /// No ejection lasts longer (nor shorter than `base_ejection_time`).
    pub max_ejection_time: Duration,
    /// At most this share (percent) of the endpoints is ejected at once; at least one
    /// endpoint may always be ejected when the share is above zero.
    pub max_ejection_percent: u8,
}

/// What one try told outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Any answer below 500.
    Success,
    /// A 5xx answer.
    Status(u16),
    /// Connect failure, reset or timeout: no answer at all.
    LocalError,
}

/// Consecutive active-check results, turned into healthy or unhealthy at the
/// thresholds. A new endpoint starts healthy, so a gateway that starts serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckCounter {
    pub healthy: bool,
    pub passed_in_row: u32,
    pub failed_in_row: u32,
}

impl Default for CheckCounter {
    fn default() -> Self {
        Self {
            healthy: true,
            passed_in_row: 0,
            failed_in_row: 0,
        }
    }
}

impl CheckCounter {
    /// Count one check; the new state when this check changed it.
    pub fn observe(&mut self, passed: bool, cfg: &HealthCheckConfig) -> Option<bool> {
        if passed {
            self.passed_in_row = self.passed_in_row.saturating_add(1);
            self.failed_in_row = 0;
            if !self.healthy && self.passed_in_row >= cfg.healthy_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.failed_in_row = self.failed_in_row.saturating_add(1);
            self.passed_in_row = 0;
            if self.healthy && self.failed_in_row >= cfg.unhealthy_threshold {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// One endpoint's ejections. Each ejection lasts `base × n`, where n counts recent
/// ejections; every full `base` the endpoint then spends back in the set without
/// being ejected takes one off n, so a flapping endpoint stays out longer and a
/// recovered one is forgiven.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ejection {
    pub times: u32,
    pub until: Option<Instant>,
    returned: Option<Instant>,
}

impl Ejection {
    /// Eject now; returns when the ejection ends.
    pub fn eject(&mut self, now: Instant, cfg: &OutlierConfig) -> Instant {
        let base = cfg.base_ejection_time.max(Duration::from_millis(1));
        if let Some(back) = self.returned {
            let clean = now.saturating_duration_since(back).as_nanos() / base.as_nanos();
            self.times = self
                .times
                .saturating_sub(u32::try_from(clean).unwrap_or(u32::MAX));
        }
        self.times = self.times.saturating_add(1);
        let length = base
            .saturating_mul(self.times)
            .min(cfg.max_ejection_time.max(base));
        let until = now + length;
        self.until = Some(until);
        until
    }

    /// Return the endpoint when its ejection is over; true when it returned now.
    pub fn restore_if_due(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if now >= until => {
                self.until = None;
                self.returned = Some(now);
                true
            }
            _ => false,
        }
    }
}

const FAILED_CHECKS: u8 = 1;
const EJECTED: u8 = 2;

/// Where an endpoint stands; the discriminant indexes per-state gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Healthy = 0,
    /// Failed its active health checks.
    Unhealthy = 1,
    Ejected = 2,
}

impl EndpointState {
    pub const ALL: [Self; 3] = [Self::Healthy, Self::Unhealthy, Self::Ejected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Ejected => "ejected",
        }
    }
}

/// Why an endpoint is out, or the last word on it, for `GET /upstreams`.
#[derive(Debug, Clone, Default)]
struct Notes {
    /// The last active check's error (None: it passed, or none ran yet).
    last_error: Option<String>,
    checks: u64,
    check: CheckCounter,
    ejection: Ejection,
    eject_reason: String,
}

/// The health of one endpoint, kept across endpoint-set rebuilds.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    down: AtomicU8,
    notes: Mutex<Notes>,
}

/// A point-in-time view of an endpoint's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthView {
    pub state: EndpointState,
    pub reason: String,
    pub checks: u64,
    pub passed_in_row: u32,
    pub failed_in_row: u32,
    pub ejections: u32,
    /// Time left in the current ejection.
    pub ejected_for: Option<Duration>,
    pub consecutive_errors: u32,
}

/// What a try's outcome did to its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Fine,
    /// The consecutive-error threshold is reached: eject if the cluster allows.
    Eject,
}

impl Health {
    pub fn usable(&self) -> bool {
        self.down.load(Ordering::Relaxed) == 0
    }

    fn set(&self, bit: u8, on: bool) {
        if on {
            self.down.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.down.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    pub fn ejected(&self) -> bool {
        self.down.load(Ordering::Relaxed) & EJECTED != 0
    }

    pub fn state(&self) -> EndpointState {
        let down = self.down.load(Ordering::Relaxed);
        if down & EJECTED != 0 {
            EndpointState::Ejected
        } else if down & FAILED_CHECKS != 0 {
            EndpointState::Unhealthy
        } else {
            EndpointState::Healthy
        }
    }

    /// Count a try's outcome. Successes touch memory only when a run of errors
    /// is being broken, so the healthy path costs two loads.
    pub(crate) fn observe(&self, o: Observed, cfg: &OutlierConfig) -> Verdict {
        let (five, gateway) = match o {
            Observed::Success => {
                for c in [&self.consecutive_5xx, &self.consecutive_gateway] {
                    if c.load(Ordering::Relaxed) != 0 {
                        c.store(0, Ordering::Relaxed);
                    }
                }
                return Verdict::Fine;
            }
            Observed::Status(s) => (true, matches!(s, 502..=504)),
            Observed::LocalError => (true, true),
        };
        let bump = |c: &AtomicU32, on: bool, limit: Option<u32>| match (on, limit) {
            (true, Some(limit)) => c.fetch_add(1, Ordering::Relaxed) + 1 >= limit,
            (false, Some(_)) => {
                c.store(0, Ordering::Relaxed);
                false
            }
            (_, None) => false,
        };
        let a = bump(&self.consecutive_5xx, five, cfg.consecutive_5xx);
        let b = bump(
            &self.consecutive_gateway,
            gateway,
            cfg.consecutive_gateway_errors,
        );
        if (a || b) && !self.ejected() {
            Verdict::Eject
        } else {
            Verdict::Fine
        }
    }

    /// Eject the endpoint (the cluster already checked the ejection cap).
    pub(crate) fn eject(&self, now: Instant, cfg: &OutlierConfig) -> Instant {
        let errors = self.consecutive_5xx.load(Ordering::Relaxed);
        let gateway = self.consecutive_gateway.load(Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        let until = notes.ejection.eject(now, cfg);
        let why = if cfg.consecutive_5xx.is_some_and(|n| errors >= n) {
            format!("{errors} consecutive 5xx answers or connection errors")
        } else {
            format!("{gateway} consecutive gateway errors")
        };
        notes.eject_reason = format!(
            "ejected for {:?} (ejection {}) after {why}",
            until.saturating_duration_since(now),
            notes.ejection.times
        );
        self.set(EJECTED, true);
        until
    }

    /// Return the endpoint if its ejection is over; true when it returned now.
    pub(crate) fn restore_if_due(&self, now: Instant) -> bool {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        let back = notes.ejection.restore_if_due(now);
        if back {
            self.set(EJECTED, false);
        }
        back
    }

    pub(crate) fn ejected_until(&self) -> Option<Instant> {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ejection
            .until
    }

    /// Count an active check; the new state when it changed.
    pub(crate) fn checked(
        &self,
        result: Result<(), String>,
        cfg: &HealthCheckConfig,
    ) -> Option<bool> {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        notes.checks += 1;
        let change = notes.check.observe(result.is_ok(), cfg);
        notes.last_error = result.err();
        if let Some(healthy) = change {
            self.set(FAILED_CHECKS, !healthy);
        }
        change
    }

    pub fn view(&self, now: Instant, checked: bool, detecting: bool) -> HealthView {
        let notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_for = notes
            .ejection
            .until
            .map(|u| u.saturating_duration_since(now));
        let c = notes.check;
        let state = self.state();
        let reason = match state {
            EndpointState::Ejected => notes.eject_reason.clone(),
            EndpointState::Unhealthy => format!(
                "failed its last {} health checks: {}",
                c.failed_in_row,
                notes.last_error.as_deref().unwrap_or("no answer")
            ),
            EndpointState::Healthy => match (checked, &notes.last_error) {
                (true, Some(e)) if c.failed_in_row > 0 => format!(
                    "healthy; the last {} health checks failed: {e}",
                    c.failed_in_row
                ),
                (true, _) if notes.checks == 0 => "healthy until the first check".to_string(),
                (true, _) => "passing its health checks".to_string(),
                (false, _) if detecting => "no health check configured; not ejected".to_string(),
                (false, _) => "no health check configured".to_string(),
            },
        };
        HealthView {
            state,
            reason,
            checks: notes.checks,
            passed_in_row: c.passed_in_row,
            failed_in_row: c.failed_in_row,
            ejections: notes.ejection.times,
            ejected_for,
            consecutive_errors: self
                .consecutive_5xx
                .load(Ordering::Relaxed)
                .max(self.consecutive_gateway.load(Ordering::Relaxed)),
        }
    }
}

/// May one more of `total` endpoints be ejected while `ejected` already are?
pub(crate) fn may_eject(total: usize, ejected: usize, max_percent: u8) -> bool {
    if max_percent == 0 || total == 0 {
        return false;
    }
    let cap = (total * usize::from(max_percent) / 100).max(1);
    ejected < cap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc() -> HealthCheckConfig {
        HealthCheckConfig {
            probe: Probe::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }

    fn od() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: None,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn check_counter_flips_only_at_the_thresholds() {
        // (check passed, state change expected)
        let table = [
            (false, None),
            (false, None),
            (true, None), // a pass breaks the run of failures
            (false, None),
            (false, None),
            (false, Some(false)), // third failure in a row
            (false, None),
            (true, None),
            (true, Some(true)), // second pass in a row
            (true, None),
        ];
        let mut c = CheckCounter::default();
        for (i, (passed, want)) in table.into_iter().enumerate() {
            assert_eq!(c.observe(passed, &hc()), want, "step {i}");
        }
        assert!(c.healthy);
    }

    #[test]
    fn ejections_grow_with_repeats_and_decay_when_clean() {
        let cfg = od();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut e = Ejection::default();
        // (seconds since t0 of the ejection, expected length in seconds)
        assert_eq!(e.eject(t0, &cfg), t0 + s(10));
        assert!(!e.restore_if_due(t0 + s(9)));
        assert!(e.restore_if_due(t0 + s(10)));
        // Ejected again 5 s after returning: no full clean period, so twice as long.
        assert_eq!(e.eject(t0 + s(15), &cfg), t0 + s(35));
        assert!(e.restore_if_due(t0 + s(35)));
        // Third time soon after: 30 s.
        assert_eq!(e.eject(t0 + s(36), &cfg), t0 + s(66));
        assert!(e.restore_if_due(t0 + s(66)));
        // After 25 clean seconds two of three are forgiven: 2 × 10 s.
        assert_eq!(e.eject(t0 + s(91), &cfg), t0 + s(111));
        assert_eq!(e.times, 2);
        // The cap: many quick repeats never exceed max_ejection_time.
        let mut now = t0 + s(111);
        for _ in 0..10 {
            assert!(e.restore_if_due(now));
            let until = e.eject(now, &cfg);
            assert!(until - now <= s(60));
            now = until;
        }
        assert!(e.restore_if_due(now));
        assert_eq!(e.eject(now, &cfg) - now, s(60));
    }

    #[test]
    fn consecutive_errors_trigger_and_successes_reset() {
        let cfg = OutlierConfig {
            consecutive_gateway_errors: Some(2),
            ..od()
        };
        let h = Health::default();
        let table = [
            (Observed::Status(500), Verdict::Fine),
            (Observed::Status(500), Verdict::Fine),
            (Observed::Success, Verdict::Fine), // resets both runs
            (Observed::Status(500), Verdict::Fine),
            (Observed::Status(503), Verdict::Fine), // one gateway error
            (Observed::LocalError, Verdict::Eject), // 3 × 5xx and 2 × gateway
        ];
        for (i, (o, want)) in table.into_iter().enumerate() {
            assert_eq!(h.observe(o, &cfg), want, "step {i}");
        }
        let t0 = Instant::now();
        h.eject(t0, &cfg);
        assert!(h.ejected() && !h.usable());
        // Errors while ejected (late answers) do not eject twice.
        assert_eq!(h.observe(Observed::LocalError, &cfg), Verdict::Fine);
        let v = h.view(t0, false, true);
        assert_eq!(v.state, EndpointState::Ejected);
        assert!(v.reason.contains("consecutive 5xx"), "{}", v.reason);
        assert!(h.restore_if_due(t0 + Duration::from_secs(10)));
        assert!(h.usable());
    }

    #[test]
    fn active_checks_and_ejection_are_separate_reasons() {
        let h = Health::default();
        let cfg = hc();
        for _ in 0..3 {
            let _ = h.checked(Err("connection refused".into()), &cfg);
        }
        assert!(!h.usable());
        let v = h.view(Instant::now(), true, false);
        assert_eq!(v.state, EndpointState::Unhealthy);
        assert!(v.reason.contains("connection refused"), "{}", v.reason);
        assert_eq!(h.checked(Ok(()), &cfg), None);
        assert_eq!(h.checked(Ok(()), &cfg), Some(true));
        assert!(h.usable());
    }

    #[test]
    fn ejection_cap() {
        // (endpoints, already ejected, max percent, may eject one more)
        let table = [
            (2, 0, 50, true),
            (2, 1, 50, false),
            (10, 4, 50, true),
            (10, 5, 50, false),
            (3, 0, 10, true), // at least one
            (3, 1, 10, false),
            (3, 0, 0, false), // zero disables ejection
            (4, 3, 100, true),
        ];
        for (total, ejected, pct, want) in table {
            assert_eq!(
                may_eject(total, ejected, pct),
                want,
                "{total} {ejected} {pct}"
            );
        }
    }
}
