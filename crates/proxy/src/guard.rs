//! A strict HTTP/1 framing guard in front of hyper.
//!
//! hyper resolves some ambiguous framings on its own (it drops `Content-Length` when
//! `Transfer-Encoding` is also present, and merges identical duplicate lengths). A
//! gateway must instead refuse them: two hops that disagree on where a message ends
//! is request smuggling. The guard scans the byte stream before hyper sees it, hands
//! hyper only complete request heads it has checked, and tracks body framing so it
//! always knows where the next head starts. On a bad head it stops reading, and the
//! 4xx it prepared is written when hyper shuts the connection, so it can never
//! interleave with a response hyper is still writing.

use bytes::{Buf, Bytes, BytesMut};
use memchr::memmem::Finder;
use meshgate_core::{ErrorCode, GatewayError, RequestId};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Edge limits the scanner enforces.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// From the first byte of a request head to its end.
    pub header_read_timeout: std::time::Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrorCode,
    pub message: &'static str,
}

fn reject(code: ErrorCode, message: &'static str) -> Rejection {
    Rejection { code, message }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        value: u64,
        digits: u8,
        ext: bool,
    },
    SizeLf(u64),
    Data(u64),
    DataLf,
    /// A trailer line; `len` bytes so far, `cr` after a CR.
    Trailer {
        len: usize,
        cr: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of the connection: may be the HTTP/2 preface.
    Start,
    Head,
    Length(u64),
    Chunked(Chunk),
    /// HTTP/2, or after an upgrade: bytes are no longer HTTP/1 messages.
    Passthrough,
    Rejected,
}

/// What one step of scanning decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// These many bytes are checked and may go to hyper.
    Pass(usize),
    NeedMore,
    Reject(Rejection),
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The sans-io scanner.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    limits: GuardLimits,
    /// Bytes of a chunked body's trailer section seen so far (bounded like headers).
    trailer_bytes: usize,
    /// Header lines (byte ranges within the head just passed) to remove before hyper
    /// sees them: upgrade requests are served as plain HTTP/1.1.
    strip: Vec<std::ops::Range<usize>>,
}

impl Scanner {
    pub fn new(limits: GuardLimits) -> Self {
        Self {
            state: State::Start,
            limits,
            trailer_bytes: 0,
            strip: Vec::new(),
        }
    }

    /// Header lines to cut from the head the last `Step::Pass` covered.
    pub fn take_strip(&mut self) -> Vec<std::ops::Range<usize>> {
        std::mem::take(&mut self.strip)
    }

    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Remaining bytes of a Content-Length body, when in one.
    pub fn length_remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            _ => None,
        }
    }

    /// True between messages: a rejection here can be answered with a response.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Start | State::Head)
    }

    pub fn consume_length(&mut self, n: u64) {
        if let State::Length(rem) = self.state {
            let left = rem.saturating_sub(n);
            self.state = if left == 0 {
                State::Head
            } else {
                State::Length(left)
            };
        }
    }

    /// Scan from the start of `data` (bytes not yet passed).
    pub fn step(&mut self, data: &[u8]) -> Step {
        if data.is_empty() {
            return Step::NeedMore;
        }
        match self.state {
            State::Rejected => Step::NeedMore,
            State::Passthrough => Step::Pass(data.len()),
            State::Start => {
                let n = data.len().min(PREFACE.len());
                if data[..n] == PREFACE[..n] {
                    if n < PREFACE.len() {
                        return Step::NeedMore;
                    }
                    self.state = State::Passthrough;
                    return Step::Pass(data.len());
                }
                self.state = State::Head;
                self.step(data)
            }
            State::Head => self.head(data),
            State::Length(rem) => {
                let n = (data.len() as u64).min(rem);
                self.consume_length(n);
                Step::Pass(n as usize)
            }
            State::Chunked(c) => self.chunked(c, data),
        }
    }

    fn fail(&mut self, r: Rejection) -> Step {
        self.state = State::Rejected;
        Step::Reject(r)
    }

    fn head(&mut self, data: &[u8]) -> Step {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        let skip = data.chunks_exact(2).take_while(|c| *c == b"\r\n").count() * 2;
        if skip > 0 {
            return Step::Pass(skip);
        }
        let (max_line, max_fields) = (self.limits.max_request_line, self.limits.max_header_bytes);
        let Some(end) = HEAD_END.find(data) else {
            // Refuse early only what the whole head is sure to be refused for, so the
            // verdict never depends on where the network cut the head.
            let Some(line_end) = LINE_END.find(data) else {
                // The last byte may be the line's CR.
                if data.len().saturating_sub(1) > max_line {
                    return self.fail(reject(ErrorCode::UriTooLong, "request line is too long"));
                }
                return Step::NeedMore;
            };
            if line_end > max_line {
                return self.fail(reject(ErrorCode::UriTooLong, "request line is too long"));
            }
            // The header section ends where the head's end starts: in the last three
            // bytes at the earliest.
            if data.len().saturating_sub(3) > line_end + max_fields {
                return self.fail(reject(
                    ErrorCode::HeadersTooLarge,
                    "request headers are too large",
                ));
            }
            return Step::NeedMore;
        };
        // A request line within its limit and fields within theirs: `end` is the
        // line's length plus the fields'.
        if end > max_line + max_fields {
            return self.fail(reject(
                ErrorCode::HeadersTooLarge,
                "request headers are too large",
            ));
        }
        let head_len = end + 4;
        match self.check_head(&data[..end + 1]) {
            Ok(next) => {
                self.state = next;
                Step::Pass(head_len)
            }
            Err(r) => self.fail(r),
        }
    }

    fn check_head(&mut self, head: &[u8]) -> Result<State, Rejection> {
        self.strip.clear();
        let bad = |m| reject(ErrorCode::InvalidRequest, m);
        let mut lines = lines(head);
        let first = lines.next().unwrap_or_default();
        let line = first
            .strip_suffix(b"\r")
            .ok_or_else(|| bad("bare LF in request line"))?;
        if line.len() > self.limits.max_request_line {
            return Err(reject(ErrorCode::UriTooLong, "request line is too long"));
        }
        if line.contains(&b'\r') {
            return Err(bad("bare CR in request line"));
        }
        let mut parts = line.split(|b| *b == b' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("malformed request line"));
        };
        if method.is_empty() || target.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
            return Err(bad("malformed request line"));
        }
        if !target.iter().all(|b| (0x21..0x7f).contains(b)) {
            return Err(bad("invalid character in the request target"));
        }
        let http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return Err(bad("unsupported HTTP version")),
        };
        let mut count = 0usize;
        let mut header_bytes = 0usize;
        let mut offset = first.len() + 1;
        let mut length: Option<u64> = None;
        let mut te: Option<bool> = None;
        for raw in lines {
            let line_start = offset;
            offset += raw.len() + 1;
            let line = raw
                .strip_suffix(b"\r")
                .ok_or_else(|| bad("bare LF in header section"))?;
            count += 1;
            header_bytes += raw.len() + 1;
            if count > self.limits.max_headers {
                return Err(reject(
                    ErrorCode::HeadersTooLarge,
                    "too many request headers",
                ));
            }
            if header_bytes > self.limits.max_header_bytes {
                return Err(reject(
                    ErrorCode::HeadersTooLarge,
                    "request headers are too large",
                ));
            }
            if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                return Err(bad("obsolete line folding in a header"));
            }
            if line.contains(&b'\r') {
                return Err(bad("bare CR in a header"));
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| bad("header without ':'"))?;
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return Err(bad("invalid header name"));
            }
            if value
                .iter()
                .any(|b| *b == 0 || (*b < 0x20 && *b != b'\t') || *b == 0x7f)
            {
                return Err(bad("control character in a header value"));
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                if length.is_some() {
                    return Err(bad("duplicate Content-Length"));
                }
                if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
                    return Err(bad("invalid Content-Length"));
                }
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                length = Some(v.ok_or_else(|| bad("invalid Content-Length"))?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if te.is_some() {
                    return Err(bad("duplicate Transfer-Encoding"));
                }
                if http10 {
                    return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
                }
                if !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(bad(
                        "unsupported Transfer-Encoding (only chunked is accepted)",
                    ));
                }
                te = Some(true);
            } else if name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"http2-settings")
            {
                self.strip.push(line_start..offset);
            }
        }
        if te.is_some() && length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        // Upgrades (WebSocket, h2c) and CONNECT are not served yet: such a request is
        // answered as plain HTTP/1.1, so the bytes after it are HTTP/1 messages and
        // stay under the guard. Switching to passthrough here would let the next
        // pipelined request skip every check.
        Ok(match (te, length) {
            (Some(_), _) => State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
                ext: false,
            }),
            (None, Some(n)) if n > 0 => State::Length(n),
            _ => State::Head,
        })
    }

    fn chunked(&mut self, mut c: Chunk, data: &[u8]) -> Step {
        let bad = |m| reject(ErrorCode::InvalidRequest, m);
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            c = match c {
                Chunk::Data(n) if n > 0 => {
                    let take = ((data.len() - i) as u64).min(n);
                    i += take as usize;
                    c = Chunk::Data(n - take);
                    continue;
                }
                Chunk::Size { value, digits, ext } => match b {
                    b'\r' if digits > 0 => Chunk::SizeLf(value),
                    b'\r' => return self.fail(bad("missing chunk size")),
                    _ if ext => {
                        if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                            return self.fail(bad("invalid chunk extension"));
                        }
                        c
                    }
                    b';' if digits > 0 => Chunk::Size {
                        value,
                        digits,
                        ext: true,
                    },
                    _ => {
                        let Some(d) = (b as char).to_digit(16) else {
                            return self.fail(bad("invalid chunk size"));
                        };
                        if digits >= 15 {
                            return self.fail(bad("chunk size too large"));
                        }
                        Chunk::Size {
                            value: value * 16 + u64::from(d),
                            digits: digits + 1,
                            ext,
                        }
                    }
                },
                Chunk::SizeLf(v) if b == b'\n' => {
                    if v == 0 {
                        Chunk::Trailer { len: 0, cr: false }
                    } else {
                        Chunk::Data(v)
                    }
                }
                Chunk::SizeLf(_) => return self.fail(bad("chunk size line must end with CRLF")),
                Chunk::Data(_) if b == b'\r' => Chunk::DataLf,
                Chunk::Data(_) | Chunk::DataLf if b != b'\n' => {
                    return self.fail(bad("chunk data must end with CRLF"));
                }
                Chunk::Data(_) => return self.fail(bad("chunk data must end with CRLF")),
                Chunk::DataLf => Chunk::Size {
                    value: 0,
                    digits: 0,
                    ext: false,
                },
                Chunk::Trailer { len, cr } => match (b, cr) {
                    (b'\r', false) => Chunk::Trailer { len, cr: true },
                    (b'\n', true) if len == 0 => {
                        // Empty line: the message is complete.
                        self.state = State::Head;
                        self.trailer_bytes = 0;
                        return Step::Pass(i + 1);
                    }
                    (b'\n', true) => Chunk::Trailer { len: 0, cr: false },
                    (b'\r' | b'\n', _) => return self.fail(bad("bare CR or LF in trailers")),
                    _ => {
                        self.trailer_bytes += 1;
                        if self.trailer_bytes > self.limits.max_header_bytes {
                            return self.fail(reject(
                                ErrorCode::HeadersTooLarge,
                                "trailers are too large",
                            ));
                        }
                        Chunk::Trailer {
                            len: len + 1,
                            cr: false,
                        }
                    }
                },
            };
            i += 1;
        }
        self.state = State::Chunked(c);
        Step::Pass(i)
    }
}

/// The end of a head, and of a line: searchers built once (building one per search
/// costs more than the search in a small head).
static HEAD_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
static LINE_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n"));

/// `head` split at each LF, as `split` does it, with the LFs found by memchr.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(head);
    std::iter::from_fn(move || {
        let r = rest?;
        match memchr::memchr(b'\n', r) {
            Some(i) => {
                rest = Some(&r[i + 1..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The bytes of a complete HTTP/1.1 error response that closes the connection.
pub fn error_response(r: &Rejection, id: &RequestId) -> Bytes {
    let body = GatewayError::new(r.code, r.message).json_body(id.as_str());
    let status = r.code.status();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nx-request-id: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        id
    );
    let mut out = BytesMut::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(&body);
    out.freeze()
}

/// The connection around the guard: told about every rejection (metrics, access
/// log), and asked how many requests hyper has answered, so a refusal never cuts
/// off the responses to requests pipelined before it.
pub trait RejectSink: Send + Sync + 'static {
    fn rejected(&self, r: &Rejection, id: &RequestId);
    /// Requests on this connection whose responses are complete.
    fn answered(&self) -> u64;
    /// Wake `waker` when `answered` grows.
    fn wait_answered(&self, waker: &std::task::Waker);
}

/// An IO wrapper that feeds hyper only checked bytes.
pub struct Guarded<IO> {
    io: IO,
    scan: Scanner,
    /// Bytes read from the socket; the first `ready` of them are checked.
    buf: BytesMut,
    ready: usize,
    eof: bool,
    /// A prepared error response, written when hyper shuts the connection.
    response: Option<Bytes>,
    sink: std::sync::Arc<dyn RejectSink>,
    /// Armed while a request head is partly received (slowloris defence).
    header_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Where the current message starts in `buf`, while hyper has not seen its
    /// head: a bad body can then still be refused whole.
    msg_start: Option<usize>,
    /// Requests checked and handed on (or about to be).
    heads: u64,
}

impl<IO> Guarded<IO> {
    pub fn new(io: IO, limits: GuardLimits, sink: std::sync::Arc<dyn RejectSink>) -> Self {
        Self {
            io,
            scan: Scanner::new(limits),
            buf: BytesMut::new(),
            ready: 0,
            eof: false,
            response: None,
            sink,
            header_timer: None,
            msg_start: None,
            heads: 0,
        }
    }

    /// Remove header lines (`strip`, relative to `start`) from the head at
    /// `buf[start..start + len]`; returns the head's new length. Only upgrade
    /// requests take this path.
    fn cut(&mut self, start: usize, len: usize, strip: &[std::ops::Range<usize>]) -> usize {
        let head = &self.buf[start..start + len];
        let mut kept = Vec::with_capacity(len);
        let mut pos = 0;
        for r in strip {
            kept.extend_from_slice(&head[pos..r.start]);
            pos = r.end;
        }
        kept.extend_from_slice(&head[pos..]);
        let tail = self.buf.split_off(start + len);
        self.buf.truncate(start);
        self.buf.extend_from_slice(&kept);
        self.buf.extend_from_slice(&tail);
        kept.len()
    }

    /// While a head is partly received, time it out; otherwise disarm.
    fn poll_header_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let partial = self.scan.at_boundary() && self.buf.len() > self.ready;
        if !partial {
            self.header_timer = None;
            return false;
        }
        let limit = self.scan.limits.header_read_timeout;
        let timer = self
            .header_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).is_ready()
    }

    fn scan(&mut self) {
        loop {
            let at_boundary = self.scan.at_boundary();
            match self.scan.step(&self.buf[self.ready..]) {
                Step::Pass(0) | Step::NeedMore => return,
                Step::Pass(n) => {
                    let mut n = n;
                    if at_boundary && !self.buf[self.ready..].starts_with(b"\r\n") {
                        self.msg_start = Some(self.ready);
                        self.heads += 1;
                        let strip = self.scan.take_strip();
                        if !strip.is_empty() {
                            n = self.cut(self.ready, n, &strip);
                        }
                    }
                    self.ready += n;
                }
                Step::Reject(r) => {
                    let id = RequestId::generate();
                    self.sink.rejected(&r, &id);
                    // Refuse the whole message while hyper has not seen its head; once it
                    // has, hyper is busy with the request and it can only be cut off.
                    let unseen = if at_boundary {
                        Some(self.ready)
                    } else {
                        self.msg_start
                    };
                    if let Some(start) = unseen {
                        self.response = Some(error_response(&r, &id));
                        self.ready = start;
                        if !at_boundary {
                            // the refused message's head was counted when it passed
                            self.heads -= 1;
                        }
                    }
                    self.buf.truncate(self.ready);
                    self.eof = true;
                    return;
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                // Once a byte of the current message went to hyper, its head is seen.
                this.msg_start = this.msg_start.and_then(|m| m.checked_sub(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Before a prepared refusal, let hyper answer every request it already
                // has: EOF now would make it drop them as if the client had left.
                if this.response.is_some() && this.sink.answered() < this.heads {
                    this.sink.wait_answered(cx.waker());
                    if this.sink.answered() < this.heads {
                        return Poll::Pending;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if this.buf.is_empty() {
                // Fast paths straight into hyper's buffer: HTTP/2, and a length-framed
                // body at least as large as that buffer.
                if this.scan.is_passthrough() {
                    return Pin::new(&mut this.io).poll_read(cx, out);
                }
                if let Some(rem) = this.scan.length_remaining()
                    && rem >= out.remaining() as u64
                {
                    let before = out.filled().len();
                    ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                    let n = out.filled().len() - before;
                    if n == 0 {
                        this.eof = true;
                    }
                    this.scan.consume_length(n as u64);
                    return Poll::Ready(Ok(()));
                }
            }
            this.buf.reserve(8192);
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    if this.poll_header_timer(cx) {
                        // The head did not arrive in time: close without a response.
                        let timeout = reject(ErrorCode::InvalidRequest, "header read timeout");
                        this.sink.rejected(&timeout, &RequestId::generate());
                        this.eof = true;
                        continue;
                    }
                    return Poll::Pending;
                }
            };
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.scan();
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while let Some(resp) = this.response.as_mut() {
            if resp.is_empty() {
                this.response = None;
                break;
            }
            let n = ready!(Pin::new(&mut this.io).poll_write(cx, resp))?;
            if n == 0 {
                this.response = None;
                break;
            }
            resp.advance(n);
        }
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
