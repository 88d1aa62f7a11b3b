//! meshgate's own HTTP/1.1 server, in front of the dispatcher.
//!
//! HTTP/1 was served by hyper behind the framing guard. That parsed every head
//! twice (the guard, then hyper), and hyper took a fresh 8 KiB read buffer for each
//! request: while a request is in flight it reads ahead to notice a client that
//! leaves, and its buffer is still shared with the head it handed out. This server
//! keeps the guard's scanner as the one judge of framing (the same refusals, byte
//! for byte) and builds the request from the layout the scanner found, with values
//! that share the read buffer: one pass over the head. It writes each response head
//! and its first body bytes in one write.
//! HTTP/2 stays with hyper: a connection that opens with the HTTP/2 preface is
//! handed over with the bytes already read.
//!
//! Requests on a connection are served one at a time; pipelined requests wait in
//! the read buffer. While a request without a body is in flight the connection
//! still watches for the client leaving, and drops the request (and its upstream
//! call) when it does, as hyper did. A request body is read by whoever polls it
//! (the upstream call, or a filter collecting it): the connection's reading half
//! is lent to the body for the exchange and taken back before the response is
//! written.
//!
//! A WebSocket handshake (`GET` with `Connection: upgrade` and `Upgrade:
//! websocket`, no body) is passed upstream as one. When the upstream switches
//! protocols, the `101` is written and the connection becomes a relay of bytes to
//! that upstream connection until either side closes or both are idle for the
//! Gateway's `tcpIdleTimeout`. Any other answer is an ordinary response, and the
//! connection stays HTTP/1.1 under the guard. Other upgrades (h2c) are not served.

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::dispatch::{self, ConnInfo};
use crate::guard::{self, BodyStep, GuardLimits, Layout, RejectSink, Rejection, Scanner, Step};
use crate::h1::{Tunnel, UpgradeRequest, header_line};
use crate::pipe::Prefixed;
use crate::respond::{REQUEST_ID, X_REQUEST_ID};
use crate::server::StopFlag;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use meshgate_core::{ErrorCode, RequestId};
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

/// How much the read buffer grows by when it runs out of room.
const READ_BUF: usize = 8192;
/// Below this much free room the buffer grows before a read.
const MIN_READ: usize = 1024;
/// Response bytes gathered before they are written, when the body has more ready.
const WRITE_BATCH: usize = 64 * 1024;

/// An accepted connection, plain or TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    // Every response, over HTTP/1.1 or HTTP/2, is written here; on a kept-alive
    // connection the next request may follow at once, so a busy-polling worker
    // polls for it (`busy_poll`).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        crate::busy_poll::sent(match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The reading side of a connection: the stream, what was read and not yet used,
/// and the scanner that knows where each message ends.
struct Wire {
    io: Stream,
    rbuf: BytesMut,
    scan: Scanner,
}

impl Wire {
    /// Read into the buffer's free room, growing it first when little is left.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < MIN_READ {
            self.rbuf.reserve(READ_BUF);
        }
        poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }
}

/// How a connection's HTTP/1 service ended.
pub(crate) enum Outcome {
    Closed,
    /// The client opened with the HTTP/2 preface: serve it as HTTP/2 from here,
    /// reading `read` first.
    Http2 {
        read: Bytes,
        io: Stream,
    },
}

/// What every exchange on a connection shares.
pub(crate) struct ConnCtx {
    pub info: Arc<ConnInfo>,
    pub limits: GuardLimits,
    pub sink: Arc<dyn RejectSink>,
    pub stop: Arc<StopFlag>,
    /// How long a connection that switched protocols may pass no byte either way.
    pub tunnel_idle: std::time::Duration,
}

/// Serve HTTP/1.1 requests on `io` until the client leaves, the connection is
/// asked to stop, or a request cannot be served on it.
pub(crate) async fn serve(io: Stream, ctx: ConnCtx) -> Outcome {
    let mut wire = Some(Wire {
        io,
        rbuf: BytesMut::with_capacity(READ_BUF),
        scan: Scanner::new(ctx.limits),
    });
    let mut out = Vec::with_capacity(1024);
    loop {
        match exchange(&mut wire, &ctx, &mut out).await {
            Next::KeepAlive => {}
            Next::Http2 => {
                let Some(w) = wire else {
                    return Outcome::Closed;
                };
                return Outcome::Http2 {
                    read: w.rbuf.freeze(),
                    io: w.io,
                };
            }
            Next::Closed => return Outcome::Closed,
        }
    }
}

enum Next {
    KeepAlive,
    Http2,
    Closed,
}

/// Why no request head came.
enum NoHead {
    /// The client left, or the connection was asked to stop between requests.
    Closed,
    Http2,
    Refused(Rejection),
    /// A head started and did not end within the header read timeout.
    TimedOut,
}

/// Room for header fields a request may gain in the map on its way upstream (the
/// identity headers, `traceparent`): its map is made this much larger at once
/// rather than grown. The forwarding fields are not among them (`forwarded`).
/// Small enough that a usual request's map (up to 4 fields of its own) stays within
/// malloc's per-thread cache (1,032 bytes): a larger block costs a trip through
/// the main allocator and, when freed next to the heap's top, a consolidation.
const ADDED_HEADERS: usize = 2;

/// One request and its response. `slot` holds the connection's reading side
/// between requests; it is empty only while a request body has it.
async fn exchange(slot: &mut Option<Wire>, ctx: &ConnCtx, out: &mut Vec<u8>) -> Next {
    let Some(wire) = slot.as_mut() else {
        return Next::Closed;
    };
    let head_len = match read_head(wire, ctx).await {
        Ok(n) => n,
        Err(NoHead::Http2) => return Next::Http2,
        Err(NoHead::Closed) => return Next::Closed,
        Err(NoHead::TimedOut) => {
            let timeout = Rejection {
                code: ErrorCode::InvalidRequest,
                message: "header read timeout",
            };
            ctx.sink.rejected(&timeout, &RequestId::generate());
            return Next::Closed;
        }
        Err(NoHead::Refused(r)) => return refuse(wire, ctx, &r).await,
    };
    let has_body = wire.scan.in_body();
    let head = wire.rbuf.split_to(head_len).freeze();
    let (req, meta) = match parse(&head, wire.scan.layout(), has_body) {
        Ok(p) => p,
        Err(r) => return refuse(wire, ctx, &r).await,
    };
    drop(head);
    if has_body && let Some(r) = fault_in_buffered_body(wire) {
        // The whole bad message is here: refuse it before any of it goes upstream.
        return refuse(wire, ctx, &r).await;
    }
    let (resp, body_done) = if has_body {
        let cell = Arc::new(Mutex::new(Cell {
            wire: slot.take(),
            ended: false,
            continue_at: meta.expect_continue.then_some(0),
        }));
        let req = req.map(|()| RequestBody::H1(Body { cell: cell.clone() }));
        let resp = dispatch::answer(ctx.info.clone(), req).await;
        let Ok(mut c) = cell.lock() else {
            return Next::Closed;
        };
        *slot = c.wire.take();
        (resp, c.ended)
    } else {
        let req = req.map(|()| RequestBody::Empty);
        let handle = std::pin::pin!(dispatch::answer(ctx.info.clone(), req));
        match until_answered_or_gone(wire, handle).await {
            Some(resp) => (resp, true),
            None => return Next::Closed,
        }
    };
    let Some(wire) = slot.as_mut() else {
        return Next::Closed;
    };
    let (resp, request_id) = resp;
    // A body the request did not read keeps the connection only if the rest of it
    // is already here to skip.
    let framed = body_done || skip_buffered_body(wire);
    let keep = meta.keep_alive && framed && !ctx.stop.is_raised();
    let tunnel = switched(&resp, &meta);
    // Nothing HTTP may follow a protocol switch; one with no connection to relay to
    // ends the connection.
    let keep = keep && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
    match respond(&mut wire.io, out, resp, &request_id, &meta, keep).await {
        Ok(_) if let Some(mut conn) = tunnel => {
            let Some(w) = slot.take() else {
                return Next::Closed;
            };
            // Bytes the client sent after its handshake go first.
            let mut client = Prefixed::new(w.rbuf.freeze(), w.io);
            let mut upstream = conn.relayed();
            crate::pipe::pipe(&mut client, &mut upstream, ctx.tunnel_idle).await;
            Next::Closed
        }
        Ok(true) => Next::KeepAlive,
        Ok(false) => {
            let _ = wire.io.shutdown().await;
            Next::Closed
        }
        Err(e) => {
            tracing::debug!(client = %ctx.info.client, error = %e, "response not sent");
            Next::Closed
        }
    }
}

/// The upstream connection of a `101 Switching Protocols` answer to a request that
/// asked to switch. Taken before the response is written, which drops it.
fn switched(resp: &Response<ResponseBody>, meta: &Meta) -> Option<crate::h1::Conn> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS || meta.upgrade.is_none() {
        return None;
    }
    resp.extensions().get::<Tunnel>()?.take()
}

/// Run `handle` to its response, unless the client closes the connection first
/// (then `None`, and the request is dropped with its upstream call). Bytes of a
/// pipelined request that arrive meanwhile stay in the buffer.
async fn until_answered_or_gone<F: Future>(
    wire: &mut Wire,
    mut handle: Pin<&mut F>,
) -> Option<F::Output> {
    let mut watch = true;
    poll_fn(|cx| {
        if let Poll::Ready(r) = handle.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        // Only into room the buffer already has: the head just handed out may still
        // share it, and growing it would copy.
        if watch && wire.rbuf.capacity() > wire.rbuf.len() {
            match poll_read_buf(Pin::new(&mut wire.io), cx, &mut wire.rbuf) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => watch = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// Read until the buffer holds a whole request head the scanner accepts; its
/// length. Waits for the first byte only while the connection is not asked to
/// stop, and for the rest of the head only for the header read timeout.
async fn read_head(wire: &mut Wire, ctx: &ConnCtx) -> Result<usize, NoHead> {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        loop {
            // Empty lines before a request line are skipped (RFC 9112 §2.2).
            let blank = wire.rbuf.starts_with(b"\r\n");
            match wire.scan.step(&wire.rbuf) {
                Step::Pass(_) if wire.scan.is_passthrough() => return Err(NoHead::Http2),
                Step::Pass(n) if blank => wire.rbuf.advance(n),
                Step::Pass(n) => return Ok(n),
                Step::NeedMore => break,
                Step::Reject(r) => return Err(NoHead::Refused(r)),
            }
        }
        let started = !wire.rbuf.is_empty();
        if started && timer.is_none() {
            timer = Some(Box::pin(tokio::time::sleep(ctx.limits.header_read_timeout)));
        }
        let read = poll_fn(|cx| {
            if !started && ctx.stop.poll_raised(cx) {
                return Poll::Ready(Err(NoHead::Closed));
            }
            if let Some(t) = &mut timer
                && t.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Err(NoHead::TimedOut));
            }
            wire.poll_fill(cx).map_err(|_| NoHead::Closed)
        })
        .await?;
        if read == 0 {
            return Err(NoHead::Closed);
        }
    }
}

/// Answer a refused request with its 4xx and close, as the guard decided.
async fn refuse(wire: &mut Wire, ctx: &ConnCtx, r: &Rejection) -> Next {
    let id = RequestId::generate();
    ctx.sink.rejected(r, &id);
    let resp = guard::error_response(r, &id);
    if wire.io.write_all(&resp).await.is_ok() {
        let _ = wire.io.shutdown().await;
    }
    Next::Closed
}

/// A fault the scanner finds in the part of the current body already read.
fn fault_in_buffered_body(wire: &Wire) -> Option<Rejection> {
    let mut scan = wire.scan.body_reader();
    let mut at = 0;
    while scan.in_body() {
        match scan.body_step(&wire.rbuf[at..]) {
            BodyStep::Data(n) | BodyStep::Framing(n) if n > 0 => at += n,
            BodyStep::Reject(r) => return Some(r),
            _ => return None,
        }
    }
    None
}

/// Skip the rest of an unread body if it is all in the buffer; whether it was.
fn skip_buffered_body(wire: &mut Wire) -> bool {
    while wire.scan.in_body() {
        match wire.scan.body_step(&wire.rbuf) {
            BodyStep::Data(n) | BodyStep::Framing(n) if n > 0 => wire.rbuf.advance(n),
            _ => return false,
        }
    }
    true
}

/// What the response depends on from the request.
struct Meta {
    version: Version,
    keep_alive: bool,
    head: bool,
    expect_continue: bool,
    /// The client takes trailers (`TE: trailers`).
    trailers: bool,
    /// The protocol a WebSocket handshake asks to switch to.
    upgrade: Option<HeaderValue>,
}

/// The request in `head`, which the scanner checked and laid out, sharing its bytes.
fn parse(head: &Bytes, layout: &Layout, has_body: bool) -> Result<(Request<()>, Meta), Rejection> {
    let bad = |message| Rejection {
        code: ErrorCode::InvalidRequest,
        message,
    };
    let method = Method::from_bytes(&head[layout.method.clone()])
        .map_err(|_| bad("malformed request line"))?;
    let uri = Uri::from_maybe_shared(head.slice(layout.target.clone()))
        .map_err(|_| bad("invalid request target"))?;
    let version = if layout.http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = crate::header_maps::take(layout.fields.len() + ADDED_HEADERS);
    let mut meta = Meta {
        version,
        keep_alive: version == Version::HTTP_11,
        head: method == Method::HEAD,
        expect_continue: false,
        trailers: false,
        upgrade: None,
    };
    let (mut asked, mut connection_upgrade) = (None, false);
    for (name, value) in &layout.fields {
        let name =
            crate::h1::header_name(&head[name.clone()]).map_err(|_| bad("invalid header name"))?;
        let raw = &head[value.clone()];
        // Kept apart from the fields: only a WebSocket handshake passes it on.
        if name == header::UPGRADE {
            asked = Some(value.clone());
            continue;
        }
        if name.as_str() == "http2-settings" {
            continue;
        }
        if name == header::CONNECTION {
            for token in raw.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    meta.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    meta.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if name == header::EXPECT {
            meta.expect_continue = raw.eq_ignore_ascii_case(b"100-continue");
        } else if name == header::TE {
            meta.trailers = has_token(raw, b"trailers");
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
            .map_err(|_| bad("invalid header value"))?;
        headers.append(name, value);
    }
    let mut req = Request::new(());
    // RFC 6455 §4.1: a WebSocket handshake is an HTTP/1.1 GET without a body.
    if let Some(asked) = asked
        && connection_upgrade
        && !has_body
        && method == Method::GET
        && version == Version::HTTP_11
        && head[asked.clone()].eq_ignore_ascii_case(b"websocket")
    {
        let asked = HeaderValue::from_maybe_shared(head.slice(asked))
            .map_err(|_| bad("invalid header value"))?;
        req.extensions_mut().insert(UpgradeRequest(asked.clone()));
        meta.upgrade = Some(asked);
    }
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok((req, meta))
}

/// The request body as the connection lends it: read by whoever polls it.
pub struct Body {
    cell: Arc<Mutex<Cell>>,
}

struct Cell {
    /// The connection's reading side; taken back before the response is written.
    wire: Option<Wire>,
    /// The body's last byte was read.
    ended: bool,
    /// Where the `100 Continue` still to send stands, for a client that waits for it.
    continue_at: Option<usize>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h1_server::Body").finish_non_exhaustive()
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[derive(Debug)]
struct BodyError(&'static str);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

fn body_error(message: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Poll::Ready(Some(Err(Box::new(BodyError(message)))))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Ok(mut cell) = self.cell.lock() else {
            return body_error("request body lock poisoned");
        };
        let Cell {
            wire,
            ended,
            continue_at,
        } = &mut *cell;
        if *ended {
            return Poll::Ready(None);
        }
        let Some(w) = wire else {
            return body_error("the response was sent before the request body was read");
        };
        while let Some(at) = *continue_at {
            if at == CONTINUE.len() {
                ready!(Pin::new(&mut w.io).poll_flush(cx))?;
                *continue_at = None;
                break;
            }
            let n = ready!(Pin::new(&mut w.io).poll_write(cx, &CONTINUE[at..]))?;
            if n == 0 {
                return body_error("connection closed");
            }
            *continue_at = Some(at + n);
        }
        loop {
            match w.scan.body_step(&w.rbuf) {
                BodyStep::Data(n) => {
                    *ended = !w.scan.in_body();
                    return Poll::Ready(Some(Ok(Frame::data(w.rbuf.split_to(n).freeze()))));
                }
                BodyStep::Framing(n) => {
                    w.rbuf.advance(n);
                    if !w.scan.in_body() {
                        *ended = true;
                        return Poll::Ready(None);
                    }
                }
                BodyStep::Reject(r) => return body_error(r.message),
                BodyStep::NeedMore => match ready!(w.poll_fill(cx)) {
                    Ok(0) => return body_error("the client closed before the body ended"),
                    Ok(_) => {}
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.cell.lock().map_or(true, |c| c.ended)
    }

    fn size_hint(&self) -> SizeHint {
        let remaining = self.cell.lock().ok().and_then(|c| {
            if c.ended {
                return Some(0);
            }
            c.wire.as_ref()?.scan.length_remaining()
        });
        remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body bytes are sent (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Write `resp`, with `x-request-id: request_id` unless it has one; whether the
/// connection may serve another request after it.
async fn respond(
    io: &mut Stream,
    out: &mut Vec<u8>,
    resp: Response<ResponseBody>,
    request_id: &HeaderValue,
    meta: &Meta,
    keep: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // The fields that decide the framing are read in the pass that writes the rest:
    // two lookups would cost more than the whole pass over a common response.
    let length_counts = !bodiless || status == StatusCode::NOT_MODIFIED;
    let (mut declared, mut first_length, mut close) = (None, true, false);
    let (mut has_id, mut has_date) = (false, false);
    out.clear();
    status_line(out, status);
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            close |= has_token(value.as_bytes(), b"close");
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            // The first value decides, as a lookup would; an unusable one is dropped
            // with the rest, and the body's own length framed instead.
            if first_length && length_counts {
                declared = crate::body::length_value(value);
            }
            first_length = false;
            if declared.is_none() {
                continue;
            }
        }
        has_id |= name == X_REQUEST_ID;
        has_date |= name == header::DATE;
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let mut keep = keep && !close;
    let mut framing = if bodiless {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if meta.version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    if framing == Framing::Close && !meta.head {
        keep = false;
    }
    crate::header_maps::give(parts.headers);
    if !has_id {
        header_line(out, REQUEST_ID.as_bytes(), request_id.as_bytes());
    }
    match framing {
        Framing::Length(n) if declared.is_none() => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked if !meta.head => header_line(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !has_date {
        date::append(out);
    }
    if let (Some(protocol), StatusCode::SWITCHING_PROTOCOLS) = (&meta.upgrade, status) {
        header_line(out, b"connection", b"upgrade");
        header_line(out, b"upgrade", protocol.as_bytes());
    } else if !keep {
        header_line(out, b"connection", b"close");
    } else if meta.version == Version::HTTP_10 {
        header_line(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    if meta.head {
        framing = Framing::None;
    }
    if framing == Framing::None || framing == Framing::Length(0) {
        // Not polled: dropping the body ends it (its completion still runs).
        write_out(io, out).await?;
        return Ok(keep);
    }
    let mut sent = 0u64;
    let mut trailers = None;
    loop {
        let frame = match poll_now(&mut body) {
            Some(f) => f,
            None => {
                write_out(io, out).await?;
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| io::Error::other(e.to_string()))?;
        let frame = match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                match framing {
                    Framing::Length(n) if sent > n => {
                        return Err(io::Error::other("response body longer than its length"));
                    }
                    Framing::Chunked => {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => out.extend_from_slice(&data),
                }
                if out.len() >= WRITE_BATCH {
                    write_out(io, out).await?;
                }
                continue;
            }
            Err(f) => f,
        };
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    match framing {
        Framing::Length(n) if sent < n => {
            write_out(io, out).await?;
            return Err(io::Error::other("response body shorter than its length"));
        }
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let Some(t) = trailers.filter(|_| meta.trailers) {
                for (name, value) in &t {
                    header_line(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    write_out(io, out).await?;
    Ok(keep)
}

/// The body's next frame if it is ready now.
fn poll_now(body: &mut ResponseBody) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(f) => Some(f),
        Poll::Pending => None,
    }
}

async fn write_out(io: &mut Stream, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    io.write_all(out).await?;
    out.clear();
    io.flush().await?;
    Ok(())
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The `date` header, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
    }

    pub(super) fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, line)| {
            if *at != second || line.is_empty() {
                *at = second;
                line.clear();
                line.extend_from_slice(b"date: ");
                line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
                line.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(line);
        });
    }
}

#[cfg(test)]
mod tests;
