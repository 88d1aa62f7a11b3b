use http::HeaderValue;
use std::fmt;

/// The id that ties a request's access-log line, error body and upstream call together.
/// Kept from `x-request-id` when the client sent a sane one, generated otherwise.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

const MAX_KEPT_LEN: usize = 128;

impl RequestId {
    /// Keep a client-supplied id if it is short and made of visible ASCII; otherwise
    /// generate one, so a hostile id cannot bloat logs or inject into them.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        match value {
            Some(v)
                if !v.is_empty()
                    && v.len() <= MAX_KEPT_LEN
                    && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) =>
            {
                Self(v.clone())
            }
            _ => Self::generate(),
        }
    }

    /// A random 128-bit id, hex encoded (32 characters).
    pub fn generate() -> Self {
        let r = fastrand::u128(..);
        let mut buf = [0u8; 32];
        for (out, half) in buf.chunks_exact_mut(16).zip([r as u64, (r >> 64) as u64]) {
            // Eight nibbles at a time, one per byte. The digits come out in a different
            // order from the bits' (low nibbles first): for random bits that is
            // as random, and it spares a byte-at-a-time loop on every request.
            let low = half & 0x0f0f_0f0f_0f0f_0f0f;
            let high = (half >> 4) & 0x0f0f_0f0f_0f0f_0f0f;
            out[..8].copy_from_slice(&hex_digits(low).to_le_bytes());
            out[8..].copy_from_slice(&hex_digits(high).to_le_bytes());
        }
        // Hex digits are always a valid header value. An owned buffer makes clones
        // (request and response headers, logs) reference counts, not copies.
        Self(
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
                .unwrap_or_else(|_| HeaderValue::from_static("0")),
        )
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

/// Eight nibbles, one in each byte of `n`, as the ASCII hex digits `0-9a-f`.
fn hex_digits(n: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // 1 in each byte whose nibble is 10 or more: adding 6 carries it into bit 4.
    let letters = ((n + 6 * ONES) >> 4) & ONES;
    n + u64::from(b'0') * ONES + letters * u64::from(b'a' - b'0' - 10)
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_hostile_ones() {
        let ok = HeaderValue::from_static("abc-123");
        assert_eq!(RequestId::from_header(Some(&ok)).as_str(), "abc-123");
        let spaced = HeaderValue::from_static("a b");
        assert_eq!(RequestId::from_header(Some(&spaced)).as_str().len(), 32);
        let long = HeaderValue::from_str(&"x".repeat(200)).unwrap_or(ok);
        assert_eq!(RequestId::from_header(Some(&long)).as_str().len(), 32);
        assert_ne!(RequestId::generate(), RequestId::generate());
    }

    #[test]
    fn generated_ids_are_lowercase_hex_using_every_digit() {
        let mut seen = [false; 16];
        for _ in 0..200 {
            let id = RequestId::generate();
            assert_eq!(id.as_str().len(), 32);
            for c in id.as_str().chars() {
                let d = c.to_digit(16).unwrap_or_else(|| panic!("{c:?} in {id}"));
                assert!(!c.is_ascii_uppercase(), "{id}");
                seen[d as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }

    #[test]
    fn each_nibble_becomes_its_digit() {
        let nibbles = u64::from_le_bytes([0, 9, 10, 15, 1, 11, 5, 12]);
        assert_eq!(&hex_digits(nibbles).to_le_bytes(), b"09af1b5c");
    }
}
