//! `quota`: per-Consumer calendar quotas (`Consumer.spec.quota`: requests per day or
//! month, in the filter's time zone).
//!
//! Without `redis`, counters are this proxy's (the meter's quota book, persisted in
//! the embedded store); with `redis`, every proxy shares them. A Consumer's counter is
//! the same wherever the filter is written, so one quota covers every Api that has
//! the filter. Requests without a Consumer, or from a Consumer without a quota, pass.

use super::rate_limit::{RATELIMIT, RATELIMIT_POLICY};
use super::redis::{FailMode, Redis, RedisConfig};
use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, FilterResult, Flow, Step};
use http::HeaderValue;
use meshgate_core::{ErrorCode, GatewayError, QuotaPeriod, RequestCtx};
use meshgate_meter::{Calendar, Take, Window};
use serde::Deserialize;
use std::sync::{Arc, OnceLock};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    per: Per,
    #[serde(default = "utc")]
    time_zone: String,
    #[serde(default)]
    redis: Option<RedisConfig>,
    #[serde(default)]
    fail_mode: FailMode,
    #[serde(default = "crate::yes")]
    headers: bool,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Per {
    #[default]
    Day,
    Month,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug)]
pub struct Quota {
    /// The period for Consumers whose quota names none.
    per: QuotaPeriod,
    day: Calendar,
    month: Calendar,
    store: Store,
    headers: bool,
    counters: Arc<Counters>,
    _state: Arc<super::SharedState>,
}

#[derive(Debug)]
enum Store {
    Local,
    Cluster { redis: Redis, fail_mode: FailMode },
}

/// What an admitted request's response headers say.
#[derive(Debug, Clone, Copy)]
struct Decided {
    limit: u64,
    remaining: u64,
    reset: u64,
    window: u64,
}

/// Results, as [`Kind::metric`] names them.
const ADMITTED: usize = 0;
const EXCEEDED: usize = 1;

impl Quota {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let calendar =
            |p| Calendar::new(p, &cfg.time_zone).map_err(|e| BuildError::new("config.timeZone", e));
        let shared = shared_state(ctx.site, Kind::Quota, value);
        let store = match &cfg.redis {
            None => Store::Local,
            Some(r) => Store::Cluster {
                redis: Redis::from_config(r, ctx)?,
                fail_mode: cfg.fail_mode,
            },
        };
        Ok(Self {
            per: match cfg.per {
                Per::Day => QuotaPeriod::Day,
                Per::Month => QuotaPeriod::Month,
            },
            day: calendar(QuotaPeriod::Day)?,
            month: calendar(QuotaPeriod::Month)?,
            store,
            headers: cfg.headers,
            counters: shared.counters(),
            _state: shared,
        })
    }

    fn decide(
        &self,
        ctx: &mut RequestCtx,
        limit: u64,
        take: Take,
        period: QuotaPeriod,
        w: &Window,
        now: i64,
    ) -> FilterResult {
        let decided = |used: u64| Decided {
            limit,
            remaining: limit.saturating_sub(used),
            reset: w.seconds_left(now),
            window: w.length(),
        };
        match take {
            Take::Admitted { used } => {
                self.counters.record(ADMITTED);
                if self.headers {
                    ctx.extensions.insert(decided(used));
                }
                Ok(Flow::Continue)
            }
            Take::Exceeded { used } => {
                self.counters.record(EXCEEDED);
                let d = decided(used);
                let per = match period {
                    QuotaPeriod::Day => "day",
                    QuotaPeriod::Month => "month",
                };
                let mut e = GatewayError::new(
                    ErrorCode::QuotaExceeded,
                    format!("the quota of {limit} requests per {per} is used up"),
                )
                .with_header(http::header::RETRY_AFTER, HeaderValue::from(d.reset));
                if self.headers {
                    let (policy, state) = items(&d);
                    e = e.with_header(RATELIMIT_POLICY, policy);
                    e = e.with_header(RATELIMIT, state);
                }
                Err(e)
            }
        }
    }
}

/// `"quota";q=LIMIT;w=SECONDS` and `"quota";r=REMAINING;t=SECONDS` (digits and
/// quotes only, so always a valid header value).
fn items(d: &Decided) -> (HeaderValue, HeaderValue) {
    let value =
        |s: String| HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static("\"quota\""));
    (
        value(format!("\"quota\";q={};w={}", d.limit, d.window)),
        value(format!("\"quota\";r={};t={}", d.remaining, d.reset)),
    )
}

/// Check-and-count in one step. ARGV: limit, expiry (Unix seconds). Returns
/// {admitted, used}; a refused request is not counted.
const SCRIPT: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return {0, used} end
used = redis.call('INCR', KEYS[1])
if used == 1 then redis.call('EXPIREAT', KEYS[1], ARGV[2]) end
return {1, used}
";

fn script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(SCRIPT))
}

/// How long a counter outlives its window in Redis, for inspection.
const KEEP_AFTER_END: i64 = 86_400;

async fn take_shared(
    redis: &Redis,
    consumer: &str,
    w: &Window,
    limit: u64,
) -> Result<Take, String> {
    let mut call = script().prepare_invoke();
    call.key(format!("meshgate:quota:{{{consumer}}}:{}", w.key))
        .arg(limit)
        .arg(w.end.saturating_add(KEEP_AFTER_END));
    let answer: Vec<u64> = redis.invoke(call).await?;
    match answer[..] {
        [1, used] => Ok(Take::Admitted { used }),
        [0, used] => Ok(Take::Exceeded { used }),
        _ => Err("unexpected answer from the quota script".into()),
    }
}

impl Filter for Quota {
    fn name(&self) -> &'static str {
        "quota"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        _req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let Some(consumer) = ctx.consumer.clone() else {
            return Step::Done(Ok(Flow::Continue));
        };
        let Some(q) = consumer.quota else {
            return Step::Done(Ok(Flow::Continue));
        };
        let calendar = match q.per.unwrap_or(self.per) {
            QuotaPeriod::Day => &self.day,
            QuotaPeriod::Month => &self.month,
        };
        let now = meshgate_meter::unix_now();
        let w = calendar.window(now);
        match &self.store {
            Store::Local => {
                let take =
                    meshgate_meter::meter()
                        .quota
                        .take(&consumer.name, &w.key, q.requests, w.end);
                Step::Done(self.decide(ctx, q.requests, take, calendar.period(), &w, now))
            }
            Store::Cluster { redis, fail_mode } => Step::Pending(Box::pin(async move {
                match take_shared(redis, &consumer.name, &w, q.requests).await {
                    Ok(take) => self.decide(ctx, q.requests, take, calendar.period(), &w, now),
                    Err(e) => fail_mode.answer(&self.counters, "quota", &e),
                }
            })),
        }
    }

    fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        if let Some(d) = ctx.extensions.get::<Decided>() {
            let (policy, state) = items(d);
            super::append_item(&mut resp.headers, RATELIMIT_POLICY, policy);
            super::append_item(&mut resp.headers, RATELIMIT, state);
        }
    }
}
