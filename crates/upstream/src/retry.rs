use http::Method;
use std::time::Duration;

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
}
