//! Bytes relayed both ways between two connections, with an idle timeout: an
//! intercepted connection that is not HTTP (`transparent`), and a connection that
//! switched protocols (a WebSocket, `h1_server`).

use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Either side closed, or failed, or the destination never answered.
    Closed,
    /// No byte went either way for the idle timeout; both sides were closed.
    Idle,
}

/// Copy `a` to `b` and `b` to `a` until either side closes (the other is shut down
/// for writing when its peer's reads end), or until no byte has gone either way
/// for `idle`.
pub async fn pipe<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_read = AtomicU64::new(0);
    let mut a = Watched {
        io: a,
        start,
        last_read: &last_read,
    };
    let mut b = Watched {
        io: b,
        start,
        last_read: &last_read,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "relay ended with an error");
                }
                return Ended::Closed;
            }
            () = tokio::time::sleep_until(deadline) => {
                deadline = start + Duration::from_millis(last_read.load(Ordering::Relaxed)) + idle;
                if deadline <= Instant::now() {
                    return Ended::Idle;
                }
            }
        }
    }
}

/// A relayed connection that notes when it last read a byte (ms after `start`).
/// Every byte relayed is read from one of the two sides, so reads alone tell
/// activity.
struct Watched<'a, T> {
    io: &'a mut T,
    start: Instant,
    last_read: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last_read.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// A connection whose first bytes were already read: they are read again first.
pub struct Prefixed<T> {
    read: Bytes,
    io: T,
}

impl<T> Prefixed<T> {
    pub fn new(read: Bytes, io: T) -> Self {
        Self { read, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
