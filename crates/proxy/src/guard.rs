//! The strict HTTP/1 framing scanner of the HTTP/1.1 server (`h1_server`).
//!
//! Lenient parsers resolve some ambiguous framings on their own (hyper drops
//! `Content-Length` when `Transfer-Encoding` is also present, and merges identical
//! duplicate lengths). A gateway must instead refuse them: two hops that disagree on
//! where a message ends is request smuggling. The scanner judges every request head
//! before it is parsed, and tracks body framing so it always knows where the next
//! head starts; the server reads bodies through it (`Scanner::body_step`). A refused
//! request is answered with the 4xx `error_response` makes, and the connection closed.

use crate::h1::parse_length;
use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use meshgate_core::{ErrorCode, GatewayError, RequestId};
use std::ops::Range;
use std::sync::LazyLock;

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

/// What one step of reading a body decided.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyStep {
    /// These many bytes are body payload.
    Data(usize),
    /// These many bytes are chunk framing (sizes, line ends, trailers): drop them.
    Framing(usize),
    NeedMore,
    Reject(Rejection),
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
    /// Part of a head came and was not enough. The one-pass check starts from the
    /// head's first byte and is not tried again until the head passes: a head sent
    /// a few bytes at a time costs one search for its end per read, not a scan too.
    head_pending: bool,
    /// Where the parts of the head last passed lie in it.
    layout: Layout,
}

/// Where the parts of a checked request head lie in it (byte ranges from its
/// start): the server builds the request from them without parsing it again.
#[derive(Debug, Default)]
pub struct Layout {
    pub method: Range<usize>,
    pub target: Range<usize>,
    pub http10: bool,
    /// Each header field's name and value (the value without surrounding blanks).
    pub fields: Vec<(Range<usize>, Range<usize>)>,
}

impl Scanner {
    pub fn new(limits: GuardLimits) -> Self {
        Self {
            state: State::Start,
            limits,
            trailer_bytes: 0,
            head_pending: false,
            layout: Layout::default(),
        }
    }

    /// The layout of the head the last `Step::Pass` of a head covered.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// A copy that reads on from the same place in a body (without the layout).
    pub fn body_reader(&self) -> Self {
        Self {
            state: self.state,
            limits: self.limits,
            trailer_bytes: self.trailer_bytes,
            head_pending: self.head_pending,
            layout: Layout::default(),
        }
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
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Start | State::Head)
    }

    /// Within a request body (after a head that declared one, before its end).
    pub fn in_body(&self) -> bool {
        matches!(self.state, State::Length(_) | State::Chunked(_))
    }

    /// Read a body from the start of `data`: its payload bytes apart from the chunk
    /// framing around them. The body has ended when `in_body` turns false.
    pub fn body_step(&mut self, data: &[u8]) -> BodyStep {
        if data.is_empty() {
            return BodyStep::NeedMore;
        }
        match self.state {
            State::Length(rem) => {
                let n = (data.len() as u64).min(rem);
                self.consume_length(n);
                BodyStep::Data(n as usize)
            }
            State::Chunked(Chunk::Data(n)) if n > 0 => {
                let take = (data.len() as u64).min(n);
                self.state = State::Chunked(Chunk::Data(n - take));
                BodyStep::Data(take as usize)
            }
            State::Chunked(c) => match self.chunked(c, data, true) {
                Step::Pass(n) => BodyStep::Framing(n),
                Step::NeedMore => BodyStep::NeedMore,
                Step::Reject(r) => BodyStep::Reject(r),
            },
            _ => BodyStep::Framing(0),
        }
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
            State::Chunked(c) => self.chunked(c, data, false),
        }
    }

    fn fail(&mut self, r: Rejection) -> Step {
        self.state = State::Rejected;
        Step::Reject(r)
    }

    fn head(&mut self, data: &[u8]) -> Step {
        // Nearly every head: whole, well-formed, and found in the same pass.
        if !self.head_pending
            && let Some((next, head_len)) = self.fast_head(data)
        {
            self.state = next;
            return Step::Pass(head_len);
        }
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
                self.head_pending = true;
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
            self.head_pending = true;
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
                self.head_pending = false;
                self.state = next;
                Step::Pass(head_len)
            }
            Err(r) => self.fail(r),
        }
    }

    /// The common case of finding the head's end and `check_head` in one pass over
    /// the bytes not yet passed (`head`): a whole head, its request line and fields
    /// made only of the bytes a well-formed head has, within every limit. Its next
    /// state and length. `None` as soon as anything is unusual or the head is not
    /// all here; `Scanner::head` then searches for the end, and `check_head` judges
    /// the head and names what is wrong. What this accepts, those accept with the
    /// same length and layout (a randomised test compares them). No end is found
    /// past a CR this does not take as a line's, so the end found is the first
    /// `CRLF CRLF`, as theirs is.
    fn fast_head(&mut self, head: &[u8]) -> Option<(State, usize)> {
        // METHOD SP TARGET SP HTTP/1.x CR LF, fields, CR LF.
        let method_end = scan(head, 0, &TCHAR);
        if method_end == 0 || head.get(method_end) != Some(&b' ') {
            return None;
        }
        let target_end = run(head, method_end + 1, &TARGET, all_target);
        if target_end == method_end + 1 || head.get(target_end) != Some(&b' ') {
            return None;
        }
        let version_end = target_end + 9;
        let http10 = match head.get(target_end + 1..version_end)? {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return None,
        };
        if version_end > self.limits.max_request_line || head.get(version_end) != Some(&b'\r') {
            return None;
        }
        let layout = &mut self.layout;
        layout.method = 0..method_end;
        layout.target = method_end + 1..target_end;
        layout.http10 = http10;
        layout.fields.clear();
        let mut i = version_end + 1;
        let mut header_bytes = 0usize;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        // At the LF of each line: the head ends, or another field follows.
        let head_len = loop {
            if head.get(i) != Some(&b'\n') {
                return None;
            }
            if head.get(i + 1..i + 3)? == b"\r\n" {
                break i + 3;
            }
            let start = i + 1;
            let name_end = scan(head, start, &TCHAR);
            if name_end == start || head.get(name_end) != Some(&b':') {
                return None;
            }
            let value_start = scan(head, name_end + 1, &BLANK);
            let cr = run(head, value_start, &FIELD_VCHAR, all_field_vchar);
            if head.get(cr) != Some(&b'\r') {
                return None;
            }
            let value_end = value_end(head, value_start, cr);
            header_bytes += cr + 2 - start;
            if layout.fields.len() == self.limits.max_headers
                || header_bytes > self.limits.max_header_bytes
            {
                return None;
            }
            let (name, value) = (&head[start..name_end], &head[value_start..value_end]);
            if name.eq_ignore_ascii_case(b"content-length") {
                if length.is_some() {
                    return None;
                }
                length = Some(parse_length(value)?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if chunked || http10 || !value.eq_ignore_ascii_case(b"chunked") {
                    return None;
                }
                chunked = true;
            }
            layout
                .fields
                .push((start..name_end, value_start..value_end));
            i = cr + 1;
        };
        let next = match (chunked, length) {
            (true, None) => State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
                ext: false,
            }),
            (true, Some(_)) => return None,
            (false, Some(n)) if n > 0 => State::Length(n),
            (false, _) => State::Head,
        };
        Some((next, head_len))
    }

    fn check_head(&mut self, head: &[u8]) -> Result<State, Rejection> {
        let bad = |m| reject(ErrorCode::InvalidRequest, m);
        let at = |part: &[u8]| {
            let start = part.as_ptr() as usize - head.as_ptr() as usize;
            start..start + part.len()
        };
        self.layout.fields.clear();
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
        self.layout.method = at(method);
        self.layout.target = at(target);
        self.layout.http10 = http10;
        let mut count = 0usize;
        let mut header_bytes = 0usize;
        let mut length: Option<u64> = None;
        let mut te: Option<bool> = None;
        for raw in lines {
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
            self.layout.fields.push((at(name), at(value)));
            if name.eq_ignore_ascii_case(b"content-length") {
                if length.is_some() {
                    return Err(bad("duplicate Content-Length"));
                }
                length = Some(parse_length(value).ok_or_else(|| bad("invalid Content-Length"))?);
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
            }
        }
        if te.is_some() && length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        // An upgrade request's bytes after it are HTTP/1 messages until a `101` was
        // written (the server then stops reading HTTP and relays bytes, `h1_server`),
        // so they stay under the guard. Switching to passthrough here would let the
        // next pipelined request skip every check when the upstream refuses the
        // switch. CONNECT is not served.
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

    /// Scan chunked framing and data; with `stop_at_data`, stop where chunk data
    /// starts, so a body reader can take the data apart from the framing.
    fn chunked(&mut self, mut c: Chunk, data: &[u8], stop_at_data: bool) -> Step {
        let bad = |m| reject(ErrorCode::InvalidRequest, m);
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            c = match c {
                Chunk::Data(n) if n > 0 && stop_at_data => {
                    self.state = State::Chunked(c);
                    return Step::Pass(i);
                }
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
    TCHAR[usize::from(b)]
}

/// A class of bytes as a table: whether `$c` is in it, for every byte.
macro_rules! byte_class {
    ($c:ident => $member:expr) => {{
        let mut t = [false; 256];
        let mut b = 0;
        while b < 256 {
            let $c = b as u8;
            t[b] = $member;
            b += 1;
        }
        t
    }};
}

/// The end of the run of bytes in `class` from `i`: eight at a time while `whole`
/// says a word's eight bytes all are, then byte by byte. A word test may refuse a
/// word whose bytes are all in the class (a tab in a field value): the table then
/// decides. Targets and field values are most of a head's bytes.
pub(crate) fn run(head: &[u8], mut i: usize, class: &[bool; 256], whole: fn(u64) -> bool) -> usize {
    while let Some(word) = head.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
        if !whole(u64::from_le_bytes(word)) {
            break;
        }
        i += 8;
    }
    scan(head, i, class)
}

/// The end of the run of bytes in `class` from `i`, byte by byte (for short runs).
pub(crate) fn scan(head: &[u8], mut i: usize, class: &[bool; 256]) -> usize {
    while i < head.len() && class[usize::from(head[i])] {
        i += 1;
    }
    i
}

/// Where a field value that runs from `start` to its line's CR at `cr` ends once
/// its trailing blanks are left out.
pub(crate) fn value_end(head: &[u8], start: usize, mut cr: usize) -> usize {
    while cr > start && BLANK[usize::from(head[cr - 1])] {
        cr -= 1;
    }
    cr
}

const ONES: u64 = u64::from_ne_bytes([1; 8]);
const HIGH: u64 = ONES * 0x80;

/// Whether some byte of `w` is below `n` (at most 0x80). Never misses one; a byte
/// just above one that is below may be counted too, which does not change the
/// answer.
const fn any_below(w: u64, n: u8) -> bool {
    w.wrapping_sub(ONES * n as u64) & !w & HIGH != 0
}

const fn any_equal(w: u64, b: u8) -> bool {
    any_below(w ^ (ONES * b as u64), 1)
}

/// Eight bytes of `TARGET`.
fn all_target(w: u64) -> bool {
    w & HIGH == 0 && !any_below(w, 0x21) && !any_equal(w, 0x7f)
}

/// Eight bytes of `FIELD_VCHAR` without a tab.
pub(crate) fn all_field_vchar(w: u64) -> bool {
    !any_below(w, 0x20) && !any_equal(w, 0x7f)
}

/// What a request target is made of (visible ASCII).
static TARGET: [bool; 256] = byte_class!(c => c > 0x20 && c < 0x7f);
/// What a field value is made of: no control character but tab.
pub(crate) static FIELD_VCHAR: [bool; 256] =
    byte_class!(c => c == b'\t' || (c >= 0x20 && c != 0x7f));
pub(crate) static BLANK: [bool; 256] = byte_class!(c => c == b' ' || c == b'\t');

/// The token characters of RFC 9110 §5.6.2, by byte.
pub(crate) static TCHAR: [bool; 256] = byte_class!(c => token_char(c));

const fn token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
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

/// Told about every refused request (metrics, access log).
pub trait RejectSink: Send + Sync + 'static {
    fn rejected(&self, r: &Rejection, id: &RequestId);
}

#[cfg(test)]
pub(crate) mod tests;
