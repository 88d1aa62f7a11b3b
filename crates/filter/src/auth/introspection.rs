//! `oauth2-introspection`: opaque bearer tokens checked against the authorization
//! server's RFC 7662 endpoint, with the gateway authenticating as a client (HTTP
//! Basic, RFC 6749 §2.3.1). Answers are cached until the sooner of the token's `exp`
//! and `cacheTtl`, so each token costs one call per TTL. An endpoint that cannot be
//! reached is 503 (`failOpen: true` lets such requests through without a Consumer).

use super::bearer::{BearerSource, invalid_token};
use super::cache::{Live, TokenCache};
use super::claims::ClaimHeaders;
use crate::consumers::ConsumerSet;
use crate::registry::BuildError;
use crate::{Filter, FilterResult, Flow, Step};
use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use meshgate_core::{Consumer, ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    endpoint: String,
    client_id: String,
    client_secret: serde_json::Value,
    #[serde(default)]
    cache_ttl: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    /// Every scope listed must be in the token's `scope`, or the request is 403.
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    forward: bool,
    #[serde(default = "default_cache")]
    cache_size: usize,
    /// The answer's claim (for example `client_id` or `username`) naming a Consumer.
    #[serde(default)]
    consumer_claim: Option<String>,
}

fn default_header() -> String {
    "authorization".into()
}

fn default_cache() -> usize {
    10_000
}

/// The part of an introspection answer the gateway keeps.
#[derive(Debug, Clone)]
struct Answer {
    active: bool,
    scopes: Vec<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    consumer: Option<Arc<Consumer>>,
    claims: meshgate_core::VerifiedClaims,
    until: Instant,
}

impl Live for Answer {
    fn live(&self) -> bool {
        self.until > Instant::now()
    }
}

#[derive(Debug)]
pub struct Introspection {
    endpoint: String,
    authorization: HeaderValue,
    ttl: Duration,
    fail_open: bool,
    scopes: Vec<String>,
    claims_to_headers: ClaimHeaders,
    source: BearerSource,
    client: reqwest::Client,
    cache: TokenCache<Answer>,
    consumer_claim: Option<String>,
    consumers: Arc<ConsumerSet>,
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'*');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

impl Introspection {
    pub fn from_config(
        value: &serde_json::Value,
        consumers: &Arc<ConsumerSet>,
        base: Option<&std::path::Path>,
    ) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let secret = crate::filter_secret(&cfg.client_secret, "config.clientSecret", base)?;
        // RFC 6749 §2.3.1: id and secret are form-encoded before Basic encoding.
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form(&cfg.client_id),
            form(&secret)
        ));
        let authorization = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| BuildError::new("config.clientId", "not usable in a header"))?;
        let ttl = crate::duration_or(
            "config.cacheTtl",
            cfg.cache_ttl.as_deref(),
            Duration::from_secs(60),
        )?;
        let timeout = crate::duration_or(
            "config.timeout",
            cfg.timeout.as_deref(),
            Duration::from_secs(2),
        )?;
        let client = super::idp_client("config.endpoint", &cfg.endpoint, timeout, 0)?;
        let claims_to_headers =
            ClaimHeaders::parse("config.claimsToHeaders", &cfg.claims_to_headers)?;
        Ok(Self {
            endpoint: cfg.endpoint,
            authorization,
            ttl,
            fail_open: cfg.fail_open,
            scopes: cfg.scopes,
            claims_to_headers,
            source: BearerSource::new(&cfg.header, cfg.query, cfg.forward)?,
            client,
            cache: TokenCache::new(cfg.cache_size),
            consumer_claim: cfg.consumer_claim,
            consumers: consumers.clone(),
        })
    }

    /// Ask the endpoint; `Err` when it could not answer.
    async fn introspect(&self, token: &str) -> Result<Answer, String> {
        let body = format!("token={}&token_type_hint=access_token", form(token));
        let resp = self
            .client
            .post(&self.endpoint)
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        let doc: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|e| format!("not a JSON object: {e}"))?;
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let exp = doc.get("exp").and_then(|e| e.as_u64());
        let active = doc.get("active") == Some(&serde_json::Value::Bool(true))
            && exp.is_none_or(|e| e > now_unix);
        let mut ttl = self.ttl;
        if let Some(e) = exp.filter(|_| active) {
            ttl = ttl.min(Duration::from_secs(e.saturating_sub(now_unix)));
        }
        let scopes = doc
            .get("scope")
            .and_then(|s| s.as_str())
            .map(|s| {
                s.split(' ')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let headers = self.claims_to_headers.values(&doc);
        let consumer = self
            .consumer_claim
            .as_ref()
            .and_then(|c| doc.get(c)?.as_str())
            .and_then(|name| self.consumers.by_name(name).cloned());
        Ok(Answer {
            active,
            scopes,
            headers,
            consumer,
            claims: meshgate_core::VerifiedClaims(Arc::new(doc)),
            until: Instant::now() + ttl,
        })
    }

    fn admit(
        &self,
        ctx: &mut RequestCtx,
        req: &mut http::request::Parts,
        answer: &Answer,
    ) -> FilterResult {
        if !answer.active {
            return Err(invalid_token("token is not active"));
        }
        if let Some(missing) = self.scopes.iter().find(|s| !answer.scopes.contains(s)) {
            return Err(GatewayError::new(
                ErrorCode::Forbidden,
                format!("token lacks the scope {missing:?}"),
            )
            .with_header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"insufficient_scope\""),
            ));
        }
        for (h, v) in &answer.headers {
            req.headers.insert(h.clone(), v.clone());
        }
        if let Some(c) = &answer.consumer {
            ctx.consumer = Some(c.clone());
        }
        ctx.extensions.insert(answer.claims.clone());
        Ok(Flow::Continue)
    }
}

impl Filter for Introspection {
    fn name(&self) -> &'static str {
        "oauth2-introspection"
    }

    fn identifies(&self) -> bool {
        true
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        for h in self.claims_to_headers.names() {
            req.headers.remove(h);
        }
        let token = match self.source.take(req) {
            Ok(t) => t,
            Err(e) => return Step::Done(Err(e)),
        };
        if let Some(answer) = self.cache.get(&token) {
            return Step::Done(self.admit(ctx, req, &answer));
        }
        Step::Pending(Box::pin(async move {
            match self.introspect(&token).await {
                Ok(answer) => {
                    self.cache.put(token, answer.clone());
                    self.admit(ctx, req, &answer)
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "token introspection failed");
                    if self.fail_open {
                        Ok(Flow::Continue)
                    } else {
                        Err(GatewayError::new(
                            ErrorCode::NoHealthyUpstream,
                            "the token introspection endpoint is not available",
                        ))
                    }
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inline_secrets_are_refused_and_sources_resolve() {
        let build = |secret: serde_json::Value| {
            Introspection::from_config(
                &json!({"endpoint": "http://127.0.0.1:1/i", "clientId": "gw", "clientSecret": secret}),
                &Arc::new(ConsumerSet::default()),
                None,
            )
        };
        let e = build(json!("plain")).err().map(|e| e.path);
        assert_eq!(e.as_deref(), Some("config.clientSecret"));
        let e = build(json!({"env": "MESHGATE_SURELY_UNSET_VARIABLE"}))
            .err()
            .map(|e| e.message);
        assert!(e.is_some_and(|m| m.contains("not set")));
        let path = std::env::temp_dir().join(format!("mg-intro-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap_or_else(|e| panic!("{e}"));
        let f = build(json!({"file": path.to_string_lossy()})).unwrap_or_else(|e| panic!("{e}"));
        // "gw:s3cret" in Basic; the trailing newline of the file is dropped.
        assert_eq!(f.authorization, "Basic Z3c6czNjcmV0");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn form_encoding_of_credentials() {
        assert_eq!(form("a b+c/d:é"), "a%20b%2Bc%2Fd%3A%C3%A9");
    }
}
