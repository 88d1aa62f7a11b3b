//! The upstream clients, one per Service: the inline HTTP/1.1 client (`h1.rs`), or
//! for HTTP/2 and gRPC hyper-util's pooled client over a connector that counts open
//! connections.

use crate::body::UpstreamBody;
use crate::h1::{ConnLimits, H1Pool};
use crate::mesh::MeshTls;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_config::{Service, SimpleTls, UpstreamProtocol, UpstreamTls};
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::either::Either;

pub type UpstreamClient = Client<CountingConnector, UpstreamBody>;

/// How a Service is called.
#[derive(Debug)]
pub enum Transport {
    H1(Arc<H1Pool>),
    H2(UpstreamClient),
}

/// How long an unused upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// TLS for a Service's connections: mesh mTLS, verifying its SPIFFE ID, or TLS to
/// an upstream outside the mesh (`mode: simple`).
#[derive(Clone)]
pub struct Secure {
    /// An error when the config could not be built (an unreadable `caFile`, say):
    /// the Service is then unreachable, never called in plaintext.
    connector: Result<tokio_rustls::TlsConnector, Arc<str>>,
    /// The name sent and verified; none: the endpoint's IP address.
    name: Option<rustls_pki_types::ServerName<'static>>,
    /// `mesh` or `upstream`, for the logs.
    kind: &'static str,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure").field("name", &self.name).finish()
    }
}

impl Secure {
    fn mesh(mesh: &Arc<MeshTls>, service: &str, alpn: &[u8]) -> Self {
        Self {
            connector: connector(mesh.client_config(service, alpn), service, "mesh"),
            name: Some(crate::mesh::server_name(service)),
            kind: "mesh",
        }
    }

    fn simple(t: &SimpleTls, service: &str, alpn: &[u8]) -> Self {
        Self {
            connector: connector(crate::tls::upstream_config(t, alpn), service, "upstream"),
            name: t.server_name.clone(),
            kind: "upstream",
        }
    }

    /// TLS over a fresh connection. A failure is logged: a peer with the wrong
    /// identity or an untrusted certificate is a security event, not noise.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<UpstreamIo> {
        let connector = self
            .connector
            .as_ref()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let peer = tcp.peer_addr()?;
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| rustls_pki_types::ServerName::IpAddress(peer.ip().into()));
        match connector.connect(name, tcp).await {
            Ok(tls) => Ok(Either::Right(Box::new(tls))),
            Err(e) => {
                let kind = self.kind;
                tracing::warn!(server = ?self.name, %peer, error = %e, "{kind} TLS handshake failed");
                Err(e)
            }
        }
    }
}

/// The connector for a client config, or the error (logged) that makes the Service
/// unreachable.
fn connector(
    config: Result<Arc<rustls::ClientConfig>, String>,
    service: &str,
    kind: &str,
) -> Result<tokio_rustls::TlsConnector, Arc<str>> {
    config.map(tokio_rustls::TlsConnector::from).map_err(|e| {
        tracing::error!(service, error = %e, "cannot build {kind} TLS");
        Arc::from(e)
    })
}

/// An upstream connection: plain (`Left`) or over TLS (`Right`).
pub type UpstreamIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The TLS a Service's connections need, if any, offering the ALPN protocol of its
/// `protocol`: its calls and its health checks speak the same.
pub fn secure(service: &Service, mesh: &Arc<MeshTls>) -> Option<Secure> {
    let alpn: &[u8] = match service.protocol {
        UpstreamProtocol::Http1 => b"http/1.1",
        UpstreamProtocol::Http2 | UpstreamProtocol::Grpc => b"h2",
    };
    match &service.tls {
        UpstreamTls::Disable => None,
        UpstreamTls::Mesh => Some(Secure::mesh(mesh, &service.name, alpn)),
        UpstreamTls::Simple(t) => Some(Secure::simple(t, &service.name, alpn)),
    }
}

pub fn build(service: &Service, connections: Gauge, mesh: &Arc<MeshTls>) -> Transport {
    if service.protocol == UpstreamProtocol::Http1 {
        let limits = service
            .circuit_breaker
            .as_ref()
            .map(|cb| ConnLimits {
                max_connections: cb.max_connections,
                max_pending: cb.max_pending,
            })
            .unwrap_or_default();
        Transport::H1(H1Pool::secured(
            service.connect_timeout,
            IDLE_TIMEOUT,
            connections,
            limits,
            secure(service, mesh),
        ))
    } else {
        Transport::H2(build_h2(service, connections, secure(service, mesh)))
    }
}

fn build_h2(service: &Service, connections: Gauge, tls: Option<Secure>) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(service.connect_timeout));
    http.enforce_http(true);
    let connector = CountingConnector {
        inner: http,
        gauge: connections,
        tls,
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
    /// TLS after the TCP connect.
    tls: Option<Secure>,
}

impl tower_service::Service<http::Uri> for CountingConnector {
    type Response = CountedIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<CountedIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let fut = self.inner.call(dst);
        let gauge = self.gauge.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = fut.await?.into_inner();
            let io = match tls {
                None => Either::Left(tcp),
                Some(tls) => tls.handshake(tcp).await?,
            };
            gauge.inc();
            Ok(CountedIo {
                io: TokioIo::new(io),
                gauge,
            })
        })
    }
}

/// An upstream connection that decrements the pool gauge when closed.
#[derive(Debug)]
pub struct CountedIo {
    io: TokioIo<UpstreamIo>,
    gauge: Gauge,
}

impl Drop for CountedIo {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Connection for CountedIo {
    fn connected(&self) -> Connected {
        match self.io.inner() {
            Either::Left(tcp) => tcp.connected(),
            Either::Right(_) => Connected::new(),
        }
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
    // A request (or any frame) sent on an HTTP/2 upstream connection expects an
    // answer: a busy-polling worker polls for it (`busy_poll`).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        crate::busy_poll::sent(Pin::new(&mut self.get_mut().io).poll_write(cx, buf))
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
        crate::busy_poll::sent(Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs))
    }
}
