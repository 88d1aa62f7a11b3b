//! `compress`: gzip, brotli or zstd response bodies, chosen by the client's
//! `Accept-Encoding` (RFC 9110 §12.5.3, q-values honoured) and the order of
//! `encodings`.
//!
//! The filter decides and sets the headers; the proxy compresses the body as it
//! streams. A response is left alone when it is already encoded, too small, of a type
//! not listed (images, archives and other compressed formats are never compressed,
//! even under a wildcard), partial (206), bodiless (204, 304, HEAD), marked
//! `Cache-Control: no-transform`, or gRPC.

use crate::registry::BuildError;
use crate::{Flow, Step};
use http::{HeaderValue, Method, StatusCode, header};
use meshgate_core::{Coding, CompressWith, RequestCtx};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    encodings: Option<Vec<String>>,
    #[serde(default = "default_min_length")]
    min_length: u64,
    #[serde(default)]
    types: Option<Vec<String>>,
}

fn default_min_length() -> u64 {
    1024
}

/// Compressible by default (Envoy's compressor list, plus problem+json).
const DEFAULT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "text/xml",
    "text/javascript",
    "application/javascript",
    "application/json",
    "application/problem+json",
    "application/xml",
    "application/xhtml+xml",
    "image/svg+xml",
];

/// Already compressed: never compressed again, whatever `types` says.
const COMPRESSED_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "video/",
    "audio/",
    "font/woff",
    "font/woff2",
    "application/zip",
    "application/gzip",
    "application/x-gzip",
    "application/zstd",
    "application/x-bzip2",
    "application/x-7z-compressed",
    "application/x-rar-compressed",
    "application/pdf",
    "application/octet-stream",
    "application/grpc",
];

#[derive(Debug)]
pub struct Compress {
    /// Server preference, breaking ties between equal q-values.
    codings: Vec<Coding>,
    min_length: u64,
    /// Exact types, and `type/*` prefixes (kept with the slash).
    types: Vec<String>,
}

/// What this request negotiated (no coding: the client accepts none of ours), for
/// its response phase. Absent for requests the filter leaves alone (HEAD, gRPC).
#[derive(Debug, Clone, Copy)]
struct Chosen(Option<Coding>);

impl Compress {
    pub fn from_config(value: &serde_json::Value) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        let codings = match &cfg.encodings {
            None => Coding::ALL.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(BuildError::new(
                    "config.encodings",
                    "name at least one encoding",
                ));
            }
            Some(list) => {
                let mut out = Vec::new();
                for (i, name) in list.iter().enumerate() {
                    let c = Coding::ALL
                        .into_iter()
                        .find(|c| c.token() == name)
                        .ok_or_else(|| {
                            BuildError::new(
                                format!("config.encodings.{i}"),
                                format!("unknown encoding {name:?} (use zstd, br or gzip)"),
                            )
                        })?;
                    if out.contains(&c) {
                        return Err(BuildError::new(
                            format!("config.encodings.{i}"),
                            format!("{name:?} is listed twice"),
                        ));
                    }
                    out.push(c);
                }
                out
            }
        };
        let types = match &cfg.types {
            None => DEFAULT_TYPES.iter().map(|t| t.to_string()).collect(),
            Some(list) => {
                for (i, t) in list.iter().enumerate() {
                    let ok = t == "*"
                        || t.split_once('/').is_some_and(|(a, b)| {
                            !a.is_empty()
                                && !b.is_empty()
                                && !a.contains('*')
                                && (b == "*" || !b.contains('*'))
                        });
                    if !ok {
                        return Err(BuildError::new(
                            format!("config.types.{i}"),
                            format!("{t:?} is not a media type (type/subtype, type/* or *)"),
                        ));
                    }
                }
                list.iter()
                    .map(|t| t.trim_end_matches('*').to_ascii_lowercase())
                    .collect()
            }
        };
        Ok(Self {
            codings,
            min_length: cfg.min_length,
            types,
        })
    }

    /// The best coding the client accepts, by q-value then by `encodings` order.
    fn negotiate(&self, accept: &str) -> Option<Coding> {
        let mut best: Option<(u16, usize, Coding)> = None;
        let listed = |token: &str| accept_q(accept, token);
        let star = listed("*");
        for (rank, &c) in self.codings.iter().enumerate() {
            let q = listed(c.token()).or(star).unwrap_or(0);
            if q == 0 {
                continue;
            }
            if best.is_none_or(|(bq, br, _)| q > bq || (q == bq && rank < br)) {
                best = Some((q, rank, c));
            }
        }
        best.map(|(_, _, c)| c)
    }

    fn compressible_type(&self, content_type: &str) -> bool {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence.is_empty() || COMPRESSED_TYPES.iter().any(|t| essence.starts_with(t)) {
            return false;
        }
        self.types.iter().any(|t| {
            if t.is_empty() {
                true // "*"
            } else if t.ends_with('/') {
                essence.starts_with(t.as_str())
            } else {
                essence == *t
            }
        })
    }
}

/// The q-value (in thousandths) `accept` gives `token`, if it names it.
fn accept_q(accept: &str, token: &str) -> Option<u16> {
    accept.split(',').find_map(|item| {
        let mut parts = item.split(';');
        let name = parts.next()?.trim();
        if !name.eq_ignore_ascii_case(token) {
            return None;
        }
        parts
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .map_or(Some(1000), parse_q)
    })
}

/// `1`, `0.8`, `0.125` → thousandths; anything else is not a q-value.
fn parse_q(s: &str) -> Option<u16> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u16 = match int {
        "0" => 0,
        "1" if frac.bytes().all(|b| b == b'0') => return Some(1000),
        _ => return None,
    };
    let mut milli = 0u16;
    for (i, b) in frac.bytes().enumerate() {
        milli += u16::from(b - b'0') * [100, 10, 1][i];
    }
    Some(whole + milli)
}

impl crate::Filter for Compress {
    fn name(&self) -> &'static str {
        "compress"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        if ctx.grpc || req.method == Method::HEAD {
            return Step::Done(Ok(Flow::Continue));
        }
        let values = req.headers.get_all(header::ACCEPT_ENCODING);
        let text = |v: &HeaderValue| v.to_str().unwrap_or("").to_string();
        // One header (the usual case) is read in place; several are one list.
        let accept: std::borrow::Cow<'_, str> = match values.iter().nth(1) {
            None => values
                .iter()
                .next()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .into(),
            Some(_) => values.iter().map(text).collect::<Vec<_>>().join(",").into(),
        };
        ctx.extensions.insert(Chosen(self.negotiate(&accept)));
        Step::Done(Ok(Flow::Continue))
    }

    fn on_response(&self, ctx: &RequestCtx, resp: &mut http::response::Parts) {
        let Some(Chosen(coding)) = ctx.extensions.get::<Chosen>().copied() else {
            return;
        };
        let h = &resp.headers;
        let status_ok = !(resp.status.is_informational()
            || resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED
            || resp.status == StatusCode::PARTIAL_CONTENT);
        let encoded = h
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let no_transform = h
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
        let small = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n < self.min_length);
        let typed = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| self.compressible_type(t));
        let ranged = h.contains_key(header::CONTENT_RANGE);
        if !typed {
            return;
        }
        add_vary(&mut resp.headers);
        let Some(coding) = coding else { return };
        if !status_ok || encoded || no_transform || small || ranged {
            return;
        }
        let h = &mut resp.headers;
        h.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(coding.token()),
        );
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::ACCEPT_RANGES);
        // The compressed bytes differ from what a strong validator named.
        if let Some(etag) = h.get(header::ETAG)
            && !etag.as_bytes().starts_with(b"W/")
        {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                h.insert(header::ETAG, v);
            }
        }
        resp.extensions.insert(CompressWith(coding));
    }
}

/// `Vary: Accept-Encoding`, once: the representation depends on it.
fn add_vary(h: &mut http::HeaderMap) {
    let present = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| {
            let n = n.trim();
            n == "*" || n.eq_ignore_ascii_case("accept-encoding")
        });
    if !present {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(config: serde_json::Value) -> Compress {
        Compress::from_config(&config).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn negotiation_follows_q_values_then_server_order() {
        let f = filter(serde_json::json!({}));
        let cases = [
            ("gzip", Some(Coding::Gzip)),
            ("gzip, br", Some(Coding::Brotli)),
            ("gzip, br, zstd", Some(Coding::Zstd)),
            ("br;q=0.5, gzip", Some(Coding::Gzip)),
            ("br;q=0.5, gzip;q=0.4", Some(Coding::Brotli)),
            ("GZIP;Q=1.0", Some(Coding::Gzip)),
            ("*", Some(Coding::Zstd)),
            ("*, zstd;q=0", Some(Coding::Brotli)),
            ("gzip;q=0", None),
            ("identity", None),
            ("", None),
            ("deflate, compress", None),
            ("gzip;q=2", None),
            ("gzip;q=0.0001", None),
            ("br;q=0.001", Some(Coding::Brotli)),
        ];
        for (accept, want) in cases {
            assert_eq!(f.negotiate(accept), want, "{accept:?}");
        }
        let gzip_first = filter(serde_json::json!({"encodings": ["gzip", "br"]}));
        assert_eq!(gzip_first.negotiate("br, gzip, zstd"), Some(Coding::Gzip));
        assert_eq!(gzip_first.negotiate("zstd"), None);
    }

    #[test]
    fn only_listed_uncompressed_types_are_compressible() {
        let f = filter(serde_json::json!({}));
        assert!(f.compressible_type("application/json; charset=utf-8"));
        assert!(f.compressible_type("Text/HTML"));
        assert!(!f.compressible_type("image/png"));
        assert!(!f.compressible_type("text/event-stream"));
        assert!(!f.compressible_type(""));
        let wide = filter(serde_json::json!({"types": ["text/*", "*"]}));
        assert!(wide.compressible_type("text/event-stream"));
        assert!(wide.compressible_type("application/x-custom"));
        // A wildcard never reaches formats that are compressed already.
        assert!(!wide.compressible_type("image/jpeg"));
        assert!(!wide.compressible_type("application/zip"));
    }

    /// The response head after the request and response phases.
    fn run(
        method: Method,
        accept: &str,
        status: u16,
        headers: &[(&str, &str)],
    ) -> http::response::Parts {
        use crate::Filter;
        let f = filter(serde_json::json!({"minLength": 10}));
        let mut ctx = RequestCtx::new(
            meshgate_core::RequestId::generate(),
            ([127, 0, 0, 1], 1).into(),
            "http",
        );
        let mut req = http::Request::builder()
            .method(method)
            .header(header::ACCEPT_ENCODING, accept)
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts()
            .0;
        let _ = f.on_request(&mut ctx, &mut req);
        let mut resp = http::Response::builder().status(status);
        for (k, v) in headers {
            resp = resp.header(*k, *v);
        }
        let mut parts = resp
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts()
            .0;
        f.on_response(&ctx, &mut parts);
        parts
    }

    #[test]
    fn responses_are_compressed_only_when_every_condition_holds() {
        let json = ("content-type", "application/json");
        let compressed = |p: &http::response::Parts| p.extensions.get::<CompressWith>().copied();
        let yes = run(Method::GET, "gzip", 200, &[json, ("content-length", "100")]);
        assert_eq!(compressed(&yes), Some(CompressWith(Coding::Gzip)));
        assert_eq!(yes.headers[header::CONTENT_ENCODING], "gzip");
        assert!(!yes.headers.contains_key(header::CONTENT_LENGTH));
        type Case<'a> = (Method, &'a str, u16, &'a [(&'a str, &'a str)]);
        let cases: [Case<'_>; 6] = [
            (Method::HEAD, "gzip", 200, &[json]),
            (Method::GET, "gzip", 204, &[json]),
            (Method::GET, "gzip", 304, &[json]),
            (Method::GET, "gzip", 206, &[json]),
            (Method::GET, "gzip", 200, &[json, ("content-length", "9")]),
            (Method::GET, "identity", 200, &[json]),
        ];
        for (method, accept, status, headers) in cases {
            let p = run(method.clone(), accept, status, headers);
            assert_eq!(
                compressed(&p),
                None,
                "{method} {accept} {status} {headers:?}"
            );
            assert!(!p.headers.contains_key(header::CONTENT_ENCODING));
        }
        // HEAD is left entirely alone; a GET that is not compressed still varies.
        assert!(
            !run(Method::HEAD, "gzip", 200, &[json])
                .headers
                .contains_key(header::VARY)
        );
        assert_eq!(
            run(Method::GET, "identity", 200, &[json]).headers[header::VARY],
            "accept-encoding"
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (
                serde_json::json!({"encodings": ["deflate"]}),
                "config.encodings.0",
                "unknown encoding",
            ),
            (
                serde_json::json!({"encodings": ["gzip", "gzip"]}),
                "config.encodings.1",
                "twice",
            ),
            (
                serde_json::json!({"encodings": []}),
                "config.encodings",
                "at least one",
            ),
            (
                serde_json::json!({"types": ["json"]}),
                "config.types.0",
                "not a media type",
            ),
            (
                serde_json::json!({"types": ["*/json"]}),
                "config.types.0",
                "not a media type",
            ),
        ];
        for (config, path, message) in cases {
            let Err(e) = Compress::from_config(&config) else {
                panic!("{config} was accepted");
            };
            assert_eq!(e.path, path, "{config}");
            assert!(e.message.contains(message), "{config}: {}", e.message);
        }
    }
}
