//! `jwt`: bearer tokens signed by a configured identity provider (RFC 7515/7519).
//!
//! The checks, in order: one token (two different ones are ambiguous); a compact JWS
//! with strict base64url; a header with a supported `alg` (never `none`), no `crit`,
//! and no key of its own (`jku`, `x5u`, `jwk` are refused, never fetched); the
//! provider chosen by `iss`; a key from that provider's JWKS whose type, `alg`, `use`
//! and `key_ops` fit the token (so an RSA key can never act as an HMAC secret); the
//! signature; then `exp`/`nbf` with leeway, `aud`, and required claims.
//!
//! Verdicts are cached per token until it expires, so each distinct token is verified
//! once; a cached verdict counts only while the key set it was checked against is
//! still the current one.

mod jwks;

use super::bearer::BearerSource;
use super::cache::{Live, TokenCache};
use super::claims::ClaimHeaders;
use crate::consumers::ConsumerSet;
use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::Algorithm;
use jwks::{KeySet, Remote, Source};
use meshgate_core::{Consumer, ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    providers: Vec<ProviderConfig>,
    #[serde(default)]
    leeway: Option<String>,
    /// Header carrying the token; `authorization` expects the `Bearer` scheme.
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    query: Option<String>,
    /// Pass the token on to the upstream (default: removed, like Envoy's `forward`).
    #[serde(default)]
    forward: bool,
    /// A token must map to a Consumer (by `iss` + `sub`), or the request is 401.
    #[serde(default)]
    require_consumer: bool,
    #[serde(default = "default_cache")]
    cache_size: usize,
}

fn default_header() -> String {
    "authorization".into()
}

fn default_cache() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProviderConfig {
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    algorithms: Vec<String>,
    jwks: JwksConfig,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default)]
    required_claims: Vec<String>,
    /// Tokens must carry `exp` (default true).
    #[serde(default = "crate::yes")]
    require_expiration: bool,
    /// `claims` (a JWT: the payload is a JSON claims set) or `any` (a bare JWS
    /// whose payload is opaque; only the signature is checked).
    #[serde(default)]
    payload: PayloadKind,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum PayloadKind {
    #[default]
    Claims,
    Any,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JwksConfig {
    #[serde(default)]
    inline: Option<serde_json::Value>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    refresh: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

const ALL_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
];

#[derive(Debug)]
struct Provider {
    issuer: Option<String>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    keys: Source,
    claims_to_headers: ClaimHeaders,
    required_claims: Vec<String>,
    require_expiration: bool,
    payload: PayloadKind,
}

/// What a verified token lets through, cached per token.
#[derive(Debug)]
struct Verified {
    consumer: Option<Arc<Consumer>>,
    /// The claims set, for filters that key on claims (absent for `payload: any`).
    claims: Option<meshgate_core::VerifiedClaims>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Unix seconds after which the verdict lapses (`exp` + leeway).
    until: u64,
    /// Index of the provider, and the generation of its key set, that verified it.
    provider: usize,
    generation: u64,
}

#[derive(Debug)]
pub struct Jwt {
    providers: Vec<Provider>,
    leeway: u64,
    source: BearerSource,
    require_consumer: bool,
    /// Every header any provider sets from claims: always removed from the request.
    claim_headers: Vec<HeaderName>,
    consumers: Arc<ConsumerSet>,
    cache: TokenCache<Arc<Verified>>,
}

impl Live for Verified {
    fn live(&self) -> bool {
        now_unix() <= self.until
    }
}

/// Tokens without `exp` (when allowed) are re-verified after this long.
const NO_EXP_CACHE: u64 = 60;

impl Provider {
    fn build(
        i: usize,
        p: ProviderConfig,
        base: Option<&std::path::Path>,
    ) -> Result<Self, BuildError> {
        let at = |f: &str| format!("config.providers.{i}.{f}");
        let algorithms = if p.algorithms.is_empty() {
            ALL_ALGORITHMS.to_vec()
        } else {
            p.algorithms
                .iter()
                .enumerate()
                .map(|(j, a)| {
                    Algorithm::from_str(a).map_err(|_| {
                        BuildError::new(
                            at(&format!("algorithms.{j}")),
                            format!("{a:?} is not a supported algorithm (RS*, PS*, ES256, ES384, EdDSA, HS*)"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        if p.payload == PayloadKind::Any
            && (!p.audiences.is_empty()
                || !p.required_claims.is_empty()
                || !p.claims_to_headers.is_empty())
        {
            return Err(BuildError::new(
                at("payload"),
                "with `payload: any` there are no claims to check: drop audiences, requiredClaims and claimsToHeaders",
            ));
        }
        let j = &p.jwks;
        let keys = match (&j.inline, &j.file, &j.uri) {
            (Some(doc), None, None) => {
                let bytes = serde_json::to_vec(doc).unwrap_or_default();
                Source::Static(Arc::new(
                    KeySet::parse(&bytes).map_err(|e| BuildError::new(at("jwks.inline"), e))?,
                ))
            }
            (None, Some(file), None) => {
                let path = base.map_or_else(|| file.into(), |b| b.join(file));
                let bytes = std::fs::read(&path).map_err(|e| {
                    BuildError::new(
                        at("jwks.file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                Source::Static(Arc::new(
                    KeySet::parse(&bytes).map_err(|e| BuildError::new(at("jwks.file"), e))?,
                ))
            }
            (None, None, Some(uri)) => {
                let refresh = crate::duration_or(
                    &at("jwks.refresh"),
                    j.refresh.as_deref(),
                    Duration::from_secs(300),
                )?;
                let timeout = crate::duration_or(
                    &at("jwks.timeout"),
                    j.timeout.as_deref(),
                    Duration::from_secs(2),
                )?;
                let client = crate::auth::idp_client(&at("jwks.uri"), uri, timeout, 3)?;
                Source::Remote(Arc::new(Remote::new(uri.clone(), refresh, client)))
            }
            _ => {
                return Err(BuildError::new(
                    at("jwks"),
                    "give exactly one of inline, file and uri",
                ));
            }
        };
        let claims_to_headers = ClaimHeaders::parse(&at("claimsToHeaders"), &p.claims_to_headers)?;
        Ok(Self {
            issuer: p.issuer,
            audiences: p.audiences,
            algorithms,
            keys,
            claims_to_headers,
            required_claims: p.required_claims,
            require_expiration: p.require_expiration && p.payload == PayloadKind::Claims,
            payload: p.payload,
        })
    }
}

use super::bearer::invalid_token as unauthorized;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token split and decoded, before any key is involved.
struct Parsed<'t> {
    alg: Algorithm,
    kid: Option<String>,
    /// `header.payload`, the signed bytes.
    signed: &'t str,
    signature: &'t str,
    claims: Option<serde_json::Map<String, serde_json::Value>>,
}

fn parse(token: &str) -> Result<Parsed<'_>, GatewayError> {
    let bad = || unauthorized("malformed token");
    let (signed, signature) = token.rsplit_once('.').ok_or_else(bad)?;
    let (head_b64, payload_b64) = signed.split_once('.').ok_or_else(bad)?;
    if payload_b64.contains('.') {
        return Err(bad());
    }
    let head = URL_SAFE_NO_PAD.decode(head_b64).map_err(|_| bad())?;
    let head: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&head).map_err(|_| bad())?;
    let alg = head.get("alg").and_then(|a| a.as_str()).ok_or_else(bad)?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(unauthorized("unsigned tokens (alg none) are refused"));
    }
    let alg = Algorithm::from_str(alg)
        .map_err(|_| unauthorized(format!("token algorithm {alg:?} is not supported")))?;
    for own_key in ["jku", "x5u", "jwk", "x5c"] {
        if head.contains_key(own_key) {
            return Err(unauthorized(format!(
                "token header carries its own key ({own_key}); keys come only from the configured JWKS"
            )));
        }
    }
    if head.contains_key("crit") {
        return Err(unauthorized(
            "token header has critical extensions (crit) this gateway does not understand",
        ));
    }
    if head.get("b64").is_some_and(|b| b != true) {
        return Err(unauthorized("unencoded payloads (b64: false) are refused"));
    }
    let kid = match head.get("kid") {
        None => None,
        Some(serde_json::Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(bad()),
    };
    let payload = URL_SAFE_NO_PAD.decode(payload_b64).map_err(|_| bad())?;
    let claims = serde_json::from_slice::<serde_json::Value>(&payload)
        .ok()
        .and_then(|v| match v {
            serde_json::Value::Object(m) => Some(m),
            _ => None,
        });
    Ok(Parsed {
        alg,
        kid,
        signed,
        signature,
        claims,
    })
}

fn number(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

impl Jwt {
    pub fn from_config(
        value: &serde_json::Value,
        consumers: &Arc<ConsumerSet>,
        base: Option<&std::path::Path>,
    ) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if cfg.providers.is_empty() {
            return Err(BuildError::new(
                "config.providers",
                "give at least one provider",
            ));
        }
        let leeway = crate::duration_or(
            "config.leeway",
            cfg.leeway.as_deref(),
            Duration::from_secs(60),
        )?;
        let source = BearerSource::new(&cfg.header, cfg.query, cfg.forward)?;
        let providers = cfg
            .providers
            .into_iter()
            .enumerate()
            .map(|(i, p)| Provider::build(i, p, base))
            .collect::<Result<Vec<_>, _>>()?;
        let mut claim_headers: Vec<HeaderName> = providers
            .iter()
            .flat_map(|p| p.claims_to_headers.names().cloned())
            .collect();
        claim_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        claim_headers.dedup();
        Ok(Self {
            providers,
            leeway: leeway.as_secs(),
            source,
            require_consumer: cfg.require_consumer,
            claim_headers,
            consumers: consumers.clone(),
            cache: TokenCache::new(cfg.cache_size),
        })
    }

    /// The provider for a token: the one naming its `iss`, else one naming no issuer.
    fn provider_for(
        &self,
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<usize, GatewayError> {
        let iss = claims.and_then(|c| c.get("iss")).and_then(|i| i.as_str());
        let ps = &self.providers;
        ps.iter()
            .position(|p| p.issuer.is_some() && p.issuer.as_deref() == iss)
            .or_else(|| ps.iter().position(|p| p.issuer.is_none()))
            .ok_or_else(|| unauthorized("token issuer is not accepted"))
    }

    /// Everything after the keys are known: signature, then claims.
    fn verify(
        &self,
        provider: usize,
        t: &Parsed<'_>,
        keys: &KeySet,
    ) -> Result<Verified, GatewayError> {
        let p = &self.providers[provider];
        if !p.algorithms.contains(&t.alg) {
            return Err(unauthorized(format!(
                "token algorithm {:?} is not accepted",
                t.alg
            )));
        }
        let mut tried = false;
        let mut good = false;
        for k in keys.candidates(t.alg, t.kid.as_deref()) {
            tried = true;
            if jsonwebtoken::crypto::verify(t.signature, t.signed.as_bytes(), &k.key, t.alg)
                .unwrap_or(false)
            {
                good = true;
                break;
            }
        }
        if !tried {
            return Err(unauthorized("no key of the issuer can verify this token"));
        }
        if !good {
            return Err(unauthorized("invalid token signature"));
        }
        let now = now_unix();
        let Some(claims) = &t.claims else {
            if p.payload == PayloadKind::Any {
                return Ok(Verified {
                    consumer: None,
                    claims: None,
                    headers: Vec::new(),
                    until: now + NO_EXP_CACHE,
                    provider,
                    generation: keys.generation,
                });
            }
            return Err(unauthorized("token payload is not a JSON claims set"));
        };
        let exp = match claims.get("exp") {
            Some(v) => Some(number(v).ok_or_else(|| unauthorized("token exp is not a number"))?),
            None if p.require_expiration => return Err(unauthorized("token has no expiry (exp)")),
            None => None,
        };
        if exp.is_some_and(|e| now > e.saturating_add(self.leeway)) {
            return Err(unauthorized("token has expired"));
        }
        if let Some(v) = claims.get("nbf") {
            let nbf = number(v).ok_or_else(|| unauthorized("token nbf is not a number"))?;
            if now.saturating_add(self.leeway) < nbf {
                return Err(unauthorized("token is not valid yet (nbf)"));
            }
        }
        if !p.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => p.audiences.contains(a),
                Some(serde_json::Value::Array(list)) => list.iter().any(|a| {
                    a.as_str()
                        .is_some_and(|a| p.audiences.iter().any(|x| x == a))
                }),
                _ => false,
            };
            if !ok {
                return Err(unauthorized("token audience is not accepted"));
            }
        }
        for c in &p.required_claims {
            if !claims.contains_key(c) {
                return Err(unauthorized(format!(
                    "token lacks the required claim {c:?}"
                )));
            }
        }
        let headers = p.claims_to_headers.values(claims);
        let str_claim = |n: &str| claims.get(n).and_then(|v| v.as_str());
        let consumer = match (str_claim("iss"), str_claim("sub")) {
            (Some(iss), Some(sub)) => self.consumers.by_jwt(iss, sub).cloned(),
            _ => None,
        };
        if self.require_consumer && consumer.is_none() {
            return Err(unauthorized("token subject is not a known consumer"));
        }
        Ok(Verified {
            consumer,
            claims: Some(meshgate_core::VerifiedClaims(Arc::new(claims.clone()))),
            headers,
            until: exp.map_or(now + NO_EXP_CACHE, |e| e.saturating_add(self.leeway)),
            provider,
            generation: keys.generation,
        })
    }

    /// A verdict still good: not lapsed, and checked against the provider's keys of now.
    fn cached(&self, token: &str) -> Option<Arc<Verified>> {
        let v = self.cache.get(token)?;
        let current = match &self.providers[v.provider].keys {
            Source::Static(k) => k.generation,
            Source::Remote(r) => {
                let keys = r.current()?;
                refresh_if_stale(r, &keys);
                keys.generation
            }
        };
        (current == v.generation).then_some(v)
    }

    fn apply(&self, ctx: &mut RequestCtx, req: &mut http::request::Parts, v: &Verified) {
        for (h, value) in &v.headers {
            req.headers.insert(h.clone(), value.clone());
        }
        if let Some(c) = &v.consumer {
            ctx.consumer = Some(c.clone());
        }
        if let Some(c) = &v.claims {
            ctx.extensions.insert(c.clone());
        }
    }

    /// Verify with the keys in hand, remember the verdict, and let the request on.
    fn finish(
        &self,
        ctx: &mut RequestCtx,
        req: &mut http::request::Parts,
        token: &str,
        t: &Parsed<'_>,
        provider: usize,
        keys: &KeySet,
    ) -> Result<Flow, GatewayError> {
        let v = Arc::new(self.verify(provider, t, keys)?);
        self.apply(ctx, req, &v);
        self.cache.put(token.to_owned(), v);
        Ok(Flow::Continue)
    }
}

/// Start a background refresh when the held keys are older than `refresh`.
fn refresh_if_stale(remote: &Arc<Remote>, keys: &KeySet) {
    if remote.stale() && remote.may_refetch() {
        let r = remote.clone();
        let seen = keys.generation;
        tokio::spawn(async move { r.fetch(Some(seen)).await });
    }
}

impl Filter for Jwt {
    fn name(&self) -> &'static str {
        "jwt"
    }

    fn identifies(&self) -> bool {
        true
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        for h in &self.claim_headers {
            req.headers.remove(h);
        }
        let token = match self.source.take(req) {
            Ok(t) => t,
            Err(e) => return Step::Done(Err(e)),
        };
        if let Some(v) = self.cached(&token) {
            self.apply(ctx, req, &v);
            return Step::Done(Ok(Flow::Continue));
        }
        let t = match parse(&token) {
            Ok(t) => t,
            Err(e) => return Step::Done(Err(e)),
        };
        let provider = match self.provider_for(t.claims.as_ref()) {
            Ok(p) => p,
            Err(e) => return Step::Done(Err(e)),
        };
        let remote = match &self.providers[provider].keys {
            Source::Static(keys) => {
                return Step::Done(self.finish(ctx, req, &token, &t, provider, keys));
            }
            Source::Remote(r) => r.clone(),
        };
        let held = remote.current();
        if let Some(keys) = &held {
            let unknown_kid = t.kid.as_deref().is_some_and(|k| !keys.has_kid(k));
            if !(unknown_kid && remote.may_refetch()) {
                refresh_if_stale(&remote, keys);
                return Step::Done(self.finish(ctx, req, &token, &t, provider, keys));
            }
        }
        // No keys yet, or a kid the set lacks: fetch now, and wait for it. (The parse
        // borrows the token, so the rare waiting path parses it again.)
        Step::Pending(Box::pin(async move {
            let seen = held.as_ref().map(|k| k.generation);
            match remote.fetch(seen).await {
                Some(keys) => {
                    let t = parse(&token)?;
                    self.finish(ctx, req, &token, &t, provider, &keys)
                }
                None => Err(GatewayError::new(
                    ErrorCode::NoHealthyUpstream,
                    "the token issuer's keys are not available",
                )),
            }
        }))
    }
}

#[cfg(test)]
mod tests;
