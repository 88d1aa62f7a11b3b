//! Where bearer tokens come from, shared by `jwt` and `oauth2-introspection`:
//! `Authorization: Bearer <token>` (or another header, taken whole), and optionally a
//! query parameter. Two different tokens in one request are refused as ambiguous.

use crate::registry::BuildError;
use http::{HeaderName, HeaderValue};
use meshgate_core::{ErrorCode, GatewayError};

#[derive(Debug)]
pub(crate) struct BearerSource {
    header: HeaderName,
    /// `authorization`: the value is `Bearer <token>`.
    bearer: bool,
    query: Option<String>,
    /// Keep the token on the forwarded request.
    forward: bool,
}

/// 401 for a token that was present but not acceptable (RFC 6750 §3.1).
pub(crate) fn invalid_token(message: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorCode::Unauthorized, message).with_header(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    )
}

impl BearerSource {
    pub(crate) fn new(
        header: &str,
        query: Option<String>,
        forward: bool,
    ) -> Result<Self, BuildError> {
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            BuildError::new("config.header", format!("{header:?} is not a header name"))
        })?;
        if query.as_deref().is_some_and(str::is_empty) {
            return Err(BuildError::new("config.query", "must not be empty"));
        }
        Ok(Self {
            bearer: header == http::header::AUTHORIZATION,
            header,
            query,
            forward,
        })
    }

    /// The one token the request carries (removed unless forwarded).
    pub(crate) fn take(&self, req: &mut http::request::Parts) -> Result<String, GatewayError> {
        let mut found: Vec<String> = Vec::new();
        for v in req.headers.get_all(&self.header) {
            let s = v
                .to_str()
                .map_err(|_| invalid_token("malformed token"))?
                .trim();
            let token = if self.bearer {
                let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
                if !scheme.eq_ignore_ascii_case("bearer") {
                    continue;
                }
                rest.trim()
            } else {
                s
            };
            found.push(token.to_string());
        }
        if !self.forward && !found.is_empty() {
            req.headers.remove(&self.header);
        }
        if let Some(param) = &self.query {
            for t in crate::take_query_param(req, param, !self.forward)? {
                found.push(String::from_utf8_lossy(&t).into_owned());
            }
        }
        let Some(first) = found.first() else {
            return Err(
                GatewayError::new(ErrorCode::Unauthorized, "missing bearer token").with_header(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer"),
                ),
            );
        };
        if found.iter().any(|t| t != first) {
            return Err(invalid_token("ambiguous request: more than one token"));
        }
        Ok(found.swap_remove(0))
    }
}
