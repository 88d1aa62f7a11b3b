//! `rate-limit`: GCRA token buckets per key, in-process (`scope: local`) or shared by
//! every proxy through Redis (`scope: cluster`).
//!
//! Counters belong to the place the filter is written (an Api, or a Policy shared by
//! several Apis) and survive reloads while that filter's config stays the same.
//! Responses carry `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-
//! headers-10) and a refusal carries `Retry-After`.

use super::gcra::{Limit, Report};
use super::redis::{FailMode, Redis, RedisConfig};
use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, FilterResult, Flow, Step};
use http::{HeaderName, HeaderValue};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx, VerifiedClaims};
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// More limits than this on one filter is a config error (the state is a fixed array).
const MAX_LIMITS: usize = 4;
const SHARDS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    key: Option<KeyConfig>,
    #[serde(default)]
    rate: Option<String>,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    limits: Vec<LimitConfig>,
    #[serde(default)]
    scope: Scope,
    #[serde(default)]
    redis: Option<RedisConfig>,
    #[serde(default)]
    fail_mode: FailMode,
    #[serde(default = "crate::yes")]
    headers: bool,
    #[serde(default = "default_max_keys")]
    max_keys: usize,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeyConfig {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LimitConfig {
    rate: String,
    #[serde(default)]
    burst: Option<u64>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scope {
    #[default]
    Local,
    Cluster,
}

fn default_max_keys() -> usize {
    100_000
}

/// One part of the key a bucket is chosen by.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyPart {
    Consumer,
    Ip,
    Api,
    Header(HeaderName),
    Claim(String),
}

impl KeyPart {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "consumer" => Self::Consumer,
            "ip" => Self::Ip,
            "api" => Self::Api,
            _ => match s.split_once(':') {
                Some(("header", h)) => Self::Header(
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("{h:?} is not a valid header name"))?,
                ),
                Some(("claim", c)) if !c.is_empty() => Self::Claim(c.to_string()),
                _ => {
                    return Err(format!(
                        "unknown key {s:?} (use consumer, ip, api, header:NAME or claim:NAME)"
                    ));
                }
            },
        })
    }
}

/// One part of one request's key.
enum KeyValue<'a> {
    Text(std::borrow::Cow<'a, str>),
    Client(std::net::IpAddr),
}

/// A named limit with its precomputed header parts.
#[derive(Debug)]
struct Policy {
    limit: Limit,
    name: String,
}

#[derive(Debug)]
pub struct RateLimit {
    key: Vec<KeyPart>,
    policies: Vec<Policy>,
    /// `RateLimit-Policy`, the same for every response.
    policy_header: Option<HeaderValue>,
    store: Store,
    counters: Arc<Counters>,
    /// Keeps this identity's state registered while a snapshot uses the filter.
    _state: Arc<super::SharedState>,
}

#[derive(Debug)]
enum Store {
    Local(Arc<LocalBuckets>),
    Cluster(Cluster),
}

pub(super) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub(super) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

impl RateLimit {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let key = match &cfg.key {
            None => vec![KeyPart::Ip],
            Some(KeyConfig::One(k)) => {
                vec![KeyPart::parse(k).map_err(|e| BuildError::new("config.key", e))?]
            }
            Some(KeyConfig::Many(ks)) if ks.is_empty() => {
                return Err(BuildError::new("config.key", "name at least one key part"));
            }
            Some(KeyConfig::Many(ks)) => ks
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    KeyPart::parse(k).map_err(|e| BuildError::new(format!("config.key.{i}"), e))
                })
                .collect::<Result<_, _>>()?,
        };
        let policies = policies(&cfg)?;
        let policy_header = cfg.headers.then(|| policy_header(&policies)).flatten();
        let shared = shared_state(ctx.site, Kind::RateLimit, value);
        let store = match (cfg.scope, &cfg.redis) {
            (Scope::Local, Some(_)) => {
                return Err(BuildError::new(
                    "config.redis",
                    "redis is only used with scope: cluster",
                ));
            }
            (Scope::Local, None) => {
                if cfg.max_keys == 0 {
                    return Err(BuildError::new("config.maxKeys", "must be at least 1"));
                }
                Store::Local(shared.buckets(cfg.max_keys))
            }
            (Scope::Cluster, None) => {
                return Err(BuildError::new(
                    "config.redis",
                    "scope: cluster needs redis: {url: \"redis://HOST:PORT\"}",
                ));
            }
            (Scope::Cluster, Some(r)) => {
                Store::Cluster(Cluster::from_config(r, cfg.fail_mode, ctx, shared.id())?)
            }
        };
        Ok(Self {
            key,
            policies,
            policy_header,
            store,
            counters: shared.counters(),
            _state: shared,
        })
    }

    /// The key parts of this request. Parts that are absent (no Consumer, header or
    /// claim) fall back to the client address, so leaving them out is no way around
    /// the limit.
    fn key_parts<'a>(
        &'a self,
        ctx: &'a RequestCtx,
        req: &'a http::request::Parts,
    ) -> impl Iterator<Item = KeyValue<'a>> + 'a {
        self.key.iter().map(move |part| {
            let value: Option<std::borrow::Cow<'a, str>> = match part {
                KeyPart::Consumer => ctx.consumer.as_ref().map(|c| (&*c.name).into()),
                KeyPart::Ip => None,
                KeyPart::Api => Some(ctx.api.as_deref().unwrap_or("").into()),
                KeyPart::Header(h) => req
                    .headers
                    .get(h)
                    .map(|v| String::from_utf8_lossy(v.as_bytes())),
                KeyPart::Claim(c) => ctx
                    .extensions
                    .get::<VerifiedClaims>()
                    .and_then(|claims| claims.text(c)),
            };
            value.map_or(KeyValue::Client(ctx.client_addr.ip()), KeyValue::Text)
        })
    }

    /// The key as text, for Redis.
    fn key_string(&self, ctx: &RequestCtx, req: &http::request::Parts) -> String {
        use std::fmt::Write;
        let mut key = String::new();
        for (i, v) in self.key_parts(ctx, req).enumerate() {
            if i > 0 {
                key.push('\u{1f}');
            }
            let _ = match v {
                KeyValue::Text(t) => write!(key, "={t}"),
                KeyValue::Client(ip) => write!(key, "@{ip}"),
            };
        }
        key
    }

    /// The key as a seeded hash, for the local buckets (no string is built).
    fn key_hash(
        &self,
        ctx: &RequestCtx,
        req: &http::request::Parts,
        seed: &impl BuildHasher,
    ) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = seed.build_hasher();
        for v in self.key_parts(ctx, req) {
            match v {
                KeyValue::Text(t) => (0u8, &*t).hash(&mut h),
                KeyValue::Client(ip) => (1u8, ip).hash(&mut h),
            }
        }
        h.finish()
    }

    /// Record the reports for the response headers, or refuse.
    fn decide(&self, ctx: &mut RequestCtx, reports: Reports) -> FilterResult {
        let allowed = reports.iter().all(|r| r.allowed);
        let outcome = if allowed {
            Outcome::Allowed
        } else {
            Outcome::Limited
        };
        self.counters.record(outcome as usize);
        if allowed {
            if self.policy_header.is_some() {
                ctx.extensions.insert(Decided(reports));
            }
            return Ok(Flow::Continue);
        }
        let wait = reports
            .iter()
            .filter(|r| !r.allowed)
            .map(|r| r.retry_after)
            .max()
            .unwrap_or_default();
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut e = GatewayError::new(ErrorCode::RateLimited, "rate limit exceeded")
            .with_header(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        if let Some(p) = &self.policy_header {
            e = e.with_header(RATELIMIT_POLICY, p.clone());
            if let Some(v) = self.state_header(&reports) {
                e = e.with_header(RATELIMIT, v);
            }
        }
        Err(e)
    }

    /// `RateLimit: "name";r=REMAINING;t=SECONDS, ...`
    fn state_header(&self, reports: &Reports) -> Option<HeaderValue> {
        use std::fmt::Write;
        let mut s = String::new();
        for (p, r) in self.policies.iter().zip(reports.iter()) {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let t = r.reset.as_secs() + u64::from(r.reset.subsec_nanos() > 0);
            let _ = write!(s, "\"{}\";r={};t={}", p.name, r.remaining, t);
        }
        HeaderValue::from_str(&s).ok()
    }
}

/// What became of one request (indexes of [`Kind::metric`]'s result names).
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Allowed = 0,
    Limited = 1,
}

/// Reports of every limit, in config order: up to [`MAX_LIMITS`], without an
/// allocation.
#[derive(Debug, Clone, Copy)]
struct Reports {
    items: [Option<Report>; MAX_LIMITS],
}

impl Reports {
    fn new() -> Self {
        Self {
            items: [None; MAX_LIMITS],
        }
    }

    fn push(&mut self, r: Report) {
        if let Some(slot) = self.items.iter_mut().find(|s| s.is_none()) {
            *slot = Some(r);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Report> {
        self.items.iter().map_while(Option::as_ref)
    }
}

/// The reports of an admitted request, for its response headers.
#[derive(Debug, Clone, Copy)]
struct Decided(Reports);

fn policies(cfg: &Config) -> Result<Vec<Policy>, BuildError> {
    let mut out = Vec::new();
    match (&cfg.rate, cfg.limits.is_empty()) {
        (Some(_), false) => {
            return Err(BuildError::new(
                "config.limits",
                "give either rate (and burst) or limits, not both",
            ));
        }
        (None, true) => {
            return Err(BuildError::new(
                "config.rate",
                "a rate is required, e.g. rate: 100/s",
            ));
        }
        (Some(rate), true) => {
            let limit =
                Limit::parse(rate, cfg.burst).map_err(|e| BuildError::new("config.rate", e))?;
            out.push(Policy {
                limit,
                name: rate.replace('"', ""),
            });
        }
        (None, false) => {
            if cfg.burst.is_some() {
                return Err(BuildError::new(
                    "config.burst",
                    "with limits, give burst on each limit",
                ));
            }
            if cfg.limits.len() > MAX_LIMITS {
                return Err(BuildError::new(
                    "config.limits",
                    format!("at most {MAX_LIMITS} limits per filter"),
                ));
            }
            for (i, l) in cfg.limits.iter().enumerate() {
                let limit = Limit::parse(&l.rate, l.burst)
                    .map_err(|e| BuildError::new(format!("config.limits.{i}.rate"), e))?;
                let name = l.name.clone().unwrap_or_else(|| l.rate.clone());
                if name.is_empty()
                    || name
                        .bytes()
                        .any(|b| b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b))
                {
                    return Err(BuildError::new(
                        format!("config.limits.{i}.name"),
                        "a limit name is printable ASCII without quotes or backslashes",
                    ));
                }
                if out.iter().any(|p: &Policy| p.name == name) {
                    return Err(BuildError::new(
                        format!("config.limits.{i}.name"),
                        format!("two limits are named {name:?}"),
                    ));
                }
                out.push(Policy { limit, name });
            }
        }
    }
    Ok(out)
}

/// `RateLimit-Policy: "name";q=COUNT;w=SECONDS, ...` (burst shows as `q` when the
/// period is the window; a burst other than the count is not expressible and left out).
fn policy_header(policies: &[Policy]) -> Option<HeaderValue> {
    let items: Vec<String> = policies
        .iter()
        .map(|p| {
            format!(
                "\"{}\";q={};w={}",
                p.name,
                p.limit.count,
                p.limit.window_secs()
            )
        })
        .collect();
    HeaderValue::from_str(&items.join(", ")).ok()
}

impl Filter for RateLimit {
    fn name(&self) -> &'static str {
        "rate-limit"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        match &self.store {
            Store::Local(b) => {
                let key = self.key_hash(ctx, req, &b.hasher);
                let reports = b.check(key, &self.policies, b.now());
                Step::Done(self.decide(ctx, reports))
            }
            Store::Cluster(c) => Step::Pending(Box::pin(async move {
                let key = self.key_string(ctx, req);
                match c.check(&key, &self.policies).await {
                    Ok(reports) => self.decide(ctx, reports),
                    Err(e) => c.fail_mode.answer(&self.counters, "rate limit", &e),
                }
            })),
        }
    }

    fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        let (Some(policy), Some(Decided(reports))) =
            (&self.policy_header, ctx.extensions.get::<Decided>())
        else {
            return;
        };
        super::append_item(&mut resp.headers, RATELIMIT_POLICY, policy.clone());
        if let Some(v) = self.state_header(reports) {
            super::append_item(&mut resp.headers, RATELIMIT, v);
        }
    }
}

/// In-process buckets: one TAT per limit per key, in shards to keep lock hold short.
#[derive(Debug)]
pub(super) struct LocalBuckets {
    shards: Vec<Mutex<HashMap<u64, [u64; MAX_LIMITS]>>>,
    hasher: foldhash::quality::RandomState,
    per_shard: usize,
    epoch: Instant,
}

const NANO: Duration = Duration::from_nanos(1);

impl LocalBuckets {
    pub(super) fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: foldhash::quality::RandomState::default(),
            per_shard: max_keys.div_ceil(SHARDS),
            // TATs are nanoseconds since this instant, which is never 0 for a live bucket.
            epoch: Instant::now() - Duration::from_secs(1),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Check every limit for the key hashed to `h` at `now`; take a token from each only when all admit.
    fn check(&self, h: u64, policies: &[Policy], now: u64) -> Reports {
        let shard = &self.shards[(h as usize) % SHARDS];
        let Ok(mut map) = shard.lock() else {
            return Reports::new();
        };
        if map.len() >= self.per_shard && !map.contains_key(&h) {
            evict(&mut map, now, self.per_shard);
        }
        let tats = map.entry(h).or_insert([0; MAX_LIMITS]);
        let allowed = policies
            .iter()
            .zip(tats.iter())
            .all(|(p, &tat)| p.limit.admits(tat, now, NANO));
        let mut reports = Reports::new();
        for (p, tat) in policies.iter().zip(tats.iter_mut()) {
            if allowed {
                *tat = p.limit.advance(*tat, now, NANO);
            }
            reports.push(p.limit.report(allowed, tat.saturating_sub(now), NANO));
        }
        reports
    }
}

/// Make room in a full shard: buckets that have refilled completely are the same as
/// absent ones and go first; if that frees less than a tenth, arbitrary buckets go too
/// (those keys start again with a full bucket — documented: size maxKeys for the
/// number of live keys you expect).
fn evict(map: &mut HashMap<u64, [u64; MAX_LIMITS]>, now: u64, cap: usize) {
    map.retain(|_, tats| tats.iter().any(|&t| t > now));
    let target = cap - cap / 10;
    if map.len() > target {
        let drop: Vec<u64> = map.keys().take(map.len() - target).copied().collect();
        for k in drop {
            map.remove(&k);
        }
    }
}

/// The cluster scope: one Redis script call per request, checking and taking from
/// every limit atomically with Redis's own clock.
#[derive(Debug)]
struct Cluster {
    redis: Redis,
    fail_mode: FailMode,
    /// Prefix of every key: the filter's identity, with a hash tag so one request's
    /// keys land in one slot of a Redis cluster.
    prefix: String,
}

/// GCRA over N keys. ARGV: per limit, interval and tolerance (µs). Returns
/// {allowed, ahead_1, ..., ahead_n}: the TAT's distance past now, after the request
/// when admitted, before it when refused.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
local ok = 1
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  if tat - now > tonumber(ARGV[2 * i]) then ok = 0 end
end
local out = {ok}
for i = 1, n do
  local tat = tats[i]
  if ok == 1 then
    tat = tat + tonumber(ARGV[2 * i - 1])
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  end
  out[i + 1] = tat - now
end
return out
";

fn script() -> &'static redis::Script {
    static S: OnceLock<redis::Script> = OnceLock::new();
    S.get_or_init(|| redis::Script::new(SCRIPT))
}

const MICRO: Duration = Duration::from_micros(1);

impl Cluster {
    fn from_config(
        r: &RedisConfig,
        fail_mode: FailMode,
        ctx: BuildCtx<'_>,
        id: &str,
    ) -> Result<Self, BuildError> {
        Ok(Self {
            redis: Redis::from_config(r, ctx)?,
            fail_mode,
            prefix: format!("meshgate:rl:{{{id}}}:"),
        })
    }

    async fn check(&self, key: &str, policies: &[Policy]) -> Result<Reports, String> {
        let mut call = script().prepare_invoke();
        for (i, p) in policies.iter().enumerate() {
            call.key(format!("{}{key}:{i}", self.prefix));
            call.arg(p.limit.interval(MICRO))
                .arg(p.limit.tolerance(MICRO));
        }
        let answer: Vec<i64> = self.redis.invoke(call).await?;
        let (Some(&ok), rest) = (answer.first(), answer.get(1..).unwrap_or_default()) else {
            return Err("empty answer from the rate-limit script".into());
        };
        if rest.len() != policies.len() {
            return Err("unexpected answer from the rate-limit script".into());
        }
        let mut reports = Reports::new();
        for (p, &ahead) in policies.iter().zip(rest) {
            reports.push(p.limit.report(ok == 1, ahead.max(0) as u64, MICRO));
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(specs: &[(&str, u64)]) -> Vec<Policy> {
        specs
            .iter()
            .map(|(r, b)| Policy {
                limit: Limit::parse(r, Some(*b)).unwrap_or_else(|e| panic!("{e}")),
                name: r.to_string(),
            })
            .collect()
    }

    #[test]
    fn all_limits_must_admit_and_a_refusal_takes_nothing() {
        let b = LocalBuckets::new(100);
        let p = policies(&[("10/s", 3), ("4/m", 4)]);
        let allowed = |now| b.check(1, &p, now).iter().all(|r| r.allowed);
        let t0 = 5_000_000_000;
        // Three at once (the per-second burst), then the fourth is refused...
        assert!(allowed(t0) && allowed(t0) && allowed(t0));
        assert!(!allowed(t0));
        // ...and did not use the per-minute budget: one more passes after 100 ms.
        assert!(allowed(t0 + 100_000_000));
        // Now the per-minute limit (4) is spent even though the per-second one refilled.
        assert!(!allowed(t0 + 2_000_000_000));
        let r = b.check(1, &p, t0 + 2_000_000_000);
        let waits: Vec<_> = r.iter().map(|x| x.retry_after).collect();
        assert!(waits[1] > Duration::from_secs(10), "{waits:?}");
        // Another key is untouched.
        assert!(b.check(2, &p, t0).iter().all(|r| r.allowed));
    }

    #[test]
    fn full_shards_evict_refilled_buckets_first() {
        let b = LocalBuckets::new(SHARDS * 10);
        let p = policies(&[("1/s", 1)]);
        for i in 0..1000 {
            b.check(i, &p, 1_000);
        }
        let total: usize = b
            .shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum();
        assert!(total <= SHARDS * 10, "{total}");
        // Long after, every bucket has refilled: a new key evicts them rather than others.
        for i in 0..100 {
            b.check(10_000 + i, &p, 10_000_000_000);
        }
        let live: usize = b
            .shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum();
        assert!(live <= 100 + SHARDS, "{live}");
    }
}
