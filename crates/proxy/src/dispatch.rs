//! One request through the phases: normalise → route → limits → filters (global,
//! then the Api's) → invoke → response filters (reverse) → completion (always).

use crate::Shared;
use crate::access_log::LogSink;
use crate::body::{Completion, Inbound, RequestBody, ResponseBody};
use crate::forwarded::{Forwarded, Outgoing};
use crate::invoke::{self, strip_hop_by_hop};
use crate::metrics::ApiStats;
use crate::respond::{self, X_REQUEST_ID};
use crate::state::{Active, GatewayRt, service_of};
use http::{HeaderValue, Request, Response, header};
use meshgate_config::MeshSide;
use meshgate_config::{Api, Invoke, Side};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx, RequestId};
use meshgate_filter::Flow;
use meshgate_route::{Outcome, normalize_path};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

/// Per-connection facts every request on it shares.
#[derive(Debug)]
pub struct ConnInfo {
    pub shared: Arc<Shared>,
    pub gateway: Arc<str>,
    pub client: SocketAddr,
    /// The client address as a header value, for X-Forwarded-For.
    pub client_ip: HeaderValue,
    pub scheme: &'static str,
    pub activity: crate::server::Activity,
    /// The client's identity, verified in a mesh mTLS handshake.
    pub peer: Option<Peer>,
    /// Where the connection was going before iptables redirected it here.
    pub original_dst: Option<SocketAddr>,
}

/// A mesh client's verified SPIFFE ID, and the `x-forwarded-client-cert` value
/// that tells the upstream of it (Envoy's header, `URI=` element), made once per
/// connection.
#[derive(Debug)]
pub struct Peer {
    pub id: Arc<str>,
    pub forwarded: HeaderValue,
}

impl Peer {
    pub fn new(id: String) -> Option<Self> {
        let forwarded = HeaderValue::from_str(&format!("URI={id}")).ok()?;
        Some(Self {
            id: id.into(),
            forwarded,
        })
    }
}

/// What the completion hook needs to log and count the request.
struct Done {
    conn: Arc<ConnInfo>,
    ctx: RequestCtx,
    start: Instant,
    status: u16,
    /// Only gathered when an access log is on.
    line: Option<LineFacts>,
    api: Option<Arc<Api>>,
    gateway_cfg: Arc<meshgate_config::Gateway>,
    upstream: Option<SocketAddr>,
    upstream_ms: Option<f64>,
    stats: Arc<ApiStats>,
    log: Option<LogSink>,
    /// This request's span and when it began, when tracing is on.
    trace: Option<(crate::trace::Context, SystemTime)>,
    /// Whether `complete` ran. A request dropped before its response was handed
    /// out (the client closed the connection or reset the HTTP/2 stream) is
    /// completed as 499 when this is dropped: it is logged and counted, and leaves
    /// the connection's count of requests in flight, or the connection would
    /// never idle.
    completed: bool,
}

/// Request facts only the access log needs.
struct LineFacts {
    wall: SystemTime,
    method: http::Method,
    path: String,
    version: http::Version,
}

impl Completion for Done {
    fn complete(&mut self, bytes_sent: u64, clean: bool) {
        self.completed = true;
        let now = Instant::now();
        let a = &self.conn.activity;
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
        a.last.store(self.conn.shared.ms_at(now), Ordering::Relaxed);
        let elapsed = now.saturating_duration_since(self.start);
        self.stats.record(self.status, elapsed.as_secs_f64());
        let status = http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::OK);
        let ctx = &self.ctx;
        if let Some(api) = &self.api {
            api.chain.on_complete(ctx, status);
            if let Some(c) = &ctx.consumer {
                meshgate_meter::meter().usage.record(
                    &c.name,
                    &api.name,
                    self.status,
                    meshgate_meter::unix_now(),
                );
            }
        }
        self.gateway_cfg.global.on_complete(ctx, status);
        if let (Some((context, began)), Some(tracer)) = (&self.trace, &self.conn.shared.tracer)
            && context.sampled
        {
            tracer.record(self.span(*context, *began));
        }
        let (Some(log), Some(facts)) = (&self.log, &self.line) else {
            return;
        };
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(facts.wall).to_string(),
            "requestId": ctx.request_id.as_str(),
            "gateway": self.gateway_cfg.name,
            "api": self.api.as_ref().map(|a| &*a.name),
            "consumer": ctx.consumer.as_ref().map(|c| &*c.name),
            "client": ctx.client_addr.ip().to_string(),
            "method": facts.method.as_str(),
            "path": facts.path,
            "protocol": format!("{:?}", facts.version),
            "service": self.api.as_deref().map(service_of).filter(|s| !s.is_empty()),
            "upstream": self.upstream.map(|u| u.to_string()),
            "status": self.status,
            "bytesSent": bytes_sent,
            "complete": clean,
            "durationMs": (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            "upstreamMs": self.upstream_ms.map(|m| (m * 1e3).round() / 1e3),
        });
        log.write(line.to_string());
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if !self.completed {
            // Dropped before its response was handed out: the client went away
            // (closed the connection, or reset the HTTP/2 stream). Logged and counted
            // as nginx does, with 499 and nothing sent.
            self.status = CLIENT_CLOSED;
            self.complete(0, false);
        }
    }
}

/// nginx's status for a request whose client went away before the response.
const CLIENT_CLOSED: u16 = 499;

impl Done {
    /// This request's span: its Api, Service, consumer, upstream and status.
    fn span(&self, context: crate::trace::Context, began: SystemTime) -> crate::trace::Finished {
        let (gw, ctx) = (&self.gateway_cfg, &self.ctx);
        let mut attributes = vec![("meshgate.gateway", gw.name.clone())];
        if let Some(api) = &self.api {
            attributes.push(("meshgate.api", api.name.to_string()));
            let service = service_of(api);
            if !service.is_empty() {
                attributes.push(("meshgate.service", service.to_string()));
            }
        }
        if let Some(c) = &ctx.consumer {
            attributes.push(("meshgate.consumer", c.name.to_string()));
        }
        if let Some(id) = &ctx.identity {
            attributes.push(("meshgate.peer", id.to_string()));
        }
        if let Some(u) = self.upstream {
            attributes.push(("server.address", u.to_string()));
        }
        attributes.push(("meshgate.request_id", ctx.request_id.as_str().to_string()));
        crate::trace::Finished {
            context,
            client_side: gw.side == MeshSide::Outbound,
            name: self
                .api
                .as_ref()
                .map_or_else(|| "unmatched".to_string(), |a| a.name.to_string()),
            start: began,
            end: began + self.start.elapsed(),
            status: self.status,
            attributes,
        }
    }
}

pub async fn handle(
    conn: Arc<ConnInfo>,
    req: Request<RequestBody>,
) -> Result<Response<ResponseBody>, Infallible> {
    let (mut resp, request_id) = answer(conn, req).await;
    if !resp.headers().contains_key(&X_REQUEST_ID) {
        resp.headers_mut().insert(X_REQUEST_ID, request_id);
    }
    Ok(resp)
}

/// The response to `req`, and its request id, which the caller sends as
/// `x-request-id` unless the response has one: the HTTP/1 server writes it
/// straight into the head, [`handle`] puts it in the header map.
pub(crate) async fn answer(
    conn: Arc<ConnInfo>,
    req: Request<RequestBody>,
) -> (Response<ResponseBody>, HeaderValue) {
    let start = Instant::now();
    let active = conn.shared.active.load_full();
    let (sent_id, grpc) = id_and_grpc(req.headers());
    let mut ctx = RequestCtx::new(RequestId::from_header(sent_id), conn.client, conn.scheme);
    ctx.original_dst = conn.original_dst;
    ctx.identity = conn.peer.as_ref().map(|p| p.id.clone());
    ctx.grpc = grpc;
    let version = req.version();
    let Some(grt) = active.gateway(&conn.gateway) else {
        // The listener's gateway went away in a reload.
        let err = GatewayError::new(
            ErrorCode::NoRoute,
            "this listener's gateway is no longer configured",
        );
        let id = ctx.request_id.header_value().clone();
        return (respond::error(&err, &ctx), id);
    };
    let log = grt.log.clone();
    let line = log.as_ref().map(|_| LineFacts {
        wall: SystemTime::now(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        version,
    });
    conn.activity.in_flight.fetch_add(1, Ordering::Relaxed);
    // Boxed from the start, context and all: the completion hook takes the box as it
    // is, and this future stays small.
    let mut done = Box::new(Done {
        conn: conn.clone(),
        ctx,
        start,
        status: 0,
        line,
        api: None,
        gateway_cfg: grt.gateway.clone(),
        upstream: None,
        upstream_ms: None,
        stats: grt.unmatched.clone(),
        log,
        trace: conn.shared.tracer.as_ref().map(|t| {
            (
                crate::trace::Context::start(req.headers(), t.sample),
                SystemTime::now(),
            )
        }),
        completed: false,
    });
    let mut resp = match serve(&conn, &active, grt, &mut done, req).await {
        Ok(r) => r,
        Err(e) => respond::error(&e, &done.ctx),
    };
    if conn.shared.draining() && version < http::Version::HTTP_2 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let coding = resp
        .extensions_mut()
        .remove::<meshgate_core::CompressWith>();
    if let Some(tap) = resp.extensions_mut().remove::<meshgate_core::ResponseTap>()
        && let Some(tap) = tap.take()
    {
        resp.body_mut().tap(tap);
    }
    if let Some(meshgate_core::CompressWith(c)) = coding {
        resp.body_mut().compress(c);
    }
    done.status = resp.status().as_u16();
    let id = done.ctx.request_id.header_value().clone();
    resp.body_mut().on_complete(done);
    (resp, id)
}

/// The client's `x-request-id`, and whether `content-type` says gRPC. A small map
/// (nearly every request's) is read in one pass over its names, which costs less
/// than hashing the two names for lookups.
fn id_and_grpc(h: &http::HeaderMap) -> (Option<&HeaderValue>, bool) {
    let is_grpc = |v: &HeaderValue| v.as_bytes().starts_with(b"application/grpc");
    if h.len() > 8 {
        return (
            h.get(&X_REQUEST_ID),
            h.get(header::CONTENT_TYPE).is_some_and(is_grpc),
        );
    }
    let (mut id, mut content_type) = (None, None);
    for (name, value) in h {
        if *name == X_REQUEST_ID {
            id = id.or(Some(value));
        } else if name == header::CONTENT_TYPE {
            content_type = content_type.or(Some(value));
        }
    }
    (id, content_type.is_some_and(is_grpc))
}

/// `host:port` → `host`; IPv6 literals keep their brackets. A byte scan from the
/// end (digits, then the colon), as this runs on every request.
pub(crate) fn strip_port(raw: &str) -> &str {
    let b = raw.as_bytes();
    if b.first() == Some(&b'[') {
        return raw.find(']').map_or(raw, |i| &raw[..=i]);
    }
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let Some(colon) = (b.len() - digits).checked_sub(1) else {
        return raw;
    };
    if b[colon] != b':' || b[..colon].contains(&b':') {
        return raw;
    }
    &raw[..colon]
}

async fn serve(
    conn: &ConnInfo,
    active: &Arc<Active>,
    grt: &GatewayRt,
    done: &mut Done,
    mut req: Request<RequestBody>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let gw = &grt.gateway;
    if let Some((t, _)) = &done.trace {
        t.propagate(req.headers_mut());
    }
    match gw.side {
        MeshSide::Edge => {}
        MeshSide::Inbound => crate::lane::remember(req.headers()),
        MeshSide::Outbound => crate::lane::restore(req.headers_mut()),
    }
    let normalized = normalize_path(req.uri().path())
        .map_err(|e| GatewayError::new(ErrorCode::InvalidRequest, e.to_string()))?;
    let path = normalized.as_deref().unwrap_or(req.uri().path());
    // The authority as the client gave it: one lookup for routing and forwarding.
    let host_header = req.headers().get(header::HOST).cloned();
    let host = strip_port(
        req.uri()
            .host()
            .or_else(|| host_header.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or(""),
    );
    let (api_idx, captures) = match gw.router.route(host, req.method(), path, req.headers()) {
        Outcome::Matched(m) => (
            *m.value,
            m.captures()
                .map(|(n, r)| (n.clone(), path[r].to_string()))
                .collect::<meshgate_core::Captures>(),
        ),
        Outcome::MethodNotAllowed(allow) => {
            let list: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
            let mut e = GatewayError::new(
                ErrorCode::MethodNotAllowed,
                format!("method {} is not allowed here", req.method()),
            );
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                e = e.with_header(header::ALLOW, v);
            }
            return Err(e);
        }
        Outcome::NotFound => {
            return Err(GatewayError::new(
                ErrorCode::NoRoute,
                format!("no route for {} {}", req.method(), path),
            ));
        }
    };
    let (mut api_idx, deferred) = match &active.snapshot.apis[api_idx].grey {
        Some(g) => match g.side(req.headers(), req.uri().query(), conn.client.ip()) {
            Side::Current => (api_idx, false),
            Side::Release => (g.to, false),
            Side::AfterIdentity => (api_idx, true),
        },
        None => (api_idx, false),
    };
    let mut api = enter(active, grt, done, api_idx);
    if api.lifecycle.gone() {
        return Err(GatewayError::new(
            ErrorCode::Gone,
            format!("Api {} is no longer offered", api.name),
        ));
    }
    done.ctx.captures = captures;
    let bodiless = matches!(req.body(), RequestBody::Empty);
    let mut limit = body_limit(&api, gw, req.headers(), bodiless)?;
    let had_host = host_header.is_some();
    let client_host = host_header.or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let (mut parts, body) = req.into_parts();
    if normalized.is_some() {
        // The path as the client sent it, for filters that check signatures over it.
        done.ctx
            .extensions
            .insert(meshgate_core::OriginalPath(parts.uri.path().to_string()));
    }
    set_path(&mut parts.uri, normalized)?;
    // Filters see the authority the same way over HTTP/1.1 and HTTP/2: as `Host`.
    if let Some(h) = &client_host
        && !had_host
    {
        parts.headers.insert(header::HOST, h.clone());
    }
    if let Flow::Respond(r) = gw.global.on_request(&mut done.ctx, &mut parts).await? {
        return Ok(finish(respond::from_bytes(*r), &done.ctx, &api, gw));
    }
    let mut from = 0;
    if deferred && let Some(g) = &api.grey {
        // The side depends on the Consumer: run the filters both revisions share
        // (they identify the caller), then choose.
        let (shared, resume) = g.identified_at;
        let flow = api
            .chain
            .on_request_range(&mut done.ctx, &mut parts, 0..shared)
            .await?;
        if let Flow::Respond(r) = flow {
            return Ok(finish(respond::from_bytes(*r), &done.ctx, &api, gw));
        }
        from = shared;
        if g.picks_consumer(done.ctx.consumer.as_deref()) {
            api_idx = g.to;
            api = enter(active, grt, done, api_idx);
            from = resume;
            limit = body_limit(&api, gw, &parts.headers, bodiless)?;
        }
    }
    let flow = api
        .chain
        .on_request_range(&mut done.ctx, &mut parts, from..api.chain.len())
        .await?;
    if let Flow::Respond(r) = flow {
        return Ok(finish(respond::from_bytes(*r), &done.ctx, &api, gw));
    }
    let body = if gw.global.wants_body() || api.chain.wants_body() {
        let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bytes = invoke::collect_limited(body, limit, &exceeded).await?;
        for chain in [&gw.global, &api.chain] {
            if let Flow::Respond(r) = chain.on_body(&mut done.ctx, &parts, &bytes)? {
                return Ok(finish(respond::from_bytes(*r), &done.ctx, &api, gw));
            }
        }
        Inbound::Buffered(bytes)
    } else {
        Inbound::Stream(body)
    };
    let up = match &api.invoke {
        Invoke::Mock(m) => {
            let mut r = Response::new(ResponseBody::full(m.body.clone()));
            *r.status_mut() = m.status;
            *r.headers_mut() = m.headers.clone();
            return Ok(finish(r, &done.ctx, &api, gw));
        }
        Invoke::Upstream(up) => up,
    };
    if let Some(t) = &up.rewrite {
        set_path(&mut parts.uri, Some(t.render(|n| done.ctx.capture(n))))?;
    }
    let forwarded = forwarding(&mut parts.headers, &done.ctx, conn, client_host);
    let mut out = Outgoing { parts, forwarded };
    let body = match done.ctx.extensions.remove::<meshgate_core::Mirrors>() {
        Some(m) => crate::mirror::start(active, m, &done.ctx, &out, body, limit).await?,
        None => body,
    };
    let own = active.api_clusters[api_idx].as_ref();
    let answer = invoke::call(active, own, up, &done.ctx, &mut out, body, limit).await?;
    // Written upstream (or handed to another transport, which left it empty).
    crate::header_maps::give(std::mem::take(&mut out.parts.headers));
    done.upstream = answer.endpoint;
    done.upstream_ms = Some(answer.elapsed.as_secs_f64() * 1e3);
    let (mut rparts, rbody) = answer.response.into_parts();
    strip_hop_by_hop(&mut rparts.headers, false);
    let resp = Response::from_parts(rparts, rbody);
    Ok(finish(resp, &done.ctx, &api, gw))
}

/// Make `api_idx` the Api this request is served by, for the filters, the metrics
/// and the access log.
fn enter(active: &Active, grt: &GatewayRt, done: &mut Done, api_idx: usize) -> Arc<Api> {
    let api = active.snapshot.apis[api_idx].clone();
    done.stats = grt.api_stats[api_idx].clone();
    done.api = Some(api.clone());
    done.ctx.api = Some(api.name.clone());
    api
}

/// The request body limit for `api` (the gateway's, or the Api's when lower); 413
/// at once when `Content-Length` says the body is larger. A request the HTTP/1
/// server found bodiless has no length to check.
fn body_limit(
    api: &Api,
    gw: &meshgate_config::Gateway,
    headers: &http::HeaderMap,
    bodiless: bool,
) -> Result<u64, GatewayError> {
    let limit = api.max_body_bytes.map_or(gw.limits.max_body_bytes, |l| {
        l.min(gw.limits.max_body_bytes)
    });
    if !bodiless && crate::body::content_length(headers).is_some_and(|n| n > limit) {
        return Err(GatewayError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {limit} bytes"),
        ));
    }
    Ok(limit)
}

/// Point the request at `path` (or keep its own), keeping the query and dropping
/// any scheme and authority (absolute-form, HTTP/2): the upstream URI is built per
/// try from the path and query alone.
fn set_path(uri: &mut http::Uri, path: Option<String>) -> Result<(), GatewayError> {
    if path.is_none() && uri.scheme().is_none() {
        return Ok(());
    }
    let p = path.unwrap_or_else(|| uri.path().to_string());
    let pq = match uri.query() {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    *uri = http::Uri::try_from(pq)
        .map_err(|e| GatewayError::new(ErrorCode::InvalidRequest, e.to_string()))?;
    Ok(())
}

/// Hop-by-hop and identity headers settled in `h`, and the forwarding fields that go
/// upstream with it.
fn forwarding(
    h: &mut http::HeaderMap,
    ctx: &RequestCtx,
    conn: &ConnInfo,
    host: Option<HeaderValue>,
) -> Forwarded {
    let mut seen = Names::of(h);
    if seen.hop_by_hop {
        invoke::remove_hop_by_hop(h, ctx.grpc);
        // `Connection` may have named any field, `Host` among them.
        seen = Names::of(h);
    }
    identity_headers(h, ctx, conn.peer.as_ref(), seen.identity);
    if let Some(v) = &host
        && !seen.host
    {
        h.insert(header::HOST, v.clone());
    }
    Forwarded::take(
        h,
        seen.forwarding,
        ctx.request_id.header_value().clone(),
        &conn.client_ip,
        conn.scheme,
        host,
    )
}

/// Which of the fields the gateway settles before a request goes upstream a request
/// has, from one pass over its names: nearly every request has none but `Host`,
/// and a pass costs less than a hashed lookup per name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Names {
    host: bool,
    hop_by_hop: bool,
    /// The identity headers (`identity_headers`).
    identity: bool,
    /// The forwarding fields (`Forwarded::is_field`).
    forwarding: bool,
}

impl Names {
    fn of(h: &http::HeaderMap) -> Self {
        let mut seen = Self::default();
        for k in h.keys() {
            if k == header::HOST {
                seen.host = true;
            } else if invoke::is_hop_by_hop(k) {
                seen.hop_by_hop = true;
            } else if IDENTITY.contains(&k.as_str()) {
                seen.identity = true;
            } else if Forwarded::is_field(k) {
                seen.forwarding = true;
            }
        }
        seen
    }
}

/// The identity headers, each name spelt once: as text and as a map key.
static IDENTITY: [&str; 3] = [CONSUMER_NAME, CONSUMER_GROUPS, FORWARDED_CLIENT_CERT];
const CONSUMER_NAME: &str = "x-consumer-name";
const CONSUMER_GROUPS: &str = "x-consumer-groups";
const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";
const X_CONSUMER_NAME: header::HeaderName = header::HeaderName::from_static(CONSUMER_NAME);
const X_CONSUMER_GROUPS: header::HeaderName = header::HeaderName::from_static(CONSUMER_GROUPS);
const X_FORWARDED_CLIENT_CERT: header::HeaderName =
    header::HeaderName::from_static(FORWARDED_CLIENT_CERT);

/// The identity headers are the gateway's alone: whatever the client sent under
/// these names is dropped, and they are set from the authenticated Consumer and,
/// on mesh mTLS, from the peer. `sent`: whether `h` has any of them (`Names`).
fn identity_headers(h: &mut http::HeaderMap, ctx: &RequestCtx, peer: Option<&Peer>, sent: bool) {
    if sent {
        for name in IDENTITY {
            h.remove(name);
        }
    }
    if let Some(p) = peer {
        h.insert(X_FORWARDED_CLIENT_CERT, p.forwarded.clone());
    }
    let Some(c) = &ctx.consumer else { return };
    if let Some(v) = &c.name_header {
        h.insert(X_CONSUMER_NAME, v.clone());
    }
    if let Some(v) = &c.groups_header {
        h.insert(X_CONSUMER_GROUPS, v.clone());
    }
}

/// Response-phase filters, in reverse order: the Api's, then the global ones.
fn finish(
    mut resp: Response<ResponseBody>,
    ctx: &RequestCtx,
    api: &Api,
    gw: &meshgate_config::Gateway,
) -> Response<ResponseBody> {
    for (name, value) in &api.lifecycle.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    if api.chain.is_empty() && gw.global.is_empty() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    api.chain.on_response(ctx, &mut parts);
    gw.global.on_response(ctx, &mut parts);
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::{Names, X_REQUEST_ID, id_and_grpc, strip_port};
    use http::header::{self, HeaderMap, HeaderValue};

    #[test]
    fn names_sees_each_kind_of_field_the_gateway_settles() {
        let map = |fields: &[&'static str]| {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(*f, HeaderValue::from_static("v"));
            }
            h
        };
        let none = Names::default();
        assert_eq!(Names::of(&map(&["accept", "user-agent"])), none);
        let host = Names {
            host: true,
            ..Names::default()
        };
        assert_eq!(Names::of(&map(&["accept", "host"])), host);
        for (field, want) in [
            ("connection", "hop_by_hop"),
            ("te", "hop_by_hop"),
            ("keep-alive", "hop_by_hop"),
            ("proxy-connection", "hop_by_hop"),
            ("x-consumer-name", "identity"),
            ("x-forwarded-client-cert", "identity"),
            ("x-request-id", "forwarding"),
            ("x-forwarded-host", "forwarding"),
        ] {
            let got = Names::of(&map(&["host", field]));
            let flags = [
                ("hop_by_hop", got.hop_by_hop),
                ("identity", got.identity),
                ("forwarding", got.forwarding),
            ];
            for (name, set) in flags {
                assert_eq!(set, name == want, "{field}: {name}");
            }
            assert!(got.host, "{field}");
        }
        // `Connection` naming `Host` takes it away: the second pass sees that.
        let mut h = map(&["host"]);
        h.insert(header::CONNECTION, HeaderValue::from_static("host"));
        crate::invoke::remove_hop_by_hop(&mut h, false);
        assert_eq!(Names::of(&h), none);
    }

    #[test]
    fn id_and_grpc_reads_small_and_large_maps_alike() {
        for filler in [0, 3, 12] {
            let mut h = HeaderMap::new();
            for i in 0..filler {
                h.insert(
                    header::HeaderName::from_bytes(format!("x-f{i}").as_bytes())
                        .unwrap_or_else(|e| panic!("{e}")),
                    HeaderValue::from_static("v"),
                );
            }
            assert_eq!(id_and_grpc(&h), (None, false), "{filler} fields");
            h.append(X_REQUEST_ID, HeaderValue::from_static("first"));
            h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc+proto"),
            );
            let (id, grpc) = id_and_grpc(&h);
            assert_eq!(id, h.get(&X_REQUEST_ID), "{filler} fields");
            assert_eq!(id.map(HeaderValue::as_bytes), Some(&b"first"[..]));
            assert!(grpc, "{filler} fields");
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            assert!(!id_and_grpc(&h).1, "{filler} fields");
        }
    }

    #[test]
    fn strip_port_keeps_the_host() {
        for (raw, host) in [
            ("example.com:8080", "example.com"),
            ("example.com", "example.com"),
            ("example.com:", "example.com"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[::1]:8443", "[::1]"),
            ("[::1]", "[::1]"),
            ("::1", "::1"),
            ("a:b:80", "a:b:80"),
            ("host:8o", "host:8o"),
            ("8080", "8080"),
            (":80", ""),
            ("", ""),
        ] {
            assert_eq!(strip_port(raw), host, "{raw:?}");
        }
    }
}
