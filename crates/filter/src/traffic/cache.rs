//! `cache`: a response cache in memory, shared by every request through the same
//! filter (and kept across reloads that leave it unchanged).
//!
//! A GET is looked up by its key (chosen parts of the request). A fresh entry
//! answers at once (`x-cache: HIT`). A miss goes upstream (`x-cache: MISS`), and its
//! response is stored when it may be: a configured status, no `no-store`, `private`,
//! `no-cache` or `Set-Cookie`, a body within `maxBodyBytes`. Its lifetime is
//! `s-maxage` or `max-age` when the response gives one, else `ttl`. Misses coalesce:
//! while one request for a key is being filled, others for the same key wait for its
//! answer (up to `lockTimeout`) instead of going upstream too. Requests that are not
//! GET, or carry `Cache-Control: no-store`, pass by (`x-cache: BYPASS`).

use super::{Counters, Kind, shared_state};
use crate::registry::{BuildCtx, BuildError};
use crate::{Filter, Flow, Step};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use meshgate_core::{BodyTap, RequestCtx, ResponseTap};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    key: Option<Vec<String>>,
    #[serde(default)]
    max_entries: Option<u64>,
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    statuses: Option<Vec<u16>>,
    #[serde(default)]
    lock_timeout: Option<String>,
}

/// One part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Method,
    Host,
    Path,
    /// The whole query string.
    Query,
    QueryParam(String),
    Header(HeaderName),
    Consumer,
}

impl Part {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s.split_once(':') {
            None if s == "method" => Self::Method,
            None if s == "host" => Self::Host,
            None if s == "path" => Self::Path,
            None if s == "query" => Self::Query,
            None if s == "consumer" => Self::Consumer,
            Some(("query", n)) if !n.is_empty() => Self::QueryParam(n.to_string()),
            Some(("header", n)) => Self::Header(
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("{n:?} is not a header name"))?,
            ),
            _ => {
                return Err(format!(
                    "{s:?} is not a key part: use method, host, path, query, query:NAME, header:NAME or consumer"
                ));
            }
        })
    }
}

/// A stored response.
#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
    ttl: Duration,
    /// The request's values of the headers the response `Vary`s on.
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl Entry {
    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary.iter().all(|(n, v)| req.get(n) == v.as_ref())
    }

    fn response(&self) -> http::Response<Bytes> {
        let mut r = http::Response::new(self.body.clone());
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers.clone();
        let age = self.stored.elapsed().as_secs();
        r.headers_mut().insert(header::AGE, HeaderValue::from(age));
        r
    }
}

struct Expiry;

impl moka::Expiry<Vec<u8>, Arc<Entry>> for Expiry {
    fn expire_after_create(&self, _: &Vec<u8>, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.ttl)
    }
}

type Filling = Mutex<HashMap<Vec<u8>, watch::Receiver<Option<Arc<Entry>>>>>;

/// The entries of one cache filter, and the keys being filled now.
pub(super) struct Store {
    entries: moka::sync::Cache<Vec<u8>, Arc<Entry>>,
    filling: Filling,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl Store {
    pub(super) fn new(max_entries: u64, max_bytes: u64) -> Self {
        // Every entry weighs at least its share of the byte bound, so the byte bound
        // also caps the number of entries.
        let floor = (max_bytes / max_entries.max(1)).max(1);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |k: &Vec<u8>, e: &Arc<Entry>| {
                let headers: usize = e
                    .headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len())
                    .sum();
                let size = (k.len() + e.body.len() + headers) as u64;
                u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
            })
            .expire_after(Expiry)
            .build();
        Self {
            entries,
            filling: Mutex::new(HashMap::new()),
        }
    }

    fn fresh(&self, key: &[u8], req: &HeaderMap) -> Option<Arc<Entry>> {
        self.entries.get(key).filter(|e| e.matches(req))
    }

    /// A fresh entry for `key`, or the fill of `key` in progress to wait on, or the
    /// sender of a new fill that this request makes.
    fn claim(&self, key: &[u8], req: &HeaderMap) -> Claim {
        match self.fresh(key, req) {
            Some(e) => Claim::Hit(e),
            None => self.join_or_fill(key, req),
        }
    }

    /// `claim` after a look-up that missed.
    fn join_or_fill(&self, key: &[u8], req: &HeaderMap) -> Claim {
        let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = filling.get(key) {
            return Claim::Wait(rx.clone());
        }
        // A fill stores its entry before it leaves `filling`: one that finished since
        // the look-up above is seen now, and this request does not go upstream again.
        if let Some(e) = self.fresh(key, req) {
            return Claim::Hit(e);
        }
        let (tx, rx) = watch::channel(None);
        filling.insert(key.to_vec(), rx);
        Claim::Fill(tx)
    }
}

enum Claim {
    Hit(Arc<Entry>),
    Wait(watch::Receiver<Option<Arc<Entry>>>),
    Fill(watch::Sender<Option<Arc<Entry>>>),
}

/// A request that went upstream to fill its key: what the response tap needs. Dropped
/// without completing (not storable, failed, cut short), it lets the requests waiting
/// on it go upstream themselves.
struct Fill {
    store: Arc<Store>,
    key: Vec<u8>,
    /// Set when other requests may be waiting on this fill.
    tx: Option<watch::Sender<Option<Arc<Entry>>>>,
}

impl Fill {
    fn complete(mut self, entry: Entry) {
        let entry = Arc::new(entry);
        self.store.entries.insert(self.key.clone(), entry.clone());
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(entry));
            self.unregister();
        }
    }

    fn unregister(&self) {
        let mut filling = self.store.filling.lock().unwrap_or_else(|e| e.into_inner());
        filling.remove(&self.key);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.unregister();
        }
    }
}

/// What this filter decided for a request, kept from its request to response phase.
#[derive(Clone)]
enum State {
    Hit,
    Bypass,
    /// A miss that will not be stored (its coalesced fill failed).
    Pass,
    Miss {
        fill: Arc<Mutex<Option<Fill>>>,
        request: Arc<HeaderMap>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Hit = 0,
    Miss = 1,
    Bypass = 2,
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub struct Cache {
    store: Arc<Store>,
    key: Vec<Part>,
    ttl: Duration,
    statuses: Vec<u16>,
    max_body: u64,
    lock_timeout: Duration,
    counters: Arc<Counters>,
    _state: Arc<super::SharedState>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("key", &self.key).finish()
    }
}

impl Cache {
    pub fn from_config(value: &serde_json::Value, ctx: BuildCtx<'_>) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let ttl = crate::duration_or("config.ttl", cfg.ttl.as_deref(), Duration::from_secs(60))?;
        let lock_timeout = crate::duration_or(
            "config.lockTimeout",
            cfg.lock_timeout.as_deref(),
            Duration::from_secs(5),
        )?;
        let names = cfg.key.unwrap_or_else(|| {
            ["method", "host", "path", "query"]
                .map(String::from)
                .to_vec()
        });
        if names.is_empty() {
            return Err(BuildError::new(
                "config.key",
                "the key needs at least one part",
            ));
        }
        let mut key = Vec::new();
        for (i, n) in names.iter().enumerate() {
            key.push(Part::parse(n).map_err(|e| BuildError::new(format!("config.key.{i}"), e))?);
        }
        let max_entries = cfg.max_entries.unwrap_or(10_000);
        let max_bytes = cfg.max_bytes.unwrap_or(64 << 20);
        let max_body = cfg.max_body_bytes.unwrap_or(1 << 20);
        for (field, v) in [
            ("config.maxEntries", max_entries),
            ("config.maxBytes", max_bytes),
            ("config.maxBodyBytes", max_body),
        ] {
            if v == 0 {
                return Err(BuildError::new(field, "must be at least 1"));
            }
        }
        if max_body > max_bytes.min(u64::from(u32::MAX)) {
            return Err(BuildError::new(
                "config.maxBodyBytes",
                "must not exceed maxBytes (nor 4 GiB)",
            ));
        }
        let statuses = cfg.statuses.unwrap_or_else(|| vec![200, 301]);
        if let Some(bad) = statuses.iter().find(|s| !(200..=599).contains(*s)) {
            return Err(BuildError::new(
                "config.statuses",
                format!("{bad} is not a final status"),
            ));
        }
        let state = shared_state(ctx.site, Kind::Cache, value);
        Ok(Self {
            store: state.cache(max_entries, max_bytes),
            counters: state.counters(),
            _state: state,
            key,
            ttl,
            statuses,
            max_body,
            lock_timeout,
        })
    }

    fn key(&self, ctx: &RequestCtx, req: &http::request::Parts) -> Vec<u8> {
        let mut k = Vec::with_capacity(128);
        let mut put = |b: &[u8]| {
            k.extend_from_slice(&(b.len() as u32).to_le_bytes());
            k.extend_from_slice(b);
        };
        let query = req.uri.query().unwrap_or("");
        for p in &self.key {
            match p {
                Part::Method => put(req.method.as_str().as_bytes()),
                Part::Host => put(req
                    .headers
                    .get(header::HOST)
                    .map_or(&b""[..], |h| h.as_bytes())),
                Part::Path => put(req.uri.path().as_bytes()),
                Part::Query => put(query.as_bytes()),
                Part::QueryParam(n) => {
                    for v in crate::query_values(query, n) {
                        put(&v);
                    }
                    put(b"\0");
                }
                Part::Header(n) => {
                    for v in req.headers.get_all(n) {
                        put(v.as_bytes());
                    }
                    put(b"\0");
                }
                Part::Consumer => put(ctx
                    .consumer
                    .as_ref()
                    .map_or(&b"\0"[..], |c| c.name.as_bytes())),
            }
        }
        k
    }

    fn keyed_on(&self, name: &HeaderName) -> bool {
        self.key
            .iter()
            .any(|p| matches!(p, Part::Header(n) if n == name))
    }

    /// How long this response may be kept, or None when it may not be.
    fn lifetime(&self, request: &HeaderMap, resp: &http::response::Parts) -> Option<Duration> {
        if !self.statuses.contains(&resp.status.as_u16())
            || resp.headers.contains_key(header::SET_COOKIE)
        {
            return None;
        }
        let cc = directives(&resp.headers);
        if cc.no_store || cc.private || cc.no_cache {
            return None;
        }
        // A shared cache keeps answers to authenticated requests only when the key
        // tells callers apart or the response says it is public (RFC 9111 §3.5).
        let per_caller =
            self.key.contains(&Part::Consumer) || self.keyed_on(&header::AUTHORIZATION);
        if request.contains_key(header::AUTHORIZATION)
            && !per_caller
            && !cc.public
            && cc.s_max_age.is_none()
        {
            return None;
        }
        let declared = resp
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return None;
        }
        let ttl = cc
            .s_max_age
            .or(cc.max_age)
            .map_or(self.ttl, Duration::from_secs);
        (!ttl.is_zero()).then_some(ttl)
    }

    fn miss(&self, ctx: &mut RequestCtx, req: &http::request::Parts, fill: Fill) {
        self.counters.record(Outcome::Miss as usize);
        ctx.extensions.insert(State::Miss {
            fill: Arc::new(Mutex::new(Some(fill))),
            request: Arc::new(req.headers.clone()),
        });
    }
}

/// The `Cache-Control` directives this cache reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    max_age: Option<u64>,
    s_max_age: Option<u64>,
}

fn directives(h: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for v in h.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let (name, arg) = match item.trim().split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (item.trim(), None),
            };
            let secs = || arg.and_then(|a| a.parse::<u64>().ok());
            match name.to_ascii_lowercase().as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "max-age" => d.max_age = secs().or(Some(0)),
                "s-maxage" => d.s_max_age = secs().or(Some(0)),
                _ => {}
            }
        }
    }
    d
}

/// Collects the body of a response being stored.
struct Tap {
    fill: Fill,
    status: StatusCode,
    headers: HeaderMap,
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    ttl: Duration,
    body: BytesMut,
    limit: u64,
}

impl BodyTap for Tap {
    fn data(&mut self, chunk: &Bytes) -> bool {
        if (self.body.len() + chunk.len()) as u64 > self.limit {
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }

    fn end(self: Box<Self>) {
        let t = *self;
        t.fill.complete(Entry {
            status: t.status,
            headers: t.headers,
            body: t.body.freeze(),
            stored: Instant::now(),
            ttl: t.ttl,
            vary: t.vary,
        });
    }
}

impl Filter for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let asked = directives(&req.headers);
        if req.method != Method::GET || asked.no_store {
            self.counters.record(Outcome::Bypass as usize);
            ctx.extensions.insert(State::Bypass);
            return Step::Done(Ok(Flow::Continue));
        }
        let key = self.key(ctx, req);
        // `no-cache` or `max-age=0` from the client: go upstream, and refresh the entry.
        if asked.no_cache || asked.max_age == Some(0) {
            let fill = Fill {
                store: self.store.clone(),
                key,
                tx: None,
            };
            self.miss(ctx, req, fill);
            return Step::Done(Ok(Flow::Continue));
        }
        let mut rx = match self.store.claim(&key, &req.headers) {
            Claim::Hit(e) => {
                self.counters.record(Outcome::Hit as usize);
                ctx.extensions.insert(State::Hit);
                return Step::Done(Ok(Flow::Respond(Box::new(e.response()))));
            }
            Claim::Fill(tx) => {
                let fill = Fill {
                    store: self.store.clone(),
                    key,
                    tx: Some(tx),
                };
                self.miss(ctx, req, fill);
                return Step::Done(Ok(Flow::Continue));
            }
            Claim::Wait(rx) => rx,
        };
        Step::Pending(Box::pin(async move {
            let filled = tokio::time::timeout(self.lock_timeout, rx.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|r| r.ok().and_then(|e| e.clone()));
            match filled {
                Some(e) if e.matches(&req.headers) => {
                    self.counters.record(Outcome::Hit as usize);
                    ctx.extensions.insert(State::Hit);
                    Ok(Flow::Respond(Box::new(e.response())))
                }
                // The fill failed, was not storable, or took too long: go upstream
                // without storing (the next miss fills again).
                _ => {
                    self.counters.record(Outcome::Miss as usize);
                    ctx.extensions.insert(State::Pass);
                    Ok(Flow::Continue)
                }
            }
        }))
    }

    fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        let (label, fill) = match ctx.extensions.get::<State>() {
            None => return,
            Some(State::Hit) => ("HIT", None),
            Some(State::Bypass) => ("BYPASS", None),
            Some(State::Pass) => ("MISS", None),
            Some(State::Miss { fill, request }) => {
                let fill = fill.lock().unwrap_or_else(|e| e.into_inner()).take();
                ("MISS", fill.map(|f| (f, request.clone())))
            }
        };
        if let Some((fill, request)) = fill
            && let Some(ttl) = self.lifetime(&request, resp)
        {
            let vary = resp
                .headers
                .get_all(header::VARY)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect::<Option<Vec<_>>>();
            // `Vary: *` (or a malformed Vary) never matches a later request.
            if let Some(names) = vary.filter(|v| !v.iter().any(|n| n.as_str() == "*")) {
                let mut headers = resp.headers.clone();
                headers.remove(X_REQUEST_ID);
                resp.extensions.insert(ResponseTap::new(Box::new(Tap {
                    fill,
                    status: resp.status,
                    vary: names
                        .into_iter()
                        .map(|n| {
                            let v = request.get(&n).cloned();
                            (n, v)
                        })
                        .collect(),
                    headers,
                    ttl,
                    body: BytesMut::new(),
                    limit: self.max_body,
                })));
            }
        }
        resp.headers
            .insert(X_CACHE, HeaderValue::from_static(label));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_directives() {
        let mut h = HeaderMap::new();
        h.append(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60"),
        );
        h.append(
            header::CACHE_CONTROL,
            HeaderValue::from_static("S-MaxAge=\"5\""),
        );
        let d = directives(&h);
        assert_eq!(
            d,
            Directives {
                public: true,
                max_age: Some(60),
                s_max_age: Some(5),
                ..Default::default()
            }
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store,private"),
        );
        let d = directives(&h);
        assert!(d.no_store && d.private && !d.no_cache);
    }

    #[test]
    fn the_store_is_bounded_by_entries_and_bytes() {
        let entry = |n: usize| {
            Arc::new(Entry {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from(vec![b'x'; n]),
                stored: Instant::now(),
                ttl: Duration::from_secs(60),
                vary: Vec::new(),
            })
        };
        // (max entries, max bytes, body size, inserted, most entries kept)
        let table = [(10, 1 << 20, 10, 100, 10), (1000, 10_000, 1000, 100, 10)];
        for (max_entries, max_bytes, size, n, most) in table {
            let s = Store::new(max_entries, max_bytes);
            for i in 0..n {
                s.entries.insert(format!("k{i}").into_bytes(), entry(size));
                s.entries.run_pending_tasks();
            }
            let kept = s.entries.entry_count();
            assert!(
                kept <= most && kept > 0,
                "{max_entries} {max_bytes}: kept {kept}"
            );
        }
    }

    #[test]
    fn a_fill_that_finished_before_the_claim_is_a_hit_not_a_second_fill() {
        let store = Arc::new(Store::new(10, 1 << 20));
        let headers = HeaderMap::new();
        let Claim::Fill(tx) = store.claim(b"k", &headers) else {
            panic!("the first request for a key fills it");
        };
        assert!(matches!(store.claim(b"k", &headers), Claim::Wait(_)));
        let fill = Fill {
            store: store.clone(),
            key: b"k".to_vec(),
            tx: Some(tx),
        };
        fill.complete(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"once"),
            stored: Instant::now(),
            ttl: Duration::from_secs(60),
            vary: Vec::new(),
        });
        assert!(store.filling.lock().is_ok_and(|f| f.is_empty()));
        // A request whose look-up missed just before the fill completed, and which
        // takes the lock just after: it gets the stored entry, not a key to fill again.
        match store.join_or_fill(b"k", &headers) {
            Claim::Hit(e) => assert_eq!(e.body, "once"),
            Claim::Wait(_) | Claim::Fill(_) => panic!("a finished fill is a hit"),
        }
    }

    #[test]
    fn key_parts_parse() {
        assert_eq!(Part::parse("query:id"), Ok(Part::QueryParam("id".into())));
        assert!(matches!(
            Part::parse("header:x-tenant"),
            Ok(Part::Header(_))
        ));
        assert!(Part::parse("cookie:sid").is_err());
        assert!(Part::parse("header:bad header").is_err());
    }
}
