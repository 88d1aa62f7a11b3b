//! `key-auth`: an API key from a header or a query parameter resolves the Consumer.

use crate::consumers::ConsumerSet;
use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use http::HeaderName;
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    query: Option<String>,
    /// Remove the key header before forwarding (the query key is always removed).
    #[serde(default = "crate::yes")]
    hide_credentials: bool,
}

fn default_header() -> String {
    "x-api-key".into()
}

#[derive(Debug)]
pub struct KeyAuth {
    header: HeaderName,
    query: Option<String>,
    hide: bool,
    consumers: Arc<ConsumerSet>,
}

impl KeyAuth {
    pub fn from_config(
        value: &serde_json::Value,
        consumers: &Arc<ConsumerSet>,
    ) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let header = HeaderName::from_bytes(cfg.header.as_bytes()).map_err(|_| {
            BuildError::new(
                "config.header",
                format!("{:?} is not a valid header name", cfg.header),
            )
        })?;
        if cfg.query.as_deref().is_some_and(str::is_empty) {
            return Err(BuildError::new("config.query", "must not be empty"));
        }
        Ok(Self {
            header,
            query: cfg.query,
            hide: cfg.hide_credentials,
            consumers: consumers.clone(),
        })
    }

    /// The one key the request presents (header values and query occurrences must
    /// all agree, or the request is ambiguous). Query occurrences are removed.
    fn take_key(&self, req: &mut http::request::Parts) -> Result<Key, GatewayError> {
        let mut key = Key::None;
        for v in req.headers.get_all(&self.header) {
            key.offer(Key::Header(v.clone()))?;
        }
        if self.hide && !matches!(key, Key::None) {
            req.headers.remove(&self.header);
        }
        if let Some(param) = &self.query {
            for f in crate::take_query_param(req, param, true)? {
                key.offer(Key::Query(f))?;
            }
        }
        Ok(key)
    }
}

/// The key found so far: header values are kept by reference count, not copied.
enum Key {
    None,
    Header(http::HeaderValue),
    Query(Vec<u8>),
}

impl Key {
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::None => None,
            Self::Header(v) => Some(v.as_bytes()),
            Self::Query(v) => Some(v),
        }
    }

    /// Take `other` as the key, or check it is the same key.
    fn offer(&mut self, other: Key) -> Result<(), GatewayError> {
        match self.bytes() {
            None => *self = other,
            Some(k) if Some(k) != other.bytes() => {
                return Err(unauthorized("ambiguous request: more than one API key"));
            }
            Some(_) => {}
        }
        Ok(())
    }
}

fn unauthorized(message: &str) -> GatewayError {
    GatewayError::new(ErrorCode::Unauthorized, message)
}

impl Filter for KeyAuth {
    fn name(&self) -> &'static str {
        "key-auth"
    }

    fn identifies(&self) -> bool {
        true
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let key = match self.take_key(req) {
            Ok(k) => k,
            Err(e) => return Step::Done(Err(e)),
        };
        let Some(first) = key.bytes() else {
            return Step::Done(Err(unauthorized("missing API key")));
        };
        match self.consumers.by_key(first) {
            Some(c) => {
                ctx.consumer = Some(c.clone());
                Step::Done(Ok(Flow::Continue))
            }
            None => Step::Done(Err(unauthorized("invalid API key"))),
        }
    }
}
