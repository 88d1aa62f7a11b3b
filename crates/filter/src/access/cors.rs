//! `cors`: the gateway answers preflights itself and marks allowed cross-origin
//! responses (the Fetch standard's CORS protocol).
//!
//! A request whose `Origin` is not allowed is refused with 403 before it reaches the
//! upstream, so a browser-borne cross-site call cannot cause side effects even when
//! the browser would have hidden the answer. Requests without `Origin` (not from a
//! browser's cross-origin fetch) pass untouched.

use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx, parse_duration};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    origins: Vec<String>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    credentials: bool,
    #[serde(default)]
    max_age: Option<String>,
}

/// One allowed origin: exact (`https://app.example.com`), or a pattern where `*`
/// stands for one or more characters of a host name (`https://*.example.com`).
#[derive(Debug)]
enum Origin {
    Any,
    Exact(String),
    Pattern(Vec<String>),
}

impl Origin {
    fn parse(s: &str) -> Self {
        if s == "*" {
            Self::Any
        } else if s.contains('*') {
            Self::Pattern(
                s.to_ascii_lowercase()
                    .split('*')
                    .map(String::from)
                    .collect(),
            )
        } else {
            Self::Exact(s.to_ascii_lowercase())
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(o) => o.eq_ignore_ascii_case(origin),
            Self::Pattern(parts) => glob(parts, &origin.to_ascii_lowercase()),
        }
    }
}

/// `parts` joined by `*`, each `*` matching one or more host-name characters
/// (letters, digits, `-`, `.`), never `/`, `:` or `@`.
fn glob(parts: &[String], s: &str) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return s.is_empty();
    };
    let Some(mut tail) = s.strip_prefix(first.as_str()) else {
        return false;
    };
    for (i, part) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        let host_chars = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            .unwrap_or(tail.len());
        // The star takes the shortest run that lets the rest match; at the end the
        // literal must close the string.
        let found = (1..=host_chars).find(|&n| {
            let after = &tail[n..];
            if last {
                after == part
            } else {
                after.starts_with(part.as_str())
            }
        });
        match found {
            Some(n) => tail = &tail[n + part.len()..],
            None => return false,
        }
    }
    tail.is_empty()
}

#[derive(Debug)]
pub struct Cors {
    origins: Vec<Origin>,
    methods: Vec<Method>,
    /// Lower-case allowed request header names.
    headers: Vec<String>,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    /// `*` may be sent back instead of the origin.
    any: bool,
}

/// The allowed origin of this request, kept for the response phase.
#[derive(Clone)]
struct Allowed(HeaderValue);

fn forbidden(message: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorCode::Forbidden, message)
}

fn list_value(path: &str, items: &[String]) -> Result<HeaderValue, BuildError> {
    HeaderValue::from_str(&items.join(", "))
        .map_err(|_| BuildError::new(path, "contains characters not allowed in a header"))
}

impl Cors {
    pub fn from_config(value: &serde_json::Value) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if cfg.origins.is_empty() {
            return Err(BuildError::new(
                "config.origins",
                "list at least one origin (or \"*\")",
            ));
        }
        let origins: Vec<Origin> = cfg.origins.iter().map(|o| Origin::parse(o)).collect();
        let any = origins.iter().any(|o| matches!(o, Origin::Any));
        if any && cfg.credentials {
            return Err(BuildError::new(
                "config.credentials",
                "credentials with origin \"*\" would let every site make credentialed calls; list the origins instead",
            ));
        }
        let method_names = cfg
            .methods
            .unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()]);
        let methods = method_names
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    BuildError::new(
                        format!("config.methods.{i}"),
                        format!("{m:?} is not a method"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, h) in cfg.headers.iter().chain(&cfg.expose_headers).enumerate() {
            if header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(BuildError::new(
                    format!("config.headers.{i}"),
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        let max_age = cfg
            .max_age
            .as_deref()
            .map(|s| {
                parse_duration(s)
                    .map(|d| HeaderValue::from(d.as_secs()))
                    .map_err(|e| BuildError::new("config.maxAge", e))
            })
            .transpose()?;
        let upper: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        Ok(Self {
            origins,
            allow_methods: list_value("config.methods", &upper)?,
            methods,
            headers: cfg.headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            allow_headers: (!cfg.headers.is_empty())
                .then(|| list_value("config.headers", &cfg.headers))
                .transpose()?,
            expose_headers: (!cfg.expose_headers.is_empty())
                .then(|| list_value("config.exposeHeaders", &cfg.expose_headers))
                .transpose()?,
            credentials: cfg.credentials,
            max_age,
            any,
        })
    }

    fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o.matches(origin))
    }

    /// ACAO and ACAC for an allowed origin.
    fn mark(&self, h: &mut http::HeaderMap, origin: &HeaderValue) {
        let acao = if self.any {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        };
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, acao);
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if !self.any {
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }

    fn preflight(
        &self,
        req: &http::request::Parts,
        origin: &HeaderValue,
    ) -> Result<Flow, GatewayError> {
        let method = req
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !self.methods.iter().any(|m| m.as_str().as_bytes() == method) {
            return Err(forbidden(format!(
                "CORS method {:?} is not allowed",
                String::from_utf8_lossy(method)
            )));
        }
        for v in req.headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            let list = v
                .to_str()
                .map_err(|_| forbidden("bad CORS request headers"))?;
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !self.headers.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                    return Err(forbidden(format!("CORS header {name:?} is not allowed")));
                }
            }
        }
        let mut resp = http::Response::new(bytes::Bytes::new());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        self.mark(h, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(v) = &self.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        Ok(Flow::Respond(Box::new(resp)))
    }
}

impl Filter for Cors {
    fn name(&self) -> &'static str {
        "cors"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let Some(origin) = req.headers.get(header::ORIGIN).cloned() else {
            return Step::Done(Ok(Flow::Continue));
        };
        let ok = origin.to_str().is_ok_and(|o| self.allows(o));
        if !ok {
            return Step::Done(Err(forbidden(format!(
                "origin {:?} is not allowed",
                String::from_utf8_lossy(origin.as_bytes())
            ))));
        }
        if req.method == Method::OPTIONS
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Step::Done(self.preflight(req, &origin));
        }
        ctx.extensions.insert(Allowed(origin));
        Step::Done(Ok(Flow::Continue))
    }

    fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        let Some(Allowed(origin)) = ctx.extensions.get::<Allowed>() else {
            return;
        };
        // The gateway's answer replaces whatever the upstream said about CORS.
        resp.headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        resp.headers
            .remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
        self.mark(&mut resp.headers, origin);
        if let Some(v) = &self.expose_headers {
            resp.headers
                .insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_patterns() {
        let p = Origin::parse("https://*.example.com");
        for (o, ok) in [
            ("https://a.example.com", true),
            ("https://a.b.example.com", true),
            ("HTTPS://A.EXAMPLE.COM", true),
            ("https://example.com", false),
            ("https://.example.com.evil.com", false),
            ("https://evil.com/.example.com", false),
            ("https://a.example.com:8443", false),
            ("http://a.example.com", false),
            ("https://a.example.com.evil", false),
        ] {
            assert_eq!(p.matches(o), ok, "{o}");
        }
        let port = Origin::parse("http://localhost:*");
        assert!(port.matches("http://localhost:3000"));
        assert!(!port.matches("http://localhost:3000@evil.com"));
        assert!(Origin::parse("https://app.example.com").matches("https://app.example.com"));
        assert!(!Origin::parse("https://app.example.com").matches("https://app.example.co"));
    }

    #[test]
    fn credentials_with_any_origin_is_refused() {
        let r = Cors::from_config(&serde_json::json!({"origins": ["*"], "credentials": true}));
        assert_eq!(
            r.err().map(|e| e.path),
            Some("config.credentials".to_string())
        );
    }
}
