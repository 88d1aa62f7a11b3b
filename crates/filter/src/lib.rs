//! The filter framework of meshgate: the `Filter` trait with its named phases, the
//! per-Api `Chain` compiled once per config snapshot, and the closed set of built-in
//! filters, each built from its typed config by one `match` in [`build`].
//!
//! A filter sees the request head and the typed [`RequestCtx`]; it never reaches into
//! the proxy. Filters that need I/O (token introspection, Redis) return a boxed future;
//! the rest answer synchronously, so a chain of simple filters allocates nothing.

mod access;
mod auth;
mod chain;
mod compress;
mod consumers;
mod header_ops;
mod registry;
mod traffic;
mod transform;
mod validate;

pub use chain::Chain;
pub use consumers::{Conflict, ConsumerSet, HmacCredential};
pub use header_ops::{HeaderOps, HeaderOpsConfig};
pub use registry::{BuildCtx, BuildError, build, is_known};
pub use traffic::{Kind as LimiterKind, LimiterStats, limiter_stats};
pub use transform::Transform;
pub use validate::RequestValidator;

use bytes::Bytes;
use meshgate_core::{GatewayError, RequestCtx};
use std::future::Future;
use std::pin::Pin;

/// What a filter decided about a request.
#[derive(Debug)]
pub enum Flow {
    /// Go on to the next filter, then the upstream.
    Continue,
    /// Answer now with this response; later filters and the upstream are skipped.
    /// Boxed: nearly every filter continues, and a small `Flow` is returned in
    /// registers instead of copied through memory at each step of the chain.
    Respond(Box<http::Response<Bytes>>),
}

pub type FilterResult = Result<Flow, GatewayError>;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A filter's answer in the request phase: ready now, or after some I/O.
pub enum Step<'a> {
    Done(FilterResult),
    Pending(BoxFuture<'a, FilterResult>),
}

impl std::fmt::Debug for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Self::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// One filter in an Api's chain. Phases, in the order the proxy runs them:
/// `on_request` (chain order) → `on_body` (chain order, only for filters that want
/// the body) → invoke → `on_response` (reverse order) →
/// `on_complete` (always, even when an earlier phase failed).
pub trait Filter: Send + Sync + 'static {
    /// The built-in's name, as written in `filters:`.
    fn name(&self) -> &'static str;

    fn on_request<'a>(
        &'a self,
        _ctx: &'a mut RequestCtx,
        _req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        Step::Done(Ok(Flow::Continue))
    }

    /// True when the filter must see the whole request body (`on_body`). The proxy
    /// then buffers the body, within the Api's size limit, before invoking.
    fn wants_body(&self) -> bool {
        false
    }

    /// The whole request body, after every filter's `on_request` has passed.
    fn on_body(
        &self,
        _ctx: &mut RequestCtx,
        _req: &http::request::Parts,
        _body: &Bytes,
    ) -> FilterResult {
        Ok(Flow::Continue)
    }

    fn on_response(&self, _ctx: &RequestCtx, _resp: &mut http::response::Parts) {}

    /// True for filters that identify the caller as a Consumer (`ctx.consumer`):
    /// decisions keyed on the Consumer are taken after them.
    fn identifies(&self) -> bool {
        false
    }

    fn on_complete(&self, _ctx: &RequestCtx, _status: http::StatusCode) {}
}

/// `#[serde(default = "crate::yes")]`: a flag that is on unless turned off.
pub(crate) fn yes() -> bool {
    true
}

/// `uri` with its path and query replaced by `pq`, scheme and authority kept.
pub(crate) fn with_path_and_query(uri: &http::Uri, pq: String) -> Result<http::Uri, String> {
    let pq = http::uri::PathAndQuery::try_from(pq).map_err(|e| e.to_string())?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    http::Uri::from_parts(parts).map_err(|e| e.to_string())
}

/// A filter's typed config from its `config:` value; errors point at `config`.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, registry::BuildError> {
    T::deserialize(value).map_err(|e| registry::BuildError::new("config", e.to_string()))
}

/// A query-string name or value decoded: `+` is a space, then percent-decoding.
pub(crate) fn form_decode(s: &str) -> Vec<u8> {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).collect()
}

/// The decoded values of query parameter `name`, in order.
pub(crate) fn query_values<'q>(
    query: &'q str,
    name: &'q str,
) -> impl Iterator<Item = Vec<u8>> + 'q {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name.as_bytes()).then(|| form_decode(v))
    })
}

/// Every value of query parameter `name` (names and values percent-decoded, `+` as a
/// space), removing those occurrences from the URI when `remove` is set.
pub(crate) fn take_query_param(
    req: &mut http::request::Parts,
    name: &str,
    remove: bool,
) -> Result<Vec<Vec<u8>>, GatewayError> {
    let Some(q) = req.uri.query() else {
        return Ok(Vec::new());
    };
    let mut kept: Vec<&str> = Vec::new();
    let mut found = Vec::new();
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(k) == name.as_bytes() {
            found.push(form_decode(v));
            if !remove {
                kept.push(pair);
            }
        } else {
            kept.push(pair);
        }
    }
    if remove && !found.is_empty() {
        let pq = if kept.is_empty() {
            req.uri.path().to_string()
        } else {
            format!("{}?{}", req.uri.path(), kept.join("&"))
        };
        req.uri = with_path_and_query(&req.uri, pq).map_err(|_| {
            GatewayError::new(
                meshgate_core::ErrorCode::InvalidRequest,
                "invalid request target",
            )
        })?;
    }
    Ok(found)
}

/// An optional duration field of a filter config, with its default.
pub(crate) fn duration_or(
    field: &str,
    value: Option<&str>,
    default: std::time::Duration,
) -> Result<std::time::Duration, registry::BuildError> {
    value.map_or(Ok(default), |s| {
        meshgate_core::parse_duration(s).map_err(|e| registry::BuildError::new(field, e))
    })
}

/// A secret in a filter config: `{env: NAME}` or `{file: PATH}` (relative to the
/// config file). Inline values are refused because a filter's config is shown as
/// written by `GET /config`.
pub(crate) fn filter_secret(
    value: &serde_json::Value,
    field: &str,
    base: Option<&std::path::Path>,
) -> Result<String, registry::BuildError> {
    use serde::Deserialize;
    let src = meshgate_api::SecretSource::deserialize(value).map_err(|_| {
        registry::BuildError::new(
            field,
            "give the secret as {env: NAME} or {file: PATH} (inline secrets in filter configs would show in /config)",
        )
    })?;
    let bytes = src
        .read(base.unwrap_or(std::path::Path::new("")))
        .map_err(|e| registry::BuildError::new(field, e))?;
    String::from_utf8(bytes)
        .map_err(|_| registry::BuildError::new(field, "the secret is not UTF-8"))
}
