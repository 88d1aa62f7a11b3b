//! Request and response bodies without boxing: an enum over what the proxy sends.

use crate::h1::H1Body;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The declared `Content-Length` of a request, when it is a plain number.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(length_value)
}

/// A `Content-Length` value as a number, if it is one.
pub fn length_value(v: &http::HeaderValue) -> Option<u64> {
    v.to_str().ok()?.parse::<u64>().ok()
}

/// A client's request body as a server hands it over: from hyper (HTTP/2), or
/// from meshgate's own HTTP/1 server.
#[derive(Debug)]
pub enum RequestBody {
    Hyper(Incoming),
    H1(crate::h1_server::Body),
    /// A request that declared no body.
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::H1(b) => b.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The client's request body as the dispatcher hands it to invoke: still streaming,
/// or already read whole because a filter needed it.
#[derive(Debug)]
pub enum Inbound {
    Stream(RequestBody),
    Buffered(Bytes),
}

/// The body sent upstream: nothing, a buffered copy (replayable for retries), or the
/// client's stream under a size limit.
#[derive(Debug)]
pub enum UpstreamBody {
    Empty,
    Full(Option<Bytes>),
    Stream(LimitedBody),
}

/// The downstream body, failing once it passes `limit` bytes. `exceeded` tells the
/// dispatcher to answer 413 rather than 502 when the upstream call then fails.
#[derive(Debug)]
pub struct LimitedBody {
    pub inner: RequestBody,
    pub remaining: u64,
    pub exceeded: Arc<AtomicBool>,
}

#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body is larger than the limit")
    }
}

impl std::error::Error for BodyTooLarge {}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(s) => {
                let frame = match Pin::new(&mut s.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(Some(Ok(f))) => f,
                };
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if n > s.remaining {
                        s.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    s.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(b) => b.is_none(),
            Self::Stream(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Stream(s) => s.inner.size_hint(),
        }
    }
}

/// Runs when a response body is finished or dropped: metrics, access log, filters'
/// `on_complete`. Receives the bytes sent and whether the body ended cleanly.
pub trait Completion: Send + Sync + 'static {
    fn complete(&mut self, bytes_sent: u64, clean: bool);
}

/// The body sent downstream: the upstream's stream, or a gateway-made buffer; with an
/// optional completion hook.
pub struct ResponseBody {
    inner: Inner,
    sent: u64,
    clean: bool,
    done: Option<Box<dyn Completion>>,
    tap: Option<Box<dyn meshgate_core::BodyTap>>,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming),
    H1(H1Body),
    Compressed(Box<crate::compress::Compressed>),
    /// Frames given one by one with no length known (tests of the servers).
    #[cfg(test)]
    Frames(std::collections::VecDeque<Bytes>),
}

impl Inner {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Compressed(b) => Pin::new(&mut **b).poll_frame(cx),
            #[cfg(test)]
            Self::Frames(f) => Poll::Ready(f.pop_front().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Upstream(b) => b.is_end_stream(),
            Self::H1(b) => b.is_end_stream(),
            Self::Compressed(b) => b.is_end_stream(),
            #[cfg(test)]
            Self::Frames(f) => f.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upstream(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
            Self::Compressed(_) => SizeHint::default(),
            #[cfg(test)]
            Self::Frames(_) => SizeHint::default(),
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a body was before compression: its frames, and the tap that wants them.
pub struct Source {
    inner: Inner,
    pub tap: Option<Box<dyn meshgate_core::BodyTap>>,
}

impl Source {
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.poll(cx)
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("sent", &self.sent)
            .finish()
    }
}

impl ResponseBody {
    fn of(inner: Inner) -> Self {
        Self {
            inner,
            sent: 0,
            clean: false,
            done: None,
            tap: None,
        }
    }

    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self::of(Inner::Full((!b.is_empty()).then_some(b)))
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn upstream(b: Incoming) -> Self {
        Self::of(Inner::Upstream(b))
    }

    pub fn h1(b: H1Body) -> Self {
        Self::of(Inner::H1(b))
    }

    #[cfg(test)]
    pub fn frames(parts: &[&'static str]) -> Self {
        Self::of(Inner::Frames(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        ))
    }

    pub fn on_complete(&mut self, c: Box<dyn Completion>) {
        self.done = Some(c);
    }

    /// Send the body compressed with `coding`. A tap already on the body keeps
    /// seeing the uncompressed bytes (what the response cache stores).
    pub fn compress(&mut self, coding: meshgate_core::Coding) {
        let inner = std::mem::replace(&mut self.inner, Inner::Full(None));
        let source = Source {
            inner,
            tap: self.tap.take(),
        };
        self.inner = Inner::Compressed(Box::new(crate::compress::Compressed::new(source, coding)));
    }

    /// Copy the body to `tap` as it is sent.
    pub fn tap(&mut self, tap: Box<dyn meshgate_core::BodyTap>) {
        if self.is_end_stream() {
            // Never polled: the whole (empty) body is already known.
            tap.end();
        } else {
            self.tap = Some(tap);
        }
    }

    fn finish(&mut self) {
        // hyper stops polling a body that reports its end, so the end may show only
        // through `is_end_stream`.
        let clean = self.clean || self.is_end_stream();
        if let Some(t) = self.tap.take()
            && clean
        {
            t.end();
        }
        if let Some(mut d) = self.done.take() {
            d.complete(self.sent, clean);
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let out = this.inner.poll(cx);
        match &out {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.sent += d.len() as u64;
                    if let Some(t) = &mut this.tap
                        && !t.data(d)
                    {
                        this.tap = None;
                    }
                } else {
                    this.tap = None;
                }
            }
            Poll::Ready(None) => {
                this.clean = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
