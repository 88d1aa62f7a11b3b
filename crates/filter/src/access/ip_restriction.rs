//! `ip-restriction`: allow or deny by the client's address, in CIDR blocks.
//!
//! The client is the socket peer, unless the peer is a trusted proxy: then
//! `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first
//! address that is not one is the client (nginx's `real_ip_recursive`). Addresses a
//! client wrote into the header itself are never believed, because the walk stops at
//! the first hop the gateway cannot vouch for.

use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use http::HeaderMap;
use ipnet::IpNet;
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;
use std::net::IpAddr;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

#[derive(Debug)]
pub struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    trusted: Vec<IpNet>,
}

/// Parse CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) or bare addresses (one host).
pub(crate) fn parse_blocks(field: &str, items: &[String]) -> Result<Vec<IpNet>, BuildError> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    BuildError::new(
                        format!("config.{field}.{i}"),
                        format!("{s:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

fn within(blocks: &[IpNet], ip: IpAddr) -> bool {
    blocks.iter().any(|b| b.contains(&ip))
}

/// The client address behind any trusted proxies.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !within(trusted, client) {
        return client;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip.to_canonical();
        if !within(trusted, client) {
            break;
        }
    }
    client
}

impl IpRestriction {
    pub fn from_config(value: &serde_json::Value) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        super::allow_or_deny(&cfg.allow, &cfg.deny)?;
        Ok(Self {
            allow: parse_blocks("allow", &cfg.allow)?,
            deny: parse_blocks("deny", &cfg.deny)?,
            trusted: parse_blocks("trustedProxies", &cfg.trusted_proxies)?,
        })
    }

    /// Deny wins over allow; with an allow list, anything outside it is denied.
    fn permits(&self, ip: IpAddr) -> bool {
        !within(&self.deny, ip) && (self.allow.is_empty() || within(&self.allow, ip))
    }
}

impl Filter for IpRestriction {
    fn name(&self) -> &'static str {
        "ip-restriction"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let ip = client_ip(ctx.client_addr.ip(), &req.headers, &self.trusted);
        if self.permits(ip) {
            Step::Done(Ok(Flow::Continue))
        } else {
            Step::Done(Err(GatewayError::new(
                ErrorCode::Forbidden,
                "your address is not allowed to call this API",
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(items: &[&str]) -> Vec<IpNet> {
        let owned: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        parse_blocks("x", &owned).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn xff(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_through_trusted_proxies() {
        let trusted = blocks(&["127.0.0.1", "10.1.0.0/16"]);
        let peer = IpAddr::from([127, 0, 0, 1]);
        let cases: &[(&str, &[&str], &str)] = &[
            // Untrusted peer: the header is ignored.
            ("192.0.2.9", &["10.0.0.1"], "192.0.2.9"),
            // Trusted peer, one hop: the hop is the client.
            ("127.0.0.1", &["203.0.113.5"], "203.0.113.5"),
            // A client-forged left part is not believed past the first untrusted hop.
            ("127.0.0.1", &["10.0.0.1, 203.0.113.5"], "203.0.113.5"),
            // Trusted hops are skipped, across several header lines.
            ("127.0.0.1", &["203.0.113.5", "10.1.2.3"], "203.0.113.5"),
            // All trusted: the leftmost is the client.
            ("127.0.0.1", &["10.1.0.7, 10.1.2.3"], "10.1.0.7"),
            // Garbage ends the walk at the last address vouched for.
            ("127.0.0.1", &["203.0.113.5, nonsense"], "127.0.0.1"),
            // No header at all.
            ("127.0.0.1", &[], "127.0.0.1"),
            // IPv4-mapped IPv6 peers compare as IPv4.
            ("::ffff:127.0.0.1", &["2001:db8::1"], "2001:db8::1"),
        ];
        for (peer_s, hdrs, want) in cases {
            let p = ip(peer_s);
            let got = client_ip(p, &xff(hdrs), &trusted);
            assert_eq!(got.to_string(), *want, "peer {peer_s} xff {hdrs:?}");
        }
        assert_eq!(client_ip(peer, &xff(&["203.0.113.5"]), &[]), peer);
    }

    #[test]
    fn deny_wins_and_allow_is_exclusive() {
        let f = IpRestriction::from_config(&serde_json::json!({
            "allow": ["10.0.0.0/8", "2001:db8::/32"],
            "deny": ["10.9.0.0/16"],
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        for (addr, ok) in [
            ("10.1.2.3", true),
            ("10.9.1.1", false),
            ("11.0.0.1", false),
            ("2001:db8::5", true),
            ("2001:db9::5", false),
        ] {
            assert_eq!(f.permits(ip(addr)), ok, "{addr}");
        }
    }

    #[test]
    fn bad_config_names_the_entry() {
        let err = |v| {
            IpRestriction::from_config(&v)
                .err()
                .unwrap_or_else(|| panic!("accepted {v}"))
        };
        let e = err(serde_json::json!({"allow": ["10.0.0.0/8", "10.0.0/33"]}));
        assert_eq!(e.path, "config.allow.1");
        let e = err(serde_json::json!({}));
        assert!(e.message.contains("at least one"), "{e}");
    }
}
