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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 32];
        for (pair, b) in buf
            .chunks_exact_mut(2)
            .zip(fastrand::u128(..).to_le_bytes())
        {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
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
}
