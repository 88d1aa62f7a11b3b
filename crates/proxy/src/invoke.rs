//! The invoke phase for an upstream Api: split → balance → connect → retry/timeout.

use crate::body::{Inbound, LimitedBody, ResponseBody, UpstreamBody};
use crate::client::Transport;
use crate::forwarded::Outgoing;
use crate::state::{Active, ClusterRt};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use meshgate_config::{Split, Target, Upstream};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use meshgate_upstream::{Observed, TryOutcome};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bodies up to this size are buffered when retries are configured, so a retry can
/// replay them; larger bodies stream and are never replayed.
const REPLAY_BUFFER: u64 = 64 * 1024;

/// What the upstream answered, and which endpoint did.
pub struct Answer {
    pub response: Response<ResponseBody>,
    /// None for a fallback answered without calling the Service.
    pub endpoint: Option<SocketAddr>,
    /// From the first try's start to the answering try's response head.
    pub elapsed: Duration,
}

/// A failed try, from either transport.
struct TryError {
    connect: bool,
    error: Box<dyn std::error::Error + Send + Sync>,
}

type Tried = Result<Result<Response<ResponseBody>, TryError>, tokio::time::error::Elapsed>;

/// One transport's try result in the common shape.
fn settle<B, E: std::error::Error + Send + Sync + 'static>(
    r: Result<Result<Response<B>, E>, tokio::time::error::Elapsed>,
    wrap: fn(B) -> ResponseBody,
    is_connect: fn(&E) -> bool,
) -> Tried {
    r.map(|r| {
        r.map(|resp| resp.map(wrap)).map_err(|e| TryError {
            connect: is_connect(&e),
            error: Box::new(e),
        })
    })
}

fn pick_target<'a>(split: &'a Split, headers: &HeaderMap) -> &'a Target {
    for (conds, target) in &split.matched {
        if conds
            .iter()
            .all(|(n, v)| headers.get(n).is_some_and(|h| h.as_bytes() == v.as_bytes()))
        {
            return target;
        }
    }
    if let Some((last, _)) = split.weighted.last() {
        let roll = fastrand::u32(0..100);
        if roll < *last
            && let Some((_, t)) = split.weighted.iter().find(|(cum, _)| roll < *cum)
        {
            return t;
        }
    }
    &split.baseline
}

/// Parse `grpc-timeout` (`1S`, `500m`, `100u`...).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Prepare the body once: replayable when small and retries may need it.
///
/// A streamed body comes with the flag its reader raises past `limit` (a failed try
/// is then the client's 413, not the upstream's fault); the other bodies need none,
/// and a bodiless request allocates nothing here.
async fn prepare_body(
    body: Inbound,
    parts: &http::request::Parts,
    limit: u64,
    retries: bool,
) -> Result<(UpstreamBody, Option<Arc<AtomicBool>>), GatewayError> {
    use http_body::Body;
    let body = match body {
        Inbound::Buffered(b) if b.is_empty() => return Ok((UpstreamBody::Empty, None)),
        Inbound::Buffered(b) => return Ok((UpstreamBody::Full(Some(b)), None)),
        Inbound::Stream(b) => b,
    };
    if body.is_end_stream() {
        return Ok((UpstreamBody::Empty, None));
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    match crate::body::content_length(&parts.headers) {
        Some(n) if retries && n <= REPLAY_BUFFER => {
            let whole = collect_limited(body, limit, &exceeded).await?;
            Ok((UpstreamBody::Full(Some(whole)), None))
        }
        _ => {
            let limited = LimitedBody {
                inner: body,
                remaining: limit,
                exceeded: exceeded.clone(),
            };
            Ok((UpstreamBody::Stream(limited), Some(exceeded)))
        }
    }
}

/// Read the whole client body, failing with 413 past `limit` bytes.
pub async fn collect_limited(
    body: crate::body::RequestBody,
    limit: u64,
    exceeded: &Arc<AtomicBool>,
) -> Result<bytes::Bytes, GatewayError> {
    let limited = LimitedBody {
        inner: body,
        remaining: limit,
        exceeded: exceeded.clone(),
    };
    let collected = UpstreamBody::Stream(limited).collect().await.map_err(|_| {
        if exceeded.load(Ordering::Relaxed) {
            GatewayError::new(ErrorCode::PayloadTooLarge, "request body is too large")
        } else {
            GatewayError::new(ErrorCode::InvalidRequest, "request body ended early")
        }
    })?;
    Ok(collected.to_bytes())
}

fn replay(body: &UpstreamBody) -> Option<UpstreamBody> {
    match body {
        UpstreamBody::Empty => Some(UpstreamBody::Empty),
        UpstreamBody::Full(b) => Some(UpstreamBody::Full(b.clone())),
        UpstreamBody::Stream(_) => None,
    }
}

/// The error for a try that may not be retried. `expired` is the overall timeout
/// when it, rather than a per-try timeout, ran out.
fn upstream_error(outcome: TryOutcome, service: &str, expired: Option<Duration>) -> GatewayError {
    match outcome {
        TryOutcome::ConnectFailure => GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            format!("could not connect to service {service:?}"),
        ),
        TryOutcome::Reset => GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            format!("service {service:?} closed the connection before answering"),
        ),
        TryOutcome::Timeout => GatewayError::new(
            ErrorCode::UpstreamTimeout,
            match expired {
                Some(t) => format!("service {service:?} did not answer within {t:?}"),
                None => format!("service {service:?} did not answer in time"),
            },
        ),
        // A status is only an error when a retry on it ran out of time or tries; the
        // response itself is returned otherwise.
        TryOutcome::Status(_) => {
            GatewayError::new(ErrorCode::UpstreamUnavailable, "upstream error")
        }
    }
}

/// Call the upstream for `up`, with retries and timeouts. `parts` already carries
/// the rewritten path and the forwarding headers.
pub async fn call(
    active: &Active,
    own: Option<&Arc<ClusterRt>>,
    up: &Upstream,
    ctx: &RequestCtx,
    out: &mut Outgoing,
    body: Inbound,
    body_limit: u64,
) -> Result<Answer, GatewayError> {
    let start = Instant::now();
    let target = pick_target(&up.split, &out.parts.headers);
    let name = target.service.as_deref().unwrap_or(&up.service);
    let rt: &Arc<ClusterRt> = match (&target.service, own) {
        (None, Some(rt)) => rt,
        _ => active.clusters.get(name).ok_or_else(|| {
            GatewayError::new(
                ErrorCode::NoHealthyUpstream,
                format!("service {name:?} is not configured"),
            )
        })?,
    };
    let Some(breaker) = &rt.breaker else {
        return tries(rt, name, target, up, ctx, out, body, body_limit, start).await;
    };
    let ticket = match breaker.admit(start) {
        Ok(t) => t,
        Err(refusal) => {
            rt.stats.breaker_refused.inc();
            return refused(rt, name, refusal);
        }
    };
    let result = tries(rt, name, target, up, ctx, out, body, body_limit, start).await;
    let failed = match &result {
        Ok(a) => a.response.status().is_server_error(),
        Err(e) => matches!(
            e.code,
            ErrorCode::UpstreamUnavailable | ErrorCode::UpstreamTimeout
        ),
    };
    if breaker.record(ticket, failed, Instant::now()) {
        rt.stats.breaker_opened.inc();
        tracing::warn!(service = name, "circuit breaker opened");
    }
    result
}

/// The answer while a Service's breaker refuses: its fallback, or 503 `circuit_open`.
fn refused(
    rt: &ClusterRt,
    name: &str,
    refusal: meshgate_upstream::Refusal,
) -> Result<Answer, GatewayError> {
    let fallback = rt
        .service
        .circuit_breaker
        .as_ref()
        .and_then(|cb| cb.fallback.as_ref());
    if let Some(m) = fallback {
        let mut r = Response::new(ResponseBody::full(m.body.clone()));
        *r.status_mut() = m.status;
        *r.headers_mut() = m.headers.clone();
        return Ok(Answer {
            response: r,
            endpoint: None,
            elapsed: Duration::ZERO,
        });
    }
    let why = match refusal {
        meshgate_upstream::Refusal::Open => "its circuit breaker is open",
        meshgate_upstream::Refusal::Full => "it has its maximum of requests in flight",
        meshgate_upstream::Refusal::Pending => {
            "its maximum of requests already wait for a connection"
        }
    };
    Err(GatewayError::new(
        ErrorCode::CircuitOpen,
        format!("service {name:?} is not being called: {why}"),
    )
    .retry_safe())
}

/// Send the request to the Service's endpoints: balance, connect, retry, time out.
#[allow(clippy::too_many_arguments)]
async fn tries(
    rt: &ClusterRt,
    name: &str,
    target: &Target,
    up: &Upstream,
    ctx: &RequestCtx,
    out: &mut Outgoing,
    body: Inbound,
    body_limit: u64,
    start: Instant,
) -> Result<Answer, GatewayError> {
    // Borrowed, not moved: a request head is a few hundred bytes, and every future it
    // moved into would copy it.
    let Outgoing { parts, forwarded } = out;
    let mut timeout = up.timeout;
    if ctx.grpc
        && let Some(t) = grpc_timeout(&parts.headers)
    {
        timeout = timeout.min(t);
    }
    let deadline = start + timeout;
    let hash = rt
        .cluster
        .hash_on
        .as_ref()
        .and_then(|h| h.hash(&parts.headers, parts.uri.query(), ctx.client_addr.ip()));
    // Lane tags matter only to a Service with endpoints in lanes.
    let lane: Option<Box<str>> = rt
        .cluster
        .has_lanes()
        .then(|| crate::lane::of(&parts.headers).map(Box::from))
        .flatten();
    let retries = up.retry.attempts > 0;
    if retries {
        rt.budget.request(start);
    }
    let (mut body, exceeded) = prepare_body(body, parts, body_limit, retries).await?;
    // A streamed body is consumed by its first try, so only buffered ones retry.
    let replayable = !matches!(body, UpstreamBody::Stream(_));
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // A Service with `discovery: {originalDestination: true}` has one endpoint per
    // request: where the connection was going before iptables redirected it here.
    let original = match (rt.service.original_destination, ctx.original_dst) {
        (false, _) => None,
        (true, Some(to)) => Some((
            to,
            http::uri::Authority::try_from(to.to_string())
                .map_err(|e| GatewayError::new(ErrorCode::Internal, e.to_string()))?,
        )),
        (true, None) => {
            let host = parts.headers.get(header::HOST);
            let host = host.and_then(|h| h.to_str().ok()).unwrap_or("");
            return Err(GatewayError::new(
                ErrorCode::NoRoute,
                format!(
                    "no Service is named {host:?}, and the connection was made to this proxy \
                     (not redirected to it), so there is no original destination to pass it on to"
                ),
            ));
        }
    };
    if matches!(rt.transport, Transport::H2(_)) {
        // HTTP/2 carries the authority in :authority; a differing Host is malformed.
        parts.headers.remove(header::HOST);
        forwarded.insert_into(&mut parts.headers);
    }
    // A WebSocket handshake goes as one over HTTP/1.1; an HTTP/2 upstream gets a plain
    // request (and answers it as one).
    let upgrade = parts.extensions.get::<crate::h1::UpgradeRequest>();
    let mut avoid = None;
    let mut tries = 0u32;
    let mut now = start;
    loop {
        tries += 1;
        let picked = match original {
            Some(_) => None,
            None => rt.cluster.pick(target.subset, hash, avoid, lane.as_deref()),
        };
        let (endpoint, authority) = match (&picked, &original) {
            (Some(p), _) => (p.endpoint.addr, &p.endpoint.authority),
            (None, Some((to, authority))) => (*to, authority),
            (None, None) => {
                return Err(GatewayError::new(
                    ErrorCode::NoHealthyUpstream,
                    format!("service {name:?} has no endpoints"),
                ));
            }
        };
        let this_body = match replay(&body) {
            Some(copy) => copy,
            None => std::mem::replace(&mut body, UpstreamBody::Empty),
        };
        // Clock reads are counted on the request path: one before and one after
        // each try.
        let try_deadline = up
            .retry
            .per_try_timeout
            .map_or(deadline, |p| (now + p).min(deadline));
        let try_deadline = tokio::time::Instant::from_std(try_deadline);
        rt.stats.active.inc();
        // Set while the try waits for a connection under maxConnections: the
        // endpoint was not called, so a timeout then says nothing about it.
        let queued = AtomicBool::new(false);
        let result = match &rt.transport {
            Transport::H1(pool) => {
                let head = crate::h1::Head {
                    authority,
                    method: &parts.method,
                    path: &path_and_query,
                    headers: &parts.headers,
                    forwarded,
                    upgrade: upgrade.map(|u| &u.0),
                };
                let send = pool.send(endpoint, head, this_body, &queued);
                let r = tokio::time::timeout_at(try_deadline, send).await;
                if let Ok(Err(crate::h1::H1Error::Overflow)) = r {
                    rt.stats.active.dec();
                    rt.stats.breaker_refused.inc();
                    return refused(rt, name, meshgate_upstream::Refusal::Pending);
                }
                settle(r, ResponseBody::h1, crate::h1::H1Error::is_connect)
            }
            Transport::H2(client) => {
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(http::uri::Scheme::HTTP);
                uri.authority = Some(authority.clone());
                uri.path_and_query = Some(path_and_query.clone());
                let uri = http::Uri::from_parts(uri)
                    .map_err(|e| GatewayError::new(ErrorCode::Internal, e.to_string()))?;
                let mut req = Request::new(this_body);
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = uri;
                *req.version_mut() = http::Version::HTTP_2;
                // The last possible try takes the headers instead of copying them.
                let last = !replayable || tries > up.retry.attempts;
                *req.headers_mut() = if last {
                    std::mem::take(&mut parts.headers)
                } else {
                    parts.headers.clone()
                };
                let r = tokio::time::timeout_at(try_deadline, client.request(req)).await;
                settle(
                    r,
                    ResponseBody::upstream,
                    hyper_util::client::legacy::Error::is_connect,
                )
            }
        };
        rt.stats.active.dec();
        let end = Instant::now();
        rt.stats
            .duration
            .observe(end.saturating_duration_since(now).as_secs_f64());
        let queued = queued.load(Ordering::Relaxed);
        if let Some(picked) = &picked
            && rt.cluster.outlier().is_some()
            && !queued
        {
            let seen = match &result {
                Ok(Ok(r)) if r.status().is_server_error() => Observed::Status(r.status().as_u16()),
                Ok(Ok(_)) => Observed::Success,
                _ => Observed::LocalError,
            };
            if let Some(until) = rt.cluster.observe(&picked.endpoint, seen, end) {
                crate::health::ejected(&rt.cluster, &picked.endpoint, until, &rt.stats.health);
            }
        }
        drop(picked);
        let time_left = end < deadline;
        // Checked once per try: the budget counts the retry it grants.
        let may_retry = |outcome| {
            replayable
                && time_left
                && up.retry.allows(&parts.method, tries, outcome)
                && budget_allows(rt, end)
        };
        let outcome = match result {
            Ok(Ok(resp)) => {
                let out = TryOutcome::Status(resp.status().as_u16());
                if !may_retry(out) {
                    return Ok(Answer {
                        response: resp,
                        endpoint: Some(endpoint),
                        elapsed: end.saturating_duration_since(start),
                    });
                }
                out
            }
            Ok(Err(e)) => {
                if exceeded.as_ref().is_some_and(|x| x.load(Ordering::Relaxed)) {
                    return Err(GatewayError::new(
                        ErrorCode::PayloadTooLarge,
                        "request body is too large",
                    ));
                }
                let out = if e.connect {
                    rt.stats.connect_errors.inc();
                    TryOutcome::ConnectFailure
                } else {
                    tracing::debug!(error = %e.error, %endpoint, "upstream request failed");
                    TryOutcome::Reset
                };
                if !may_retry(out) {
                    return Err(upstream_error(out, name, None));
                }
                out
            }
            Err(_) => {
                rt.stats.timeouts.inc();
                if !may_retry(TryOutcome::Timeout) {
                    if queued {
                        return Err(GatewayError::new(
                            ErrorCode::UpstreamTimeout,
                            format!(
                                "no connection to service {name:?} came free in time \
                                 (it has maxConnections open)"
                            ),
                        ));
                    }
                    let expired = (!time_left).then_some(timeout);
                    return Err(upstream_error(TryOutcome::Timeout, name, expired));
                }
                TryOutcome::Timeout
            }
        };
        tracing::trace!(?outcome, tries, "retrying");
        rt.stats.retries.inc();
        avoid = Some(endpoint);
        // Exponential backoff with full jitter, so retries do not hit a struggling
        // Service in lockstep; skipped when it would outlast the deadline.
        let pause = up.retry.backoff.pause(tries, fastrand::f64());
        if end + pause < deadline {
            tokio::time::sleep(pause).await;
        }
        now = Instant::now();
    }
}

/// Take a retry from the Service's budget, counting a refusal.
fn budget_allows(rt: &ClusterRt, now: Instant) -> bool {
    let ok = rt.budget.withdraw(now);
    if !ok {
        rt.stats.budget_exhausted.inc();
        tracing::debug!(service = %rt.service.name, "retry budget spent: not retrying");
    }
    ok
}

/// The fields the next hop must not see (RFC 9110 §7.6.1) but `TE`, which gRPC may
/// keep as `te: trailers`, and those a `Connection` field names.
static HOP_BY_HOP: [&str; 7] = [
    "connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

/// Whether `k` is a field the next hop must not see (RFC 9110 §7.6.1), apart from
/// those a `Connection` field names.
pub fn is_hop_by_hop(k: &header::HeaderName) -> bool {
    // Compared as text: a length check rejects nearly every name at once, where
    // comparing `HeaderName`s costs a match on their kinds per name.
    let k = k.as_str();
    k == "te" || HOP_BY_HOP.contains(&k)
}

/// Headers the next hop must not see (RFC 9110 §7.6.1), plus those named in
/// `Connection`. `keep_te_trailers` keeps `te: trailers`, which gRPC needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages carry none: one pass over the names is cheaper than the removals.
    if headers.keys().any(is_hop_by_hop) {
        remove_hop_by_hop(headers, keep_te_trailers);
    }
}

/// `strip_hop_by_hop` for a map known to hold at least one such field.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if keep_te_trailers && te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}
