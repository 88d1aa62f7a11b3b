//! The upstream clients, one per Service: the inline HTTP/1.1 client (`h1.rs`), or
//! for HTTP/2 and gRPC hyper-util's pooled client over a connector that counts open
//! connections.

use crate::body::UpstreamBody;
use crate::h1::{ConnLimits, H1Pool};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_config::{Service, UpstreamProtocol};
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

pub type UpstreamClient = Client<CountingConnector, UpstreamBody>;

/// How a Service is called.
#[derive(Debug)]
pub enum Transport {
    H1(Arc<H1Pool>),
    H2(UpstreamClient),
}

/// How long an unused upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub fn build(service: &Service, connections: Gauge) -> Transport {
    if service.protocol == UpstreamProtocol::Http1 {
        let limits = service
            .circuit_breaker
            .as_ref()
            .map(|cb| ConnLimits {
                max_connections: cb.max_connections,
                max_pending: cb.max_pending,
            })
            .unwrap_or_default();
        Transport::H1(H1Pool::new(
            service.connect_timeout,
            IDLE_TIMEOUT,
            connections,
            limits,
        ))
    } else {
        Transport::H2(build_h2(service, connections))
    }
}

fn build_h2(service: &Service, connections: Gauge) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(service.connect_timeout));
    http.enforce_http(true);
    let connector = CountingConnector {
        inner: http,
        gauge: connections,
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(usize::MAX)
        // A request whose pooled connection closed under it was never seen by the
        // upstream: hyper may resend it safely.
        .retry_canceled_requests(true)
        .http2_only(true)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false);
    b.build(connector)
}

#[derive(Clone, Debug)]
pub struct CountingConnector {
    inner: HttpConnector,
    gauge: Gauge,
}

impl tower_service::Service<http::Uri> for CountingConnector {
    type Response = CountedIo;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let gauge = self.gauge.clone();
        Box::pin(async move {
            let io = fut.await?;
            gauge.inc();
            Ok(CountedIo { io, gauge })
        })
    }
}

/// An upstream connection that decrements the pool gauge when closed.
#[derive(Debug)]
pub struct CountedIo {
    io: TokioIo<TcpStream>,
    gauge: Gauge,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for CountedIo {
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

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
