//! The HTTP/1.1 upstream client, driven inline by the request's own task.
//!
//! hyper's pooled client hands every request to a separate connection task through a
//! channel; on a one-core proxy that hand-off and the second state machine cost more
//! than the proxying itself. Here the request task writes the head, reads and parses
//! the response head, and the response body reads straight from the socket as the
//! downstream connection polls it (pingora's design). A connection goes back to the
//! pool only after its response was read to the end with nothing left over.
//!
//! A request that asks to switch protocols (WebSocket, `UpgradeRequest`) and is
//! answered `101 Switching Protocols` takes its connection out of the pool for good:
//! the response carries it (`Tunnel`), and the downstream server relays bytes both
//! ways from then on.
//!
//! HTTP/2 upstreams still use hyper's client (see `client.rs`).

mod head;

use crate::body::UpstreamBody;
use crate::client::{Secure, UpstreamIo};
use crate::forwarded::Forwarded;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::either::Either;

/// Most header fields a response head may carry.
const MAX_HEADERS: usize = 128;
/// Header positions kept on the stack; a response with more spills to the heap.
const INLINE_SPANS: usize = 32;
/// Largest response head (status line and fields) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest chunk-size line or trailer field accepted.
const MAX_LINE: usize = 8 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Idle connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 512;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("the connection closed before a response arrived")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid response from upstream: {0}")]
    Protocol(&'static str),
    #[error("request body: {0}")]
    RequestBody(Box<dyn std::error::Error + Send + Sync>),
    #[error("maxPendingRequests requests already wait for a connection")]
    Overflow,
}

impl H1Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout)
    }
}

/// Keep-alive connections per endpoint, most recently used first out.
#[derive(Debug)]
pub struct H1Pool {
    /// Keyed by endpoint addresses (config, discovery), never by client input, so
    /// foldhash's fast variant will do: SipHash here was about 2% of the user-space
    /// instructions of a proxied request.
    endpoints: Mutex<HashMap<SocketAddr, Endpoint, foldhash::fast::RandomState>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    open: Gauge,
    limiter: Option<Limiter>,
    /// TLS on every connection, for a Service with `tls.mode: mesh` or `simple`.
    tls: Option<Secure>,
}

/// A Service's `circuitBreaker` limits on its pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open or being opened, over all endpoints.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection: for a free one at `max_connections`, or
    /// for one being opened.
    pub max_pending: Option<u32>,
}

/// What the pool's limits see now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsView {
    pub connections: u32,
    pub pending: u32,
    /// Requests refused because `max_pending` were already waiting.
    pub overflowed: u64,
}

#[derive(Debug)]
struct Limiter {
    /// One permit per connection open or being opened; a connection holds its
    /// permit until it closes.
    slots: Arc<Semaphore>,
    /// The semaphore's permits when all are free.
    all_slots: usize,
    max_pending: u32,
    pending: AtomicU32,
    overflowed: AtomicU64,
}

impl Limiter {
    /// Count a request as waiting for a connection, unless `max_pending` already are.
    fn enter(&self) -> Result<PendingGuard<'_>, H1Error> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return Err(H1Error::Overflow);
        }
        Ok(PendingGuard(&self.pending))
    }
}

struct PendingGuard<'a>(&'a AtomicU32);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One endpoint's idle connections, and the requests waiting for one.
#[derive(Debug, Default)]
struct Endpoint {
    idle: VecDeque<Idle>,
    /// Requests waiting while the pool is at `max_connections`, oldest first; a
    /// connection checked in goes to the first still waiting.
    waiters: VecDeque<oneshot::Sender<Conn>>,
}

impl Endpoint {
    fn has_waiters(&mut self) -> bool {
        self.waiters.retain(|tx| !tx.is_closed());
        !self.waiters.is_empty()
    }
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// One upstream connection and the bytes read from it but not yet used.
#[derive(Debug)]
pub struct Conn {
    io: UpstreamIo,
    buf: BytesMut,
    /// The request head is encoded here; kept to save an allocation per request.
    head: Vec<u8>,
    open: Gauge,
    /// The pool's connection slot, when it has `max_connections`.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The protocol a client asked to switch to (`Upgrade: websocket`), carried in the
/// request's extensions from the HTTP/1.1 server to the upstream call.
#[derive(Debug, Clone)]
pub struct UpgradeRequest(pub HeaderValue);

/// The upstream connection that answered `101 Switching Protocols`, carried in the
/// response's extensions to the server that relays the client's connection to it.
#[derive(Debug, Clone)]
pub struct Tunnel(Arc<Mutex<Option<Conn>>>);

impl Tunnel {
    /// The connection, once.
    pub fn take(&self) -> Option<Conn> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl Conn {
    /// The connection as a relay reads and writes it after a `101`: the bytes read
    /// after the head first. It stays counted as open while the relay runs.
    pub(crate) fn relayed(&mut self) -> crate::pipe::Prefixed<&mut UpstreamIo> {
        crate::pipe::Prefixed::new(self.buf.split().freeze(), &mut self.io)
    }

    /// Whether an idle connection can take a request: the peer has not closed it and
    /// sent nothing unasked. Reads the readiness tokio keeps for the socket (no waker
    /// is registered), and costs no system call unless the socket became readable.
    fn usable(&self) -> bool {
        // `try_io` calls the closure only when the socket is marked readable.
        let readable = |tcp: &tokio::net::TcpStream| {
            tcp.try_io(tokio::io::Interest::READABLE, || Ok(())).is_ok()
        };
        let tcp = match &self.io {
            Either::Left(tcp) => tcp,
            // A TLS peer sends nothing unasked once a response was read (a mesh peer
            // sends no session tickets; other servers send theirs right after the
            // handshake, ahead of the first response): anything readable on an idle
            // TLS connection is a close or an alert.
            Either::Right(tls) => return !readable(tls.get_ref().0),
        };
        if !readable(tcp) {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Read more bytes into `buf`; `Ok(0)` is end of stream.
    ///
    /// Reads go through `AsyncRead`, not `try_read`: tokio then treats a short read as
    /// proof the socket is drained and clears its readiness, so the next request on
    /// this connection costs no `EAGAIN` read (and `usable` no probe).
    async fn fill(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buf).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

impl H1Pool {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        open: Gauge,
        limits: ConnLimits,
    ) -> Arc<Self> {
        Self::secured(connect_timeout, idle_timeout, open, limits, None)
    }

    /// A pool whose connections are TLS (mesh mTLS or upstream TLS) when `tls` says so.
    pub fn secured(
        connect_timeout: Duration,
        idle_timeout: Duration,
        open: Gauge,
        limits: ConnLimits,
        tls: Option<Secure>,
    ) -> Arc<Self> {
        let limiter = (limits != ConnLimits::default()).then(|| {
            let all_slots = limits
                .max_connections
                .map_or(Semaphore::MAX_PERMITS, |m| m as usize);
            Limiter {
                slots: Arc::new(Semaphore::new(all_slots)),
                all_slots,
                max_pending: limits.max_pending.unwrap_or(u32::MAX),
                pending: AtomicU32::new(0),
                overflowed: AtomicU64::new(0),
            }
        });
        Arc::new(Self {
            endpoints: Mutex::new(HashMap::default()),
            connect_timeout,
            idle_timeout,
            open,
            limiter,
            tls,
        })
    }

    /// The limits' counters, when the pool has limits.
    pub fn limits(&self) -> Option<LimitsView> {
        self.limiter.as_ref().map(|l| LimitsView {
            connections: (l.all_slots - l.slots.available_permits()) as u32,
            pending: l.pending.load(Ordering::Relaxed),
            overflowed: l.overflowed.load(Ordering::Relaxed),
        })
    }

    /// Close connections idle for longer than the idle timeout or closed by the peer;
    /// runs until the pool is dropped.
    pub async fn sweep(pool: Weak<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let Some(pool) = pool.upgrade() else { return };
            let now = Instant::now();
            let mut endpoints = pool
                .endpoints
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            endpoints.retain(|_, e| {
                e.idle
                    .retain(|i| now.duration_since(i.since) < pool.idle_timeout && i.conn.usable());
                e.has_waiters() || !e.idle.is_empty()
            });
        }
    }

    /// A pooled connection to `addr`, and whether it was reused. With limits, a
    /// request with no idle connection waits (`queued` set meanwhile) for a free one
    /// or a free slot to open one.
    async fn checkout(
        &self,
        addr: SocketAddr,
        queued: &AtomicBool,
    ) -> Result<(Conn, bool), H1Error> {
        let mut slot = None;
        let mut waiting = None;
        let mut _pending = None;
        {
            let now = Instant::now();
            let mut endpoints = self
                .endpoints
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = endpoints.get_mut(&addr) {
                while let Some(i) = e.idle.pop_back() {
                    if now.duration_since(i.since) < self.idle_timeout && i.conn.usable() {
                        return Ok((i.conn, true));
                    }
                }
            }
            if let Some(l) = &self.limiter {
                _pending = Some(l.enter()?);
                slot = l.slots.clone().try_acquire_owned().ok();
                if slot.is_none() {
                    // At max_connections: rather than wait, close the oldest idle
                    // connection to another endpoint and take its slot.
                    let closed = endpoints.values_mut().find_map(|e| e.idle.pop_front());
                    if closed.is_some() {
                        drop(closed);
                        slot = l.slots.clone().try_acquire_owned().ok();
                    }
                }
                if slot.is_none() {
                    let (tx, rx) = oneshot::channel();
                    endpoints.entry(addr).or_default().waiters.push_back(tx);
                    waiting = Some((rx, l.slots.clone()));
                }
            }
        }
        if let Some((mut rx, slots)) = waiting {
            queued.store(true, Ordering::Relaxed);
            tokio::select! {
                biased;
                Ok(conn) = &mut rx => {
                    queued.store(false, Ordering::Relaxed);
                    return Ok((conn, true));
                }
                permit = slots.acquire_owned() => slot = permit.ok(),
            }
            queued.store(false, Ordering::Relaxed);
            // A connection handed over as the slot came free is used instead.
            if let Ok(conn) = rx.try_recv() {
                return Ok((conn, true));
            }
        }
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| H1Error::ConnectTimeout)?
            .map_err(H1Error::Connect)?;
        tcp.set_nodelay(true).map_err(H1Error::Connect)?;
        let io = match &self.tls {
            None => Either::Left(tcp),
            Some(tls) => tokio::time::timeout(self.connect_timeout, tls.handshake(tcp))
                .await
                .map_err(|_| H1Error::ConnectTimeout)?
                .map_err(H1Error::Connect)?,
        };
        self.open.inc();
        Ok((
            Conn {
                io,
                buf: BytesMut::with_capacity(READ_CHUNK),
                head: Vec::with_capacity(1024),
                open: self.open.clone(),
                _slot: slot,
            },
            false,
        ))
    }

    fn checkin(&self, addr: SocketAddr, mut conn: Conn) {
        let now = Instant::now();
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = &self.limiter
            && l.pending.load(Ordering::Relaxed) > 0
        {
            if let Some(e) = endpoints.get_mut(&addr) {
                while let Some(tx) = e.waiters.pop_front() {
                    match tx.send(conn) {
                        Ok(()) => return,
                        Err(back) => conn = back,
                    }
                }
            }
            // A request waiting for another endpoint needs the slot more than this
            // endpoint needs an idle connection: closing it frees the slot.
            if endpoints.values_mut().any(Endpoint::has_waiters) {
                return;
            }
        }
        let q = &mut endpoints.entry(addr).or_default().idle;
        while q
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
            || q.len() >= MAX_IDLE_PER_ENDPOINT
        {
            q.pop_front();
        }
        q.push_back(Idle { conn, since: now });
    }

    /// Send one request to `addr` and read the response head. The body streams from
    /// the returned response. A reused connection the peer closed before answering is
    /// replaced once by a fresh one when the request may be sent again.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Head<'_>,
        body: UpstreamBody,
        queued: &AtomicBool,
    ) -> Result<Response<H1Body>, H1Error> {
        let (method, headers) = (req.method, req.headers);
        let switch = req.upgrade.is_some();
        let framing = RequestFraming::of(&body, headers);
        let resend =
            matches!(body, UpstreamBody::Empty | UpstreamBody::Full(_)) && (method.is_idempotent());
        let mut body = body;
        loop {
            let (mut conn, reused) = self.checkout(addr, queued).await?;
            let this_body = match &body {
                UpstreamBody::Empty => UpstreamBody::Empty,
                UpstreamBody::Full(b) => UpstreamBody::Full(b.clone()),
                UpstreamBody::Stream(_) => std::mem::replace(&mut body, UpstreamBody::Empty),
            };
            let mut head = std::mem::take(&mut conn.head);
            head.clear();
            encode_head(&mut head, &req, framing);
            let result = exchange(&mut conn, &mut head, this_body, framing, method, switch).await;
            conn.head = head;
            match result {
                Ok(parsed) => return Ok(self.respond(addr, conn, parsed)),
                Err(H1Error::Closed) if reused && resend => {
                    tracing::debug!(%addr, "pooled connection was closed by the upstream; resending");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn respond(self: &Arc<Self>, addr: SocketAddr, mut conn: Conn, p: Parsed) -> Response<H1Body> {
        let body = match p.framing {
            ResponseFraming::Switched => {
                let mut resp = Response::new(H1Body::full(Bytes::new()));
                *resp.status_mut() = p.status;
                *resp.headers_mut() = p.headers;
                resp.extensions_mut()
                    .insert(Tunnel(Arc::new(Mutex::new(Some(conn)))));
                return resp;
            }
            // The whole body already arrived with the head: the connection is free
            // again before the downstream write.
            ResponseFraming::Length(n) if conn.buf.len() as u64 >= n => {
                let data = if p.after.len() as u64 >= n {
                    conn.buf.advance(n as usize);
                    p.after.slice(..n as usize)
                } else {
                    take_front(&mut conn.buf, n as usize)
                };
                if p.reusable && conn.buf.is_empty() {
                    self.checkin(addr, conn);
                }
                H1Body::full(data)
            }
            framing => H1Body {
                full: None,
                rest: Some(Box::new(Rest {
                    state: match framing {
                        ResponseFraming::Length(n) => State::Length(n),
                        ResponseFraming::Chunked => State::Chunked(Chunked::Size),
                        ResponseFraming::Eof | ResponseFraming::Switched => State::Eof,
                    },
                    conn: Some(conn),
                    reusable: p.reusable,
                    home: Some((self.clone(), addr)),
                    trailers: None,
                })),
            },
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = p.status;
        *resp.headers_mut() = p.headers;
        resp
    }
}

/// What goes into a request's head.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub authority: &'a Authority,
    pub method: &'a Method,
    pub path: &'a PathAndQuery,
    pub headers: &'a HeaderMap,
    /// Written after `headers`.
    pub forwarded: &'a Forwarded,
    /// The protocol the client asks to switch to: sent as `Upgrade`, with
    /// `Connection: upgrade`, and a `101` answer is then taken (`Tunnel`).
    pub upgrade: Option<&'a HeaderValue>,
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestFraming {
    /// No body, and the client's own `content-length` (if any, it is 0) kept.
    None,
    /// A body of known size: `content-length` written by us.
    Length(u64),
    /// The client's `content-length` kept and the bytes copied as they come.
    Declared,
    Chunked,
}

impl RequestFraming {
    fn of(body: &UpstreamBody, headers: &HeaderMap) -> Self {
        match body {
            UpstreamBody::Empty | UpstreamBody::Full(None) => Self::None,
            UpstreamBody::Full(Some(b)) => Self::Length(b.len() as u64),
            UpstreamBody::Stream(_) if headers.contains_key(header::CONTENT_LENGTH) => {
                Self::Declared
            }
            UpstreamBody::Stream(_) => Self::Chunked,
        }
    }
}

/// One header field line of an HTTP/1 head, as both ends (this client and
/// `h1_server`) write it.
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn encode_head(out: &mut Vec<u8>, req: &Head<'_>, framing: RequestFraming) {
    let Head {
        authority,
        method,
        path,
        headers,
        forwarded,
        upgrade,
    } = *req;
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let fields_at = out.len();
    let mut has_host = false;
    for (name, value) in headers {
        // The body is sent at once, so there is nothing to wait for.
        if name == header::EXPECT
            || (name == header::CONTENT_LENGTH
                && matches!(framing, RequestFraming::Length(_) | RequestFraming::Chunked))
        {
            continue;
        }
        has_host |= name == header::HOST;
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_host {
        // Noticed while writing (a lookup costs more); it goes first all the same
        // (RFC 9112 §3.2).
        let line = b"host: "
            .iter()
            .chain(authority.as_str().as_bytes())
            .chain(b"\r\n");
        out.splice(fields_at..fields_at, line.copied());
    }
    for (name, value) in forwarded.fields() {
        header_line(out, name.as_bytes(), value);
    }
    if let Some(protocol) = upgrade {
        header_line(out, b"connection", b"upgrade");
        header_line(out, b"upgrade", protocol.as_bytes());
    }
    match framing {
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::None | RequestFraming::Declared => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
pub(crate) struct Parsed {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    framing: ResponseFraming,
    reusable: bool,
    /// A copy of the bytes that followed a small head in the buffer (they are
    /// still there too), made with the head's: the whole body, often.
    after: Bytes,
}

#[derive(Clone, Copy, Debug)]
enum ResponseFraming {
    Length(u64),
    Chunked,
    Eof,
    /// `101 Switching Protocols` to a request that asked for it: what follows is
    /// the new protocol's.
    Switched,
}

/// Write the request and read the final response head.
async fn exchange(
    conn: &mut Conn,
    head: &mut Vec<u8>,
    mut body: UpstreamBody,
    framing: RequestFraming,
    method: &Method,
    switch: bool,
) -> Result<Parsed, H1Error> {
    let head_len = head.len();
    match &body {
        UpstreamBody::Empty | UpstreamBody::Full(None) => conn.io.write_all(head).await?,
        UpstreamBody::Full(Some(b)) => {
            head.extend_from_slice(b);
            let r = conn.io.write_all(head).await;
            head.truncate(head_len);
            r?;
        }
        UpstreamBody::Stream(_) => {
            conn.io.write_all(head).await?;
            let chunked = framing == RequestFraming::Chunked;
            let mut out = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(H1Error::RequestBody)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    out.clear();
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    conn.io.write_all(&out).await?;
                } else {
                    conn.io.write_all(&data).await?;
                }
                // Each chunk goes out as it comes (TLS may hold records back).
                conn.io.flush().await?;
            }
            if chunked {
                conn.io.write_all(b"0\r\n\r\n").await?;
            }
        }
    }
    // Free on a plain socket; sends what TLS holds.
    conn.io.flush().await?;
    crate::busy_poll::active();
    loop {
        if let Some(parsed) = parse_head(&mut conn.buf, method, switch)? {
            return Ok(parsed);
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Err(H1Error::Protocol("response head too large"));
        }
        if conn.fill().await? == 0 {
            return Err(if conn.buf.is_empty() {
                H1Error::Closed
            } else {
                H1Error::Protocol("connection closed in the response head")
            });
        }
    }
}

/// The head at the start of `buf` as httparse reads it, for what `head::quick_head`
/// leaves, its fields laid out in `inline` when they fit, else in `spilled`. `None`
/// while it is not all here.
fn httparse_head(
    buf: &[u8],
    inline: &mut [head::Span; INLINE_SPANS],
    spilled: &mut Vec<head::Span>,
) -> Result<Option<head::Quick>, H1Error> {
    // Uninitialised slots: zeroing 128 of them cost more than parsing a small head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let n = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Protocol("too many header fields"));
        }
        Err(_) => return Err(H1Error::Protocol("malformed response head")),
    };
    // Header values are slices of the head: keep them as offsets into it.
    let base = buf.as_ptr() as usize;
    let count = resp.headers.len();
    let spans = if count <= INLINE_SPANS {
        &mut inline[..count]
    } else {
        spilled.resize(count, (0, 0, 0, 0));
        &mut spilled[..]
    };
    for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
        *span = (
            h.name.as_ptr() as usize - base,
            h.name.len(),
            h.value.as_ptr() as usize - base,
            h.value.len(),
        );
    }
    Ok(Some(head::Quick {
        len: n,
        code: resp.code.unwrap_or(0),
        http10: resp.version == Some(0),
        fields: count,
    }))
}

/// Parse a response head from the front of `buf`, consuming it. Informational (1xx)
/// responses are skipped, but a `101 Switching Protocols`: that is the answer when
/// `switch` (the request asked to switch), and an error otherwise. `None` when more
/// bytes are needed.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    switch: bool,
) -> Result<Option<Parsed>, H1Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut inline = [(0usize, 0usize, 0usize, 0usize); INLINE_SPANS];
        let mut spilled = Vec::new();
        let head::Quick {
            len: n,
            code,
            http10,
            fields,
        } = match head::quick_head(buf, &mut inline) {
            Some(q) => q,
            None => match httparse_head(buf, &mut inline, &mut spilled)? {
                Some(q) => q,
                None => return Ok(None),
            },
        };
        let spans = if fields <= INLINE_SPANS {
            &inline[..fields]
        } else {
            &spilled[..]
        };
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Protocol("invalid status code"))?;
        let switched = code == 101 && switch;
        if status.is_informational() && !switched {
            if code == 101 {
                return Err(H1Error::Protocol("unexpected protocol switch"));
            }
            buf.advance(n);
            continue;
        }
        // A small head is copied out with what followed it in one allocation: the
        // body, when it came along, is then a slice of that copy too.
        let (head, after) = if buf.len() < COPY_BELOW {
            let all = copy_of(buf);
            buf.advance(n);
            (all.slice(..n), all.slice(n..))
        } else {
            (take_front(buf, n), Bytes::new())
        };
        // Room for the headers the gateway adds (x-request-id...) without a regrowth.
        let mut headers = crate::header_maps::take(spans.len() + 4);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer_coded = false;
        let mut close = http10;
        for &(no, nl, vo, vl) in spans.iter() {
            let name = header_name(&head[no..no + nl])
                .map_err(|_| H1Error::Protocol("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vo..vo + vl))
                .map_err(|_| H1Error::Protocol("invalid header value"))?;
            if name == header::CONTENT_LENGTH {
                let v = parse_length(value.as_bytes())
                    .ok_or(H1Error::Protocol("invalid content-length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(H1Error::Protocol("conflicting content-length"));
                }
                length = Some(v);
            } else if name == header::TRANSFER_ENCODING {
                transfer_coded = true;
                chunked = value
                    .as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == header::CONNECTION {
                for token in value.as_bytes().split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if http10 && token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
            headers.append(name, value);
        }
        // RFC 9112 §6.3.
        let bodyless = method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let framing = if switched {
            close = true;
            ResponseFraming::Switched
        } else if bodyless {
            ResponseFraming::Length(0)
        } else if transfer_coded {
            // Transfer-Encoding overrides Content-Length; such a message must not be
            // followed by another on the same connection.
            if length.is_some() {
                close = true;
            }
            if chunked {
                ResponseFraming::Chunked
            } else {
                ResponseFraming::Eof
            }
        } else if let Some(n) = length {
            ResponseFraming::Length(n)
        } else {
            ResponseFraming::Eof
        };
        let reusable = !close && !matches!(framing, ResponseFraming::Eof);
        return Ok(Some(Parsed {
            status,
            headers,
            framing,
            reusable,
            after,
        }));
    }
}

/// Small heads and bodies are copied out of the read buffer, and larger ones shared.
///
/// A shared slice keeps the whole buffer alive: the connection, back in the pool
/// before the downstream write, must then allocate a new 16 KiB buffer for its next
/// response. A copy this small comes from the allocator's per-thread cache, and the
/// buffer, left unshared, is reused in place.
const COPY_BELOW: usize = 1024;

/// The first `n` bytes of `buf`, removed from it.
fn take_front(buf: &mut BytesMut, n: usize) -> Bytes {
    if n < COPY_BELOW {
        let out = copy_of(&buf[..n]);
        buf.advance(n);
        out
    } else {
        buf.split_to(n).freeze()
    }
}

/// Up to `N` bytes held in place, for `copy_of`.
struct Inline<const N: usize> {
    len: usize,
    bytes: [u8; N],
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The largest copy held inline: with its reference count, one block from the
/// allocator's per-thread cache.
const INLINE_COPY: usize = 232;

/// A copy of `data` as `Bytes`. A small one is a single allocation whose slices
/// (header values) share it by a reference count; a copied `Vec` is one
/// allocation, and its first slice allocates again to become shared.
fn copy_of(data: &[u8]) -> Bytes {
    if data.is_empty() || data.len() > INLINE_COPY {
        // An empty copy allocates nothing this way.
        return Bytes::copy_from_slice(data);
    }
    let mut inline = Inline {
        len: data.len(),
        bytes: [0; INLINE_COPY],
    };
    inline.bytes[..data.len()].copy_from_slice(data);
    Bytes::from_owner(inline)
}

/// A header name as a head spells it, for both ends (this client and the server).
/// The names nearly every head carries, spelt in lower case or as their usual
/// capitalisation, are matched whole and come out as constants; any other goes
/// through `HeaderName::from_bytes`, which lowercases and checks it byte by byte.
pub(crate) fn header_name(raw: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    Ok(match raw {
        b"host" | b"Host" => header::HOST,
        b"date" | b"Date" => header::DATE,
        b"content-length" | b"Content-Length" => header::CONTENT_LENGTH,
        b"content-type" | b"Content-Type" => header::CONTENT_TYPE,
        b"connection" | b"Connection" => header::CONNECTION,
        b"user-agent" | b"User-Agent" => header::USER_AGENT,
        b"accept" | b"Accept" => header::ACCEPT,
        b"accept-encoding" | b"Accept-Encoding" => header::ACCEPT_ENCODING,
        b"server" | b"Server" => header::SERVER,
        b"transfer-encoding" | b"Transfer-Encoding" => header::TRANSFER_ENCODING,
        b"cache-control" | b"Cache-Control" => header::CACHE_CONTROL,
        b"authorization" | b"Authorization" => header::AUTHORIZATION,
        b"content-encoding" | b"Content-Encoding" => header::CONTENT_ENCODING,
        // Sent on every hop inside a mesh; `from_bytes` would copy each to the heap.
        b"x-request-id" | b"X-Request-Id" | b"X-Request-ID" => crate::respond::X_REQUEST_ID,
        _ => return HeaderName::from_bytes(raw),
    })
}

/// A `Content-Length` value: 1 to 19 digits that fit a `u64`. The one reading of
/// it for both ends (this client and the request guard).
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[derive(Debug)]
pub(crate) enum State {
    Length(u64),
    Chunked(Chunked),
    Eof,
    Done,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// The response body, read from the upstream connection as it is polled. The
/// connection returns to its pool when the body ended cleanly; dropped early, it is
/// closed.
#[derive(Debug)]
pub struct H1Body {
    /// A body that arrived whole with its head (most small responses).
    full: Option<Bytes>,
    /// A body still to be read from the connection. Boxed: a response is moved
    /// through every layer above, and the whole body's response stays small.
    rest: Option<Box<Rest>>,
}

/// The part of a response body still on its connection.
#[derive(Debug)]
struct Rest {
    state: State,
    conn: Option<Conn>,
    reusable: bool,
    home: Option<(Arc<H1Pool>, SocketAddr)>,
    trailers: Option<HeaderMap>,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream closed the connection before the body ended")]
    Truncated,
    #[error("invalid chunked body from upstream: {0}")]
    Chunked(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl H1Body {
    fn full(data: Bytes) -> Self {
        Self {
            full: (!data.is_empty()).then_some(data),
            rest: None,
        }
    }
}

impl Rest {
    /// The body ended: the connection goes back to its pool if it can.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
            && let Some((pool, addr)) = self.home.take()
        {
            pool.checkin(addr, conn);
        }
    }

    /// The next frame from bytes already read, or `None` when more are needed.
    fn decode(&mut self) -> Result<Option<Frame<Bytes>>, BodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let frame = decode(&mut self.state, &mut self.trailers, &mut conn.buf)?;
        if matches!(self.state, State::Done) {
            self.finish();
        }
        Ok(frame)
    }
}

/// The next frame of a body framed as `state` says, from the front of `buf`, or
/// `None` when more bytes are needed. At the body's end `state` becomes `Done`, and
/// the trailers gathered in `trailers` are the last frame; what follows the body
/// stays in `buf`.
pub(crate) fn decode(
    state: &mut State,
    trailers: &mut Option<HeaderMap>,
    buf: &mut BytesMut,
) -> Result<Option<Frame<Bytes>>, BodyError> {
    loop {
        match state {
            State::Done => return Ok(None),
            State::Eof => {
                if buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Frame::data(take_front(buf, buf.len()))));
            }
            State::Length(rem) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = (*rem).min(buf.len() as u64) as usize;
                *rem -= take as u64;
                if *rem == 0 {
                    *state = State::Done;
                }
                return Ok(Some(Frame::data(take_front(buf, take))));
            }
            State::Chunked(c) => match *c {
                Chunked::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    let size = parse_chunk_size(&line)?;
                    *c = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(rem) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = rem.min(buf.len() as u64) as usize;
                    let data = take_front(buf, take);
                    *c = if rem == take as u64 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(rem - take as u64)
                    };
                    return Ok(Some(Frame::data(data)));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::Chunked("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *c = Chunked::Size;
                }
                Chunked::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        *state = State::Done;
                        return Ok(trailers.take().map(Frame::trailers));
                    }
                    let (name, value) = parse_trailer(&line)?;
                    let t = trailers.get_or_insert_with(HeaderMap::new);
                    if t.len() >= MAX_HEADERS {
                        return Err(BodyError::Chunked("too many trailer fields"));
                    }
                    t.append(name, value);
                }
            },
        }
    }
}

/// One CRLF-terminated line from the front of `buf`, without the CRLF. A line
/// longer than [`MAX_LINE`] is refused as soon as that is certain, and the same way
/// whether it arrived whole or in parts.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
    // `i` bytes before the LF: the line and its CR.
    match memchr::memchr(b'\n', buf) {
        Some(i) if i > MAX_LINE + 1 => Err(BodyError::Chunked("line too long")),
        Some(i) => {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err(BodyError::Chunked("line not ended by CRLF"));
            }
            let line = buf.split_to(i + 1).freeze();
            Ok(Some(line.slice(..i - 1)))
        }
        None if buf.len() > MAX_LINE + 1 => Err(BodyError::Chunked("line too long")),
        None => Ok(None),
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    let rest = &line[digits..];
    // Extensions (`;name=value`) are allowed and ignored, after optional whitespace.
    if !rest.is_empty() && !rest.trim_ascii_start().starts_with(b";") {
        return Err(BodyError::Chunked("invalid chunk size"));
    }
    let mut n = 0u64;
    for &d in &line[..digits] {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n = (n << 4) | u64::from(v);
    }
    Ok(n)
}

fn parse_trailer(line: &Bytes) -> Result<(HeaderName, HeaderValue), BodyError> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(BodyError::Chunked("invalid trailer field"))?;
    let name = HeaderName::from_bytes(&line[..colon])
        .map_err(|_| BodyError::Chunked("invalid trailer field name"))?;
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
        .map_err(|_| BodyError::Chunked("invalid trailer field value"))?;
    Ok((name, value))
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(data) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(this) = this.rest.as_deref_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match this.decode() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if matches!(this.state, State::Done) {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match std::task::ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    if matches!(this.state, State::Eof) {
                        this.state = State::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    this.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Truncated)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none()
            && self
                .rest
                .as_ref()
                .is_none_or(|r| matches!(r.state, State::Done) && r.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.full, self.rest.as_ref().map(|r| &r.state)) {
            (Some(b), _) => SizeHint::with_exact(b.len() as u64),
            (None, None | Some(State::Done)) => SizeHint::with_exact(0),
            (None, Some(State::Length(n))) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
