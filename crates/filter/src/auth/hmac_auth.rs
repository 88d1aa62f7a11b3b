//! `hmac-auth`: HTTP Message Signatures (RFC 9421) with `hmac-sha256`.
//!
//! The client sends `Signature-Input` (which components are covered, and `created`,
//! `keyid`, optional `nonce`, `expires`, `alg`) and `Signature`. The gateway rebuilds
//! the signature base from the request as received, looks the key up by `keyid` (which
//! names the Consumer), and compares MACs in constant time. A request with a body must
//! cover `content-digest` (RFC 9530), and the digest is checked against the body
//! before anything is sent upstream.

use crate::consumers::ConsumerSet;
use crate::registry::BuildError;
use crate::{Filter, FilterResult, Flow, Step};
use bytes::Bytes;
use meshgate_core::{ErrorCode, GatewayError, OriginalPath, RequestCtx};
use serde::Deserialize;
use sfv::{BareItem, Dictionary, Item, ListEntry, Parser};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    clock_skew: Option<String>,
    #[serde(default = "default_components")]
    required_components: Vec<String>,
    #[serde(default)]
    nonce: NonceConfig,
    /// Only the signature under this label counts (default: the first one whose
    /// key id is known).
    #[serde(default)]
    label: Option<String>,
    /// Remove `Signature`, `Signature-Input` before forwarding (default true).
    #[serde(default = "crate::yes")]
    hide_credentials: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NonceConfig {
    #[serde(default)]
    required: bool,
    /// Most nonces remembered at once; past it the oldest half is dropped.
    #[serde(default)]
    capacity: Option<usize>,
}

fn default_components() -> Vec<String> {
    ["@method", "@path", "@authority"]
        .map(String::from)
        .to_vec()
}

const DERIVED: &[&str] = &[
    "@method",
    "@authority",
    "@path",
    "@query",
    "@scheme",
    "@target-uri",
    "@request-target",
];

#[derive(Debug)]
pub struct HmacAuth {
    skew: u64,
    required: Vec<String>,
    nonce_required: bool,
    label: Option<String>,
    hide: bool,
    consumers: Arc<ConsumerSet>,
    /// `keyid nonce` → unix second after which it may be forgotten.
    nonces: Mutex<HashMap<String, u64>>,
    nonce_capacity: usize,
}

/// What `on_body` must still check, found while verifying the signature.
#[derive(Clone)]
struct DigestCheck {
    covered: bool,
}

fn unauthorized(message: impl Into<String>) -> GatewayError {
    GatewayError::new(ErrorCode::Unauthorized, message).with_header(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Signature"),
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The field's lines, each trimmed, joined by ", " (RFC 9421 §2.1); None if absent.
fn field_value(headers: &http::HeaderMap, name: &str) -> Result<Option<String>, GatewayError> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v
            .to_str()
            .map_err(|_| unauthorized(format!("covered field {name:?} is not ASCII")))?
            .trim_matches([' ', '\t']);
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(s);
            }
            None => out = Some(s.to_string()),
        }
    }
    Ok(out)
}

/// `Host` (HTTP/1.1) or the URI authority (HTTP/2), lower-cased, default port dropped.
fn authority(ctx: &RequestCtx, req: &http::request::Parts) -> Option<String> {
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))?;
    let mut a = raw.to_ascii_lowercase();
    let default = if ctx.scheme == "https" { ":443" } else { ":80" };
    if a.ends_with(default) {
        a.truncate(a.len() - default.len());
    }
    Some(a)
}

fn serialize_item(item: &Item) -> Option<String> {
    use sfv::FieldType;
    vec![ListEntry::Item(item.clone())].serialize()
}

impl HmacAuth {
    pub fn from_config(
        value: &serde_json::Value,
        consumers: &Arc<ConsumerSet>,
    ) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let skew = crate::duration_or(
            "config.clockSkew",
            cfg.clock_skew.as_deref(),
            Duration::from_secs(300),
        )?;
        for (i, c) in cfg.required_components.iter().enumerate() {
            let ok = if c.starts_with('@') {
                DERIVED.contains(&c.as_str())
            } else {
                http::HeaderName::from_bytes(c.as_bytes()).is_ok() && c.to_ascii_lowercase() == *c
            };
            if !ok {
                return Err(BuildError::new(
                    format!("config.requiredComponents.{i}"),
                    format!(
                        "{c:?} is not a derived component ({}) or a lower-case header name",
                        DERIVED.join(", ")
                    ),
                ));
            }
        }
        Ok(Self {
            skew: skew.as_secs(),
            required: cfg.required_components,
            nonce_required: cfg.nonce.required,
            label: cfg.label,
            hide: cfg.hide_credentials,
            consumers: consumers.clone(),
            nonces: Mutex::new(HashMap::new()),
            nonce_capacity: cfg.nonce.capacity.unwrap_or(100_000),
        })
    }

    /// The value of one covered component of the request.
    fn component(
        &self,
        ctx: &RequestCtx,
        req: &http::request::Parts,
        item: &Item,
    ) -> Result<String, GatewayError> {
        let Some(name) = item.bare_item.as_string().map(|s| s.as_str()) else {
            return Err(unauthorized("a covered component is not a string"));
        };
        if !item.params.is_empty() {
            return Err(unauthorized(format!(
                "component parameters on {name:?} are not supported"
            )));
        }
        let path = || {
            ctx.extensions
                .get::<OriginalPath>()
                .map_or_else(|| req.uri.path().to_string(), |p| p.0.clone())
        };
        let query = || {
            req.uri
                .query()
                .map_or_else(String::new, |q| format!("?{q}"))
        };
        let missing = || unauthorized(format!("covered component {name:?} is missing"));
        Ok(match name {
            "@method" => req.method.as_str().to_string(),
            "@authority" => authority(ctx, req).ok_or_else(missing)?,
            "@path" => path(),
            "@query" => match req.uri.query() {
                Some(q) => format!("?{q}"),
                None => "?".into(),
            },
            "@scheme" => ctx.scheme.to_string(),
            "@request-target" => format!("{}{}", path(), query()),
            "@target-uri" => format!(
                "{}://{}{}{}",
                ctx.scheme,
                authority(ctx, req).ok_or_else(missing)?,
                path(),
                query()
            ),
            n if n.starts_with('@') => {
                return Err(unauthorized(format!(
                    "derived component {n:?} is not supported"
                )));
            }
            n if n.bytes().any(|b| b.is_ascii_uppercase()) => {
                return Err(unauthorized(format!("component {n:?} must be lower case")));
            }
            n => field_value(&req.headers, n)?.ok_or_else(missing)?,
        })
    }

    /// Verify the signature; on success the Consumer is set and what remains for
    /// `on_body` is returned.
    fn verify(
        &self,
        ctx: &mut RequestCtx,
        req: &http::request::Parts,
    ) -> Result<DigestCheck, GatewayError> {
        let input = field_value(&req.headers, "signature-input")?
            .ok_or_else(|| unauthorized("missing Signature-Input"))?;
        let sigs = field_value(&req.headers, "signature")?
            .ok_or_else(|| unauthorized("missing Signature"))?;
        let input: Dictionary = Parser::new(&input)
            .parse()
            .map_err(|_| unauthorized("malformed Signature-Input"))?;
        let sigs: Dictionary = Parser::new(&sigs)
            .parse()
            .map_err(|_| unauthorized("malformed Signature"))?;
        // The signature to check: the configured label, or the first with a known key.
        let chosen = input.iter().find(|(label, entry)| {
            let ListEntry::InnerList(list) = entry else {
                return false;
            };
            match &self.label {
                Some(l) => label.as_str() == l,
                None => list
                    .params
                    .get("keyid")
                    .and_then(|k| k.as_string())
                    .is_some_and(|k| self.consumers.by_hmac_key_id(k.as_str()).is_some()),
            }
        });
        let Some((label, ListEntry::InnerList(list))) = chosen else {
            return Err(unauthorized("no signature with a known key id"));
        };
        let params = &list.params;
        let key_id = params
            .get("keyid")
            .and_then(|k| k.as_string())
            .map(|k| k.as_str().to_string())
            .ok_or_else(|| unauthorized("signature has no keyid"))?;
        let cred = self
            .consumers
            .by_hmac_key_id(&key_id)
            .ok_or_else(|| unauthorized("unknown key id"))?;
        if let Some(alg) = params.get("alg")
            && alg.as_string().map(|a| a.as_str()) != Some("hmac-sha256")
        {
            return Err(unauthorized("signature algorithm must be hmac-sha256"));
        }
        let now = now_unix();
        let created = params
            .get("created")
            .and_then(BareItem::as_integer)
            .map(i64::from)
            .ok_or_else(|| unauthorized("signature has no created time"))?;
        let created = u64::try_from(created).map_err(|_| unauthorized("bad created time"))?;
        if created > now + self.skew || now > created + self.skew {
            return Err(unauthorized(
                "signature created time is outside the allowed clock skew",
            ));
        }
        if let Some(exp) = params.get("expires").and_then(BareItem::as_integer)
            && i64::from(exp) < i64::try_from(now).unwrap_or(i64::MAX)
        {
            return Err(unauthorized("signature has expired"));
        }
        let nonce = params
            .get("nonce")
            .map(|n| n.as_string().map(|s| s.as_str().to_string()))
            .map(|n| n.ok_or_else(|| unauthorized("nonce must be a string")))
            .transpose()?;
        if nonce.is_none() && self.nonce_required {
            return Err(unauthorized("signature has no nonce"));
        }
        // The signature base (RFC 9421 §2.5).
        let mut base = String::new();
        let mut covered: Vec<&str> = Vec::new();
        for item in &list.items {
            let id = serialize_item(item).ok_or_else(|| unauthorized("malformed component"))?;
            let name = item.bare_item.as_string().map_or("", |s| s.as_str());
            if covered.contains(&name) {
                return Err(unauthorized(format!("component {name:?} is covered twice")));
            }
            covered.push(name);
            let value = self.component(ctx, req, item)?;
            base.push_str(&id);
            base.push_str(": ");
            base.push_str(&value);
            base.push('\n');
        }
        for need in &self.required {
            if !covered.contains(&need.as_str()) {
                return Err(unauthorized(format!("the signature must cover {need:?}")));
            }
        }
        let params_value = {
            use sfv::FieldType;
            vec![ListEntry::InnerList(list.clone())]
                .serialize()
                .ok_or_else(|| unauthorized("malformed Signature-Input"))?
        };
        base.push_str("\"@signature-params\": ");
        base.push_str(&params_value);
        let sig = match sigs.get(label.as_str()) {
            Some(ListEntry::Item(i)) => i
                .bare_item
                .as_byte_sequence()
                .ok_or_else(|| unauthorized("signature is not a byte sequence"))?,
            _ => {
                return Err(unauthorized(format!(
                    "no Signature for label {:?}",
                    label.as_str()
                )));
            }
        };
        aws_lc_rs::hmac::verify(&cred.key, base.as_bytes(), sig)
            .map_err(|_| unauthorized("invalid signature"))?;
        // Only a valid signature may use up a nonce, or anyone could burn them.
        if let Some(n) = nonce {
            self.use_nonce(&key_id, &n, now)?;
        }
        ctx.consumer = Some(cred.consumer.clone());
        Ok(DigestCheck {
            covered: covered.contains(&"content-digest"),
        })
    }

    fn use_nonce(&self, key_id: &str, nonce: &str, now: u64) -> Result<(), GatewayError> {
        let mut seen = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{key_id} {nonce}");
        if seen.get(&key).is_some_and(|&until| until >= now) {
            return Err(unauthorized("nonce has been used already"));
        }
        if seen.len() >= self.nonce_capacity {
            seen.retain(|_, until| *until >= now);
        }
        // A nonce matters only while a signature carrying it could still be fresh.
        seen.insert(key, now + 2 * self.skew);
        Ok(())
    }
}

/// Check `Content-Digest` (RFC 9530) against the body: every sha-256 / sha-512 entry
/// must match, and at least one must be present.
fn check_digest(headers: &http::HeaderMap, body: &[u8]) -> Result<(), GatewayError> {
    let value = field_value(headers, "content-digest")?
        .ok_or_else(|| unauthorized("missing Content-Digest"))?;
    let dict: Dictionary = Parser::new(&value)
        .parse()
        .map_err(|_| unauthorized("malformed Content-Digest"))?;
    let mut checked = false;
    for (alg, entry) in &dict {
        let algorithm = match alg.as_str() {
            "sha-256" => &aws_lc_rs::digest::SHA256,
            "sha-512" => &aws_lc_rs::digest::SHA512,
            _ => continue,
        };
        let ListEntry::Item(item) = entry else {
            return Err(unauthorized("malformed Content-Digest"));
        };
        let want = item
            .bare_item
            .as_byte_sequence()
            .ok_or_else(|| unauthorized("malformed Content-Digest"))?;
        let got = aws_lc_rs::digest::digest(algorithm, body);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(got.as_ref(), want)) {
            return Err(unauthorized("Content-Digest does not match the body"));
        }
        checked = true;
    }
    if !checked {
        return Err(unauthorized(
            "Content-Digest has no sha-256 or sha-512 digest",
        ));
    }
    Ok(())
}

impl Filter for HmacAuth {
    fn name(&self) -> &'static str {
        "hmac-auth"
    }

    fn identifies(&self) -> bool {
        true
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let check = match self.verify(ctx, req) {
            Ok(c) => c,
            Err(e) => return Step::Done(Err(e)),
        };
        ctx.extensions.insert(check);
        if self.hide {
            req.headers.remove("signature");
            req.headers.remove("signature-input");
        }
        Step::Done(Ok(Flow::Continue))
    }

    fn wants_body(&self) -> bool {
        true
    }

    fn on_body(
        &self,
        ctx: &mut RequestCtx,
        req: &http::request::Parts,
        body: &Bytes,
    ) -> FilterResult {
        let covered = ctx
            .extensions
            .get::<DigestCheck>()
            .is_some_and(|c| c.covered);
        if covered {
            check_digest(&req.headers, body)?;
        } else if !body.is_empty() {
            return Err(unauthorized(
                "a request with a body must cover content-digest",
            ));
        }
        Ok(Flow::Continue)
    }
}
