//! `fault`: injected delays and aborts, for chaos testing through the real gateway.
//! A share of requests (optionally only those whose headers match) waits before going
//! on, or is answered at once with a configured status, never reaching the upstream.

use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, FilterResult, Flow, Step};
use http::{HeaderName, StatusCode};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    delay: Option<DelayConfig>,
    #[serde(default)]
    abort: Option<AbortConfig>,
    #[serde(default, rename = "match")]
    when: Option<MatchConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DelayConfig {
    percent: f64,
    duration: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AbortConfig {
    percent: f64,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    grpc_status: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchConfig {
    /// Header name → regex the value must match.
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Delayed = 0,
    Aborted = 1,
}

#[derive(Debug)]
pub struct Fault {
    delay: Option<(f64, Duration)>,
    abort: Option<(f64, StatusCode, u8)>,
    when: Vec<(HeaderName, regex::Regex)>,
    counters: Arc<Counters>,
    _state: Arc<super::SharedState>,
}

fn percent(p: f64, field: &str) -> Result<f64, BuildError> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(BuildError::new(field, "a percentage from 0 to 100"))
    }
}

/// The gRPC status for an HTTP status, as grpc/doc/http-grpc-status-mapping.md has it.
fn grpc_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

impl Fault {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if cfg.delay.is_none() && cfg.abort.is_none() {
            return Err(BuildError::new("config", "give a delay, an abort, or both"));
        }
        let delay = match &cfg.delay {
            Some(d) => Some((
                percent(d.percent, "config.delay.percent")?,
                meshgate_core::parse_duration(&d.duration)
                    .map_err(|e| BuildError::new("config.delay.duration", e))?,
            )),
            None => None,
        };
        let abort = match &cfg.abort {
            Some(a) => {
                let status = StatusCode::from_u16(a.status.unwrap_or(503))
                    .ok()
                    .filter(|s| s.as_u16() >= 200)
                    .ok_or_else(|| {
                        BuildError::new("config.abort.status", "a status from 200 to 599")
                    })?;
                let grpc = a.grpc_status.unwrap_or_else(|| grpc_for(status));
                if grpc > 16 {
                    return Err(BuildError::new(
                        "config.abort.grpcStatus",
                        "a gRPC status code from 0 to 16",
                    ));
                }
                Some((percent(a.percent, "config.abort.percent")?, status, grpc))
            }
            None => None,
        };
        let mut when = Vec::new();
        for (name, re) in cfg.when.iter().flat_map(|m| &m.headers) {
            let at = format!("config.match.headers.{name}");
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                BuildError::new(at.clone(), format!("{name:?} is not a header name"))
            })?;
            let r =
                regex::Regex::new(re).map_err(|e| BuildError::new(at.clone(), e.to_string()))?;
            when.push((n, r));
        }
        let state = shared_state(ctx.site, Kind::Fault, value);
        Ok(Self {
            delay,
            abort,
            when,
            counters: state.counters(),
            _state: state,
        })
    }

    fn abort(&self) -> Option<FilterResult> {
        let (p, status, grpc) = self.abort?;
        if !roll(p) {
            return None;
        }
        self.counters.record(Outcome::Aborted as usize);
        Some(Err(GatewayError::new(
            ErrorCode::FaultInjected,
            format!("fault injected: aborted with {}", status.as_u16()),
        )
        .with_status(status, grpc)
        .retry_safe()))
    }
}

/// True with probability `percent`/100.
fn roll(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

impl Filter for Fault {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn on_request<'a>(
        &'a self,
        _ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let matched = self.when.iter().all(|(n, re)| {
            req.headers
                .get_all(n)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| re.is_match(v)))
        });
        if !matched {
            return Step::Done(Ok(Flow::Continue));
        }
        match self.delay {
            Some((p, wait)) if roll(p) => {
                self.counters.record(Outcome::Delayed as usize);
                Step::Pending(Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    self.abort().unwrap_or(Ok(Flow::Continue))
                }))
            }
            _ => Step::Done(self.abort().unwrap_or(Ok(Flow::Continue))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_mapping_and_rolls() {
        let table = [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (503, 14),
            (500, 2),
        ];
        for (http, grpc) in table {
            assert_eq!(
                grpc_for(StatusCode::from_u16(http).unwrap_or_default()),
                grpc
            );
        }
        assert!(!roll(0.0));
        assert!((0..1000).all(|_| roll(100.0)));
        let hits = (0..10_000).filter(|_| roll(10.0)).count();
        assert!((800..1200).contains(&hits), "{hits}");
    }
}
