use http::HeaderMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

/// How a group of endpoints is balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
}

/// What a ring-hash balancer hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    ClientIp,
}

impl HashOn {
    /// Parse `header:NAME`, `cookie:NAME` or `ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", n)) => http::HeaderName::from_bytes(n.as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("{n:?} is not a valid header name")),
            Some(("cookie", n)) if !n.is_empty() => Ok(Self::Cookie(n.to_string())),
            None if s == "ip" || s == "client-ip" => Ok(Self::ClientIp),
            _ => Err(format!(
                "{s:?} is not a hash key: use header:NAME, cookie:NAME or ip"
            )),
        }
    }

    /// The hash of this request's key; `None` when the request lacks it (the
    /// balancer then falls back to a random pick).
    pub fn hash(&self, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
        match self {
            Self::Header(n) => headers.get(n).map(|v| hash_bytes(v.as_bytes())),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| hash_bytes(v.as_bytes())),
            Self::ClientIp => Some(match client {
                IpAddr::V4(a) => hash_bytes(&a.octets()),
                IpAddr::V6(a) => hash_bytes(&a.octets()),
            }),
        }
    }
}

/// A stable-within-the-process 64-bit hash.
pub(crate) fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Points on a consistent-hash ring; each endpoint gets `VNODES × weight` points so
/// removing one endpoint moves only its share of keys.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ring {
    points: Vec<(u64, u32)>,
}

const VNODES: u32 = 64;

impl Ring {
    pub(crate) fn build(members: &[(String, u32)]) -> Self {
        let mut points = Vec::new();
        for (i, (key, weight)) in members.iter().enumerate() {
            for v in 0..VNODES * (*weight).max(1) {
                points.push((hash_bytes(format!("{key}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    pub(crate) fn lookup(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(h, _)| *h < hash);
        let (_, idx) = self.points[i % self.points.len()];
        Some(idx as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_moves_only_the_removed_share() {
        let members: Vec<(String, u32)> = (0..4).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
        let full = Ring::build(&members);
        let fewer = Ring::build(&members[..3]);
        let mut moved = 0;
        let mut counts = [0u32; 4];
        for k in 0..4000u64 {
            let h = hash_bytes(&k.to_le_bytes());
            let a = full.lookup(h).unwrap_or(99);
            counts[a] += 1;
            let b = fewer.lookup(h).unwrap_or(99);
            if a != 3 && a != b {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys on surviving endpoints must stay put");
        for c in counts {
            assert!((600..1400).contains(&c), "uneven ring: {counts:?}");
        }
    }

    #[test]
    fn hash_on_parses_and_extracts() {
        let mut h = HeaderMap::new();
        h.insert("x-user", http::HeaderValue::from_static("u1"));
        h.insert("cookie", http::HeaderValue::from_static("a=1; sid=abc"));
        let ip: IpAddr = [127, 0, 0, 1].into();
        let by_header = HashOn::parse("header:x-user").map(|k| k.hash(&h, ip));
        assert_eq!(by_header, Ok(Some(hash_bytes(b"u1"))));
        let by_cookie = HashOn::parse("cookie:sid").map(|k| k.hash(&h, ip));
        assert_eq!(by_cookie, Ok(Some(hash_bytes(b"abc"))));
        assert_eq!(
            HashOn::parse("cookie:none").map(|k| k.hash(&h, ip)),
            Ok(None)
        );
        assert!(HashOn::parse("ip").is_ok());
        assert!(HashOn::parse("body:x").is_err());
    }
}
