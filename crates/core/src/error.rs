use http::StatusCode;
use std::fmt;

/// Every error the gateway itself produces has one of these codes. The set is closed so
/// that the JSON contract (`{"error": {"code": ...}}`), metrics labels and gRPC mapping
/// are decided in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    HeadersTooLarge,
    UriTooLong,
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    NoRoute,
    MethodNotAllowed,
    /// The Api is offline, or past its sunset.
    Gone,
    RateLimited,
    /// The Consumer used up its calendar quota (`quota` filter).
    QuotaExceeded,
    /// A cluster-wide limit could not be checked and its `failMode` is `closed`.
    RateLimitUnavailable,
    /// A `concurrency-limit` is full (and its queue, if any).
    ConcurrencyLimited,
    UpstreamUnavailable,
    CircuitOpen,
    NoHealthyUpstream,
    UpstreamTimeout,
    /// A `fault` filter aborted the request on purpose (its status is configured).
    FaultInjected,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UriTooLong => "uri_too_long",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NoRoute => "no_route",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Gone => "api_gone",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::RateLimitUnavailable => "rate_limit_unavailable",
            Self::ConcurrencyLimited => "concurrency_limited",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::CircuitOpen => "circuit_open",
            Self::NoHealthyUpstream => "no_healthy_upstream",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::FaultInjected => "fault_injected",
            Self::Internal => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Gone => StatusCode::GONE,
            Self::RateLimited | Self::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::CircuitOpen
            | Self::NoHealthyUpstream
            | Self::RateLimitUnavailable
            | Self::ConcurrencyLimited
            | Self::FaultInjected => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status a gRPC client sees for this gateway error
    /// (mapping as in grpc/doc/http-grpc-status-mapping.md, refined per code).
    pub fn grpc_status(self) -> u8 {
        match self {
            Self::InvalidRequest | Self::HeadersTooLarge | Self::UriTooLong => 3, // INVALID_ARGUMENT
            Self::PayloadTooLarge | Self::RateLimited | Self::QuotaExceeded => 8, // RESOURCE_EXHAUSTED
            Self::Unauthorized => 16,                                             // UNAUTHENTICATED
            Self::Forbidden => 7, // PERMISSION_DENIED
            Self::NoRoute | Self::MethodNotAllowed | Self::Gone => 12, // UNIMPLEMENTED
            Self::UpstreamUnavailable
            | Self::CircuitOpen
            | Self::NoHealthyUpstream
            | Self::RateLimitUnavailable
            | Self::ConcurrencyLimited
            | Self::FaultInjected => 14, // UNAVAILABLE
            Self::UpstreamTimeout => 4, // DEADLINE_EXCEEDED
            Self::Internal => 13, // INTERNAL
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure the gateway answers itself. Carries what the proxy needs to decide: the
/// code (status, JSON, grpc-status), a message for the client, and whether the
/// upstream may have seen the request (retry safety).
#[derive(Debug, Clone)]
pub struct GatewayError {
    pub code: ErrorCode,
    pub message: String,
    /// True when nothing was sent upstream, so replaying cannot duplicate work.
    pub retry_safe: bool,
    /// Extra headers for the error response (for example `allow` on 405).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The HTTP and gRPC status, when not the code's own (an injected fault's).
    pub status: Option<(StatusCode, u8)>,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_safe: false,
            headers: Vec::new(),
            status: None,
        }
    }

    /// Answer with this HTTP status, and this `grpc-status` for gRPC clients.
    pub fn with_status(mut self, status: StatusCode, grpc: u8) -> Self {
        self.status = Some((status, grpc));
        self
    }

    pub fn http_status(&self) -> StatusCode {
        self.status.map_or(self.code.status(), |(s, _)| s)
    }

    pub fn grpc_status(&self) -> u8 {
        self.status.map_or(self.code.grpc_status(), |(_, g)| g)
    }

    pub fn retry_safe(mut self) -> Self {
        self.retry_safe = true;
        self
    }

    pub fn with_header(mut self, name: http::HeaderName, value: http::HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The SPEC's JSON body: `{"error": {"code", "message", "requestId"}}`.
    pub fn json_body(&self, request_id: &str) -> bytes::Bytes {
        let body = serde_json::json!({
            "error": {"code": self.code.as_str(), "message": self.message, "requestId": request_id}
        });
        bytes::Bytes::from(body.to_string())
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for GatewayError {}
