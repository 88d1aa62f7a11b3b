//! The shared vocabulary of meshgate: the closed set of gateway error codes, the error
//! type every layer returns, request ids, and the typed per-request context that filters
//! read and write. It holds no I/O and no policy; it must stay small.

mod duration;
mod error;
mod request_id;

pub use duration::parse_duration;
pub use error::{ErrorCode, GatewayError};
pub use request_id::RequestId;

use std::net::SocketAddr;
use std::sync::Arc;

/// A request's path captures by name: inline for up to two, so a request with few
/// captures allocates nothing for the list.
pub type Captures = smallvec::SmallVec<[(Arc<str>, String); 2]>;

/// Facts about one request that cross phase boundaries. Filters read and write typed
/// fields here instead of string keys, so later filters (auth, limits) can rely on them.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: RequestId,
    pub client_addr: SocketAddr,
    /// `http` or `https`, as seen on the downstream socket.
    pub scheme: &'static str,
    /// Name of the matched Api, once routing has happened.
    pub api: Option<Arc<str>>,
    /// Path captures from the route template, in template order.
    pub captures: Captures,
    /// The authenticated caller, set by an auth filter (shared with the snapshot).
    pub consumer: Option<Arc<Consumer>>,
    /// The peer's verified workload identity (a SPIFFE ID), set by mesh mTLS.
    pub identity: Option<Arc<str>>,
    /// True for `content-type: application/grpc*`: errors become `grpc-status`.
    pub grpc: bool,
    /// Where the connection was going before iptables redirected it to the proxy
    /// (transparent interception); `None` for a connection made to the proxy.
    pub original_dst: Option<SocketAddr>,
    /// State a filter keeps from its request phase to its response phase, keyed by a
    /// type private to that filter. Empty (and unallocated) unless a filter uses it.
    pub extensions: http::Extensions,
}

/// The request path exactly as the client sent it, kept in [`RequestCtx::extensions`]
/// only when normalisation changed it (filters then see the normalised path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalPath(pub String);

/// The claims of a verified token (jwt) or an active introspection answer, kept in
/// [`RequestCtx::extensions`] for filters that key on them (`rate-limit` `claim:X`).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedClaims(pub Arc<serde_json::Map<String, serde_json::Value>>);

impl VerifiedClaims {
    /// A claim as key material: strings as they are, numbers and booleans printed.
    pub fn text(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        match self.0.get(name)? {
            serde_json::Value::String(s) => Some(s.as_str().into()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                Some(v.to_string().into())
            }
            _ => None,
        }
    }
}

/// A copy of the response body as it goes to the client, for a filter that keeps it
/// (the response cache). A filter asks for one by putting a [`ResponseTap`] in the
/// response head's extensions in its response phase.
pub trait BodyTap: Send + Sync {
    /// A chunk on its way out. Returning false stops the tap: it is dropped without
    /// [`BodyTap::end`].
    fn data(&mut self, chunk: &bytes::Bytes) -> bool;
    /// The body ended cleanly, without trailers. A tap dropped without `end` saw a
    /// body that failed, was cut short, or carried trailers.
    fn end(self: Box<Self>);
}

/// The tap a filter put on a response (cloneable, as `http::Extensions` requires).
#[derive(Clone)]
pub struct ResponseTap(Arc<std::sync::Mutex<Option<Box<dyn BodyTap>>>>);

impl ResponseTap {
    pub fn new(tap: Box<dyn BodyTap>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(tap))))
    }

    pub fn take(&self) -> Option<Box<dyn BodyTap>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for ResponseTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseTap")
    }
}

/// A Consumer's calendar quota (`Consumer.spec.quota`), enforced by the `quota` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests: u64,
    /// The Consumer's own period; without one, the `quota` filter's applies.
    pub per: Option<QuotaPeriod>,
}

/// The calendar period a quota counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaPeriod {
    Day,
    Month,
}

/// A content coding the gateway can compress a response body with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coding {
    Gzip,
    Brotli,
    Zstd,
}

impl Coding {
    pub const ALL: [Self; 3] = [Self::Zstd, Self::Brotli, Self::Gzip];

    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }
}

/// Put in a response head's extensions by the `compress` filter: the proxy then
/// sends the body compressed with this coding (the filter has set the headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressWith(pub Coding);

/// Copies of this request that `mirror` filters asked for, kept in
/// [`RequestCtx::extensions`]. The proxy sends each in the background just before the
/// request goes upstream, and ignores the answers.
#[derive(Debug, Clone, Default)]
pub struct Mirrors(pub Vec<MirrorTo>);

/// One copy: where it goes and how it may be sent.
#[derive(Debug, Clone)]
pub struct MirrorTo {
    pub service: Arc<str>,
    pub timeout: std::time::Duration,
    /// Larger request bodies (or bodies of unknown length) are not copied.
    pub max_body_bytes: u64,
    /// Told how the copy went; dropping it frees the copy's slot.
    pub ticket: Arc<dyn MirrorTicket>,
}

/// How a mirrored copy went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// The mirror Service answered with a status below 500.
    Answered,
    /// It answered 5xx, failed or timed out.
    Failed,
    /// Not sent: the body could not be copied.
    Skipped,
}

/// The filter's side of one copy.
pub trait MirrorTicket: Send + Sync + std::fmt::Debug {
    fn finished(&self, outcome: MirrorOutcome);
}

/// The caller as authentication established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: Arc<str>,
    pub groups: Vec<Arc<str>>,
    pub quota: Option<Quota>,
    /// The Consumer's labels, for decisions keyed on them (grey release by label).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The identity headers' values, built once per snapshot: `x-consumer-name`,
    /// and `x-consumer-groups` (absent without groups or when not header-safe).
    pub name_header: Option<http::HeaderValue>,
    pub groups_header: Option<http::HeaderValue>,
}

impl Consumer {
    pub fn new(
        name: &str,
        groups: &[String],
        labels: std::collections::BTreeMap<String, String>,
    ) -> Self {
        let joined = groups.join(",");
        Self {
            name: name.into(),
            quota: None,
            labels,
            groups: groups.iter().map(|g| g.as_str().into()).collect(),
            name_header: http::HeaderValue::from_str(name).ok(),
            groups_header: (!groups.is_empty())
                .then(|| http::HeaderValue::from_str(&joined).ok())
                .flatten(),
        }
    }
}

impl Consumer {
    pub fn with_quota(mut self, quota: Option<Quota>) -> Self {
        self.quota = quota;
        self
    }
}

impl RequestCtx {
    pub fn new(request_id: RequestId, client_addr: SocketAddr, scheme: &'static str) -> Self {
        Self {
            request_id,
            client_addr,
            scheme,
            api: None,
            captures: Captures::new(),
            consumer: None,
            identity: None,
            grpc: false,
            original_dst: None,
            extensions: http::Extensions::new(),
        }
    }

    /// Value of a named path capture.
    pub fn capture(&self, name: &str) -> Option<&str> {
        self.captures
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_str())
    }
}
