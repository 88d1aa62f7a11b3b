//! `claimsToHeaders`: claims of a verified token (jwt) or an introspection answer
//! copied to upstream request headers.

use crate::registry::BuildError;
use http::{HeaderName, HeaderValue};
use std::collections::BTreeMap;

type Claims = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Default)]
pub(crate) struct ClaimHeaders(Vec<(String, HeaderName)>);

impl ClaimHeaders {
    /// From `{claim: header-name}`; `at` is the config path of the map.
    pub(crate) fn parse(at: &str, map: &BTreeMap<String, String>) -> Result<Self, BuildError> {
        map.iter()
            .map(|(claim, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map(|n| (claim.clone(), n))
                    .map_err(|_| {
                        BuildError::new(
                            format!("{at}.{claim}"),
                            format!("{h:?} is not a header name"),
                        )
                    })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The header names: removed from every request before they are set.
    pub(crate) fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.0.iter().map(|(_, h)| h)
    }

    /// The headers to set for these claims; claims absent or not representable are skipped.
    pub(crate) fn values(&self, claims: &Claims) -> Vec<(HeaderName, HeaderValue)> {
        self.0
            .iter()
            .filter_map(|(claim, h)| Some((h.clone(), claim_value(claims.get(claim)?)?)))
            .collect()
    }
}

/// A claim as a header value: strings as they are, numbers and booleans printed,
/// arrays of those joined with commas; objects are skipped.
fn claim_value(v: &serde_json::Value) -> Option<HeaderValue> {
    fn scalar(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    let text = match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()?
            .join(","),
        other => scalar(other)?,
    };
    HeaderValue::from_str(&text).ok()
}
