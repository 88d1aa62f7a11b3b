//! Transparent interception: connections that iptables REDIRECT rules (`meshgate
//! mesh iptables`) sent to a sidecar's outbound listener. The kernel keeps where
//! each was going (`SO_ORIGINAL_DST`). HTTP is served as any request on that
//! listener: a `Host` naming a Service goes to it, any other goes on to the
//! original destination (the `meshgate.passthrough` Service). Anything else (TLS,
//! database protocols) is relayed to the original destination as bytes.

use crate::pipe::{Ended, pipe};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Where `stream` was going before a REDIRECT rule sent it here; `None` when it
/// was sent here directly (the kernel then answers the local address, or nothing
/// when connection tracking is off).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    let dst = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let dst = dst.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}

/// What a redirected connection speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1 request line or the HTTP/2 preface (`PRI * HTTP/2.0`).
    Http,
    /// Anything else, or nothing yet: relayed as bytes.
    Other,
}

/// How long a redirected connection may stay silent before it is taken for a
/// protocol where the server speaks first (SMTP, MySQL) and relayed. A slow HTTP
/// client taken so still reaches its destination, without the mesh's features.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(300);

/// The longest method name looked for; a longer first word is not HTTP.
const MAX_METHOD: usize = 16;

/// `Some` once `first` tells: a method token (capital letters, `-`, `_`; at least
/// three) then a space is HTTP; any other byte before the space is not.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    for (i, &b) in first.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i >= 3 => return Some(Protocol::Http),
            _ => return Some(Protocol::Other),
        }
    }
    None
}

/// Peek at the first bytes of `stream` (they stay for whoever serves it).
pub async fn sniff(stream: &TcpStream) -> Protocol {
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut buf = [0u8; MAX_METHOD + 1];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            // Closed, failed or silent: relaying it is what the app asked for.
            _ => return Protocol::Other,
        };
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        // Part of a first word: a peek returns at once while those bytes wait, so
        // pause before looking again.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2)))
            .await
            .is_err()
        {
            return Protocol::Other;
        }
    }
}

/// Relay `downstream` to `to` both ways until either side closes, or until no
/// byte has gone either way for `idle`.
pub async fn relay(
    downstream: TcpStream,
    to: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
) -> Ended {
    let upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%to, error = %e, "passthrough connect failed");
            return Ended::Closed;
        }
        Err(_) => {
            tracing::debug!(%to, "passthrough connect timed out");
            return Ended::Closed;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut down = downstream;
    let mut up = upstream;
    let ended = pipe(&mut down, &mut up, idle).await;
    if ended == Ended::Idle {
        tracing::debug!(%to, ?idle, "passthrough idle; closing");
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_the_h2_preface_are_http() {
        for first in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST ",
            b"PRI * HTTP/2.0",
            b"M-SEARCH * HTTP/1.1",
        ] {
            assert_eq!(classify(first), Some(Protocol::Http), "{first:?}");
        }
    }

    #[test]
    fn other_protocols_are_told_apart_from_their_first_byte_or_word() {
        for first in [
            &b"\x16\x03\x01\x02\x00"[..], // a TLS ClientHello
            b"*1\r\n$4\r\nPING\r\n",      // Redis
            b"PING\r\n",                  // Redis inline
            b"get / HTTP/1.1",            // methods are case-sensitive
            b"GE T",                      // too short a word
            b"ABCDEFGHIJKLMNOPQ ",        // too long a word
        ] {
            assert_eq!(classify(first), Some(Protocol::Other), "{first:?}");
        }
        assert_eq!(classify(b"GE"), None, "undecided until the space");
        assert_eq!(classify(b""), None);
    }
}
