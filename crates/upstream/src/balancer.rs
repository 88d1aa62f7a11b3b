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

/// What a request is hashed on: by a ring-hash balancer, or to pick the side of a
/// grey release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(http::HeaderName),
    Cookie(String),
    /// A query parameter, by its raw (undecoded) value.
    Query(String),
    ClientIp,
}

impl HashOn {
    /// Parse `header:NAME`, `cookie:NAME`, `query:NAME` or `ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("header", n)) => http::HeaderName::from_bytes(n.as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("{n:?} is not a valid header name")),
            Some(("cookie", n)) if !n.is_empty() => Ok(Self::Cookie(n.to_string())),
            Some(("query", n)) if !n.is_empty() => Ok(Self::Query(n.to_string())),
            None if s == "ip" || s == "client-ip" => Ok(Self::ClientIp),
            _ => Err(format!(
                "{s:?} is not a hash key: use header:NAME, cookie:NAME, query:NAME or ip"
            )),
        }
    }

    /// The hash of this request's key; `None` when the request lacks it (the
    /// balancer then falls back to a random pick).
    pub fn hash(&self, headers: &HeaderMap, query: Option<&str>, client: IpAddr) -> Option<u64> {
        self.hash_with(headers, query, client, hash_bytes)
    }

    /// This request's key, hashed by `f`; `None` when the request lacks it.
    pub fn hash_with(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client: IpAddr,
        f: impl FnOnce(&[u8]) -> u64,
    ) -> Option<u64> {
        match self {
            Self::Header(n) => headers.get(n).map(|v| f(v.as_bytes())),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| f(v.as_bytes())),
            Self::Query(name) => query?
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| f(v.as_bytes())),
            Self::ClientIp => Some(match client {
                IpAddr::V4(a) => f(&a.octets()),
                IpAddr::V6(a) => f(&a.octets()),
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

/// A hash that every meshgate process, of every version, computes alike: FNV-1a over
/// `salt` then `key`, finished with the SplitMix64 mixer so that the low digits are
/// evenly spread. Grey releases use it so that a key lands on the same side on
/// every proxy.
pub fn stable_hash(salt: &[u8], key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.iter().chain([0xffu8].iter()).chain(key) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
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
        let by_header = HashOn::parse("header:x-user").map(|k| k.hash(&h, None, ip));
        assert_eq!(by_header, Ok(Some(hash_bytes(b"u1"))));
        let by_cookie = HashOn::parse("cookie:sid").map(|k| k.hash(&h, None, ip));
        assert_eq!(by_cookie, Ok(Some(hash_bytes(b"abc"))));
        assert_eq!(
            HashOn::parse("cookie:none").map(|k| k.hash(&h, None, ip)),
            Ok(None)
        );
        let by_query = HashOn::parse("query:user").map(|k| k.hash(&h, Some("a=1&user=u7"), ip));
        assert_eq!(by_query, Ok(Some(hash_bytes(b"u7"))));
        assert!(HashOn::parse("ip").is_ok());
        assert!(HashOn::parse("body:x").is_err());
    }

    #[test]
    fn stable_hash_is_fixed_and_spreads() {
        // Fixed values: proxies of different versions must agree.
        assert_eq!(
            stable_hash(b"get-user", b"u1"),
            stable_hash(b"get-user", b"u1")
        );
        assert_ne!(
            stable_hash(b"get-user", b"u1"),
            stable_hash(b"other", b"u1")
        );
        assert_eq!(stable_hash(b"", b""), 0x4f2d_b50f_1240_40cd);
        let mut buckets = [0u32; 10];
        for k in 0..10_000u32 {
            let h = stable_hash(b"api", format!("user-{k}").as_bytes());
            buckets[(h % 10) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven: {buckets:?}");
        }
    }
}
