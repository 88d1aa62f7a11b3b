//! Listeners and connections: accept, optional TLS, meshgate's HTTP/1.1 server
//! (`h1_server`) or hyper's HTTP/2 server, idle timeout and graceful drain per
//! connection.

use crate::Shared;
use crate::dispatch::{self, ConnInfo};
use crate::guard::{GuardLimits, RejectSink, Rejection};
use crate::h1_server::{self, Stream};
use crate::metrics::ReasonLabels;
use crate::state::Active;
use crate::transparent::Protocol;
use arc_swap::ArcSwapOption;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use meshgate_config::{Limits, ListenerProtocol};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a listener is: a change of protocol keeps the socket (see [`Listeners::commit`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    gateway: String,
    address: SocketAddr,
    /// A sidecar's outbound listener: connections may have been redirected to it.
    transparent: bool,
}

/// How a listener takes TLS.
#[derive(Debug)]
struct ListenerTls {
    config: Arc<rustls::ServerConfig>,
    /// A permissive mesh listener: a client that does not start with a TLS
    /// handshake is served in plaintext.
    plaintext_too: bool,
}

/// What a connection is served under: a change closes the open connections.
type Terms = (ListenerProtocol, bool);

#[derive(Debug)]
struct Running {
    /// Stops the accept loop.
    stop: watch::Sender<bool>,
    tls: Arc<ArcSwapOption<ListenerTls>>,
    terms: Terms,
    /// Closes the open connections (after their in-flight requests): each
    /// connection subscribes when accepted.
    close: Arc<watch::Sender<()>>,
}

impl Running {
    fn close_connections(&self) {
        self.close.send_replace(());
    }
}

/// The listeners currently serving, reconciled with each new config.
#[derive(Debug, Default)]
pub struct Listeners {
    running: Mutex<HashMap<Key, Running>>,
}

/// Sockets bound and TLS configs built for a config not yet active.
#[derive(Debug, Default)]
pub struct Prepared {
    bind: Vec<(Key, TcpListener, Terms, Option<Arc<ListenerTls>>)>,
    tls: Vec<(Key, Terms, Option<Arc<ListenerTls>>)>,
    keep: Vec<Key>,
}

impl Listeners {
    /// Bind new listeners and build TLS configs. Nothing changes on failure.
    pub async fn prepare(
        &self,
        active: &Active,
        mesh: &Arc<crate::mesh::MeshTls>,
    ) -> Result<Prepared, String> {
        let mut p = Prepared::default();
        let running: Vec<Key> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        for g in &active.snapshot.gateways {
            for l in &g.listeners {
                let key = Key {
                    gateway: g.name.clone(),
                    address: l.address,
                    transparent: g.side == meshgate_config::MeshSide::Outbound,
                };
                let tls = match l.protocol {
                    ListenerProtocol::Https => Some(
                        crate::tls::server_config(&l.certificates)
                            .map_err(|e| format!("listener {:?}: {e}", l.name))?,
                    ),
                    ListenerProtocol::Mesh => Some(
                        mesh.server_config()
                            .map_err(|e| format!("listener {:?}: {e}", l.name))?,
                    ),
                    _ => None,
                };
                let tls = tls.map(|config| {
                    Arc::new(ListenerTls {
                        config,
                        plaintext_too: l.plaintext_too,
                    })
                });
                let terms = (l.protocol, l.plaintext_too);
                if running.contains(&key) {
                    p.tls.push((key.clone(), terms, tls));
                    p.keep.push(key);
                } else {
                    let socket = bind(l.address).map_err(|e| {
                        format!("listener {:?}: cannot listen on {}: {e}", l.name, l.address)
                    })?;
                    p.bind.push((key, socket, terms, tls));
                }
            }
        }
        Ok(p)
    }

    /// Start new listeners, update TLS on kept ones, stop the rest.
    ///
    /// A kept listener whose protocol changed (`http` to `https`, or to `mesh` when
    /// a Service or the Mesh asks for mTLS) keeps its socket: new connections get
    /// the new protocol at once, and the open ones are closed once their in-flight
    /// requests finish, so no connection goes on under the old terms.
    pub fn commit(&self, shared: &Arc<Shared>, p: Prepared) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        for (key, terms, tls) in p.tls {
            if let Some(r) = running.get_mut(&key) {
                r.tls.store(tls);
                if r.terms != terms {
                    tracing::info!(gateway = %key.gateway, address = %key.address, from = ?r.terms, to = ?terms, "listener protocol changed: open connections close after their requests");
                    r.terms = terms;
                    r.close_connections();
                }
            }
        }
        let mut keep = p.keep;
        for (key, socket, terms, tls) in p.bind {
            let (stop, stop_rx) = watch::channel(false);
            let tls = Arc::new(ArcSwapOption::new(tls));
            let close = Arc::new(watch::channel(()).0);
            tracing::info!(gateway = %key.gateway, address = %key.address, protocol = ?terms.0, plaintext_too = terms.1, "listening");
            tokio::spawn(accept_loop(
                shared.clone(),
                key.gateway.clone().into(),
                key.transparent,
                socket,
                tls.clone(),
                close.clone(),
                stop_rx,
            ));
            keep.push(key.clone());
            let r = Running {
                stop,
                tls,
                terms,
                close,
            };
            running.insert(key, r);
        }
        running.retain(|k, r| {
            let stays = keep.contains(k);
            if !stays {
                tracing::info!(gateway = %k.gateway, address = %k.address, "listener removed");
                let _ = r.stop.send(true);
                r.close_connections();
            }
            stays
        });
    }

    /// Stop accepting everywhere (drain).
    pub fn stop_all(&self) {
        if let Ok(mut running) = self.running.lock() {
            for r in running.values() {
                let _ = r.stop.send(true);
                r.close_connections();
            }
            running.clear();
        }
    }
}

/// A listening socket with a deep accept queue (4096): a burst of connections
/// (a fleet of proxies reconnecting at once) waits in it rather than being dropped.
/// An IPv6 address takes IPv6 only (as nginx's and Envoy's do), so `[::]:P` and
/// `0.0.0.0:P` can be two listeners.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    shared: Arc<Shared>,
    gateway: Arc<str>,
    transparent: bool,
    listener: TcpListener,
    tls: Arc<ArcSwapOption<ListenerTls>>,
    close: Arc<watch::Sender<()>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let gateway = gateway.clone();
        // Subscribed before the TLS config is read: a protocol change between the
        // two closes this connection too.
        let removed = close.subscribe();
        let tls = tls.load_full();
        tokio::spawn(async move {
            shared.metrics.downstream_connections.inc();
            let original = transparent
                .then(|| crate::transparent::original_destination(&stream))
                .flatten();
            match original {
                Some(to) if crate::transparent::sniff(&stream).await == Protocol::Other => {
                    shared.metrics.tcp_passthrough.inc();
                    let idle = limits_for(&shared, &gateway).tcp_idle_timeout;
                    let ended =
                        crate::transparent::relay(stream, to, PASSTHROUGH_CONNECT_TIMEOUT, idle)
                            .await;
                    if ended == crate::pipe::Ended::Idle {
                        shared.metrics.tcp_passthrough_idle.inc();
                    }
                }
                _ => {
                    let conn = Downstream {
                        stream,
                        client,
                        original,
                    };
                    serve_conn(&shared, gateway, conn, tls, removed).await;
                }
            }
            shared.metrics.downstream_connections.dec();
        });
    }
}

/// Counts refused requests and gives each an access-log line: a request the guard
/// refuses never reaches dispatch, but an SRE still wants to see it.
struct Rejections(Arc<ConnInfo>);

impl RejectSink for Rejections {
    fn rejected(&self, r: &Rejection, id: &meshgate_core::RequestId) {
        self.0
            .shared
            .metrics
            .rejected
            .get_or_create(&ReasonLabels {
                reason: r.code.as_str().into(),
            })
            .inc();
        let active = self.0.shared.active.load();
        let Some(log) = active.gateway(&self.0.gateway).and_then(|g| g.log.as_ref()) else {
            return;
        };
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "requestId": id.as_str(),
            "gateway": &*self.0.gateway,
            "api": null,
            "client": self.0.client.ip().to_string(),
            "status": r.code.status().as_u16(),
            "error": r.code.as_str(),
            "message": r.message,
            "complete": false,
        });
        log.write(line.to_string());
    }
}

fn limits_for(shared: &Shared, gateway: &str) -> Limits {
    shared
        .active
        .load()
        .gateway(gateway)
        .map(|g| g.gateway.limits)
        .unwrap_or_default()
}

/// Streams an HTTP/2 client may open and reset before the server has taken them up:
/// past this the connection is closed with GOAWAY `ENHANCE_YOUR_CALM`, so that a
/// rapid-reset flood (CVE-2023-44487) cannot make the gateway start and cancel
/// upstream work at the rate the client sends frames. h2's default, set here so that
/// the policy is ours.
const MAX_PENDING_RESET_STREAMS: usize = 20;

/// Streams the server may reset for a client's protocol errors on one connection
/// before it closes the connection (h2's default, as above).
const MAX_ERROR_RESET_STREAMS: usize = 1024;

/// hyper serves HTTP/2 only; HTTP/1.1 is `h1_server`'s.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_ERROR_RESET_STREAMS)
        .adaptive_window(true);
    b.http2_only()
}

/// Request activity on one connection, for the idle timeout.
#[derive(Debug, Default)]
pub struct Activity {
    pub in_flight: AtomicUsize,
    /// Milliseconds since the process epoch of the last request start or end.
    pub last: AtomicU64,
}

/// How long a relayed connection waits to reach its original destination.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the client's first byte starts a TLS handshake record (0x16); `None`
/// for a client that sent nothing within `wait`, or went away.
async fn starts_tls(stream: &TcpStream, wait: Duration) -> Option<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(wait, stream.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == 0x16),
        _ => None,
    }
}

/// An accepted connection, and where it was going if it was redirected here.
struct Downstream {
    stream: TcpStream,
    client: SocketAddr,
    original: Option<SocketAddr>,
}

async fn serve_conn(
    shared: &Arc<Shared>,
    gateway: Arc<str>,
    Downstream {
        stream,
        client,
        original,
    }: Downstream,
    tls: Option<Arc<ListenerTls>>,
    removed: watch::Receiver<()>,
) {
    let limits = limits_for(shared, &gateway);
    let guard_limits = GuardLimits {
        max_request_line: limits.max_request_line,
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
        header_read_timeout: limits.header_read_timeout,
    };
    let tls = match tls {
        Some(t) if t.plaintext_too => match starts_tls(&stream, limits.header_read_timeout).await {
            Some(true) => Some(t.config.clone()),
            Some(false) => {
                shared.metrics.mesh_plaintext.inc();
                None
            }
            None => return,
        },
        t => t.map(|t| t.config.clone()),
    };
    let (io, peer) = match tls {
        None => (Stream::Plain(stream), None),
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let tls_stream =
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%client, error = %e, "tls handshake failed");
                        shared.metrics.tls_handshake_failures.inc();
                        return;
                    }
                    Err(_) => return,
                };
            // A mesh client's verified identity; none on an https listener.
            let peer = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::mesh::spiffe_id(c))
                .and_then(crate::dispatch::Peer::new);
            (Stream::Tls(Box::new(tls_stream)), peer)
        }
    };
    let info = Arc::new(ConnInfo {
        shared: shared.clone(),
        gateway,
        client,
        client_ip: http::HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
        scheme: if matches!(io, Stream::Tls(_)) {
            "https"
        } else {
            "http"
        },
        activity: Activity::default(),
        peer,
        original_dst: original,
    });
    info.activity.last.store(shared.now_ms(), Ordering::Relaxed);
    let h2 = builder(&limits);
    let stream = match io {
        Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
            drive(h2, TokioIo::new(s), info, limits.idle_timeout, removed).await;
            return;
        }
        s => s,
    };
    let stop = Arc::new(StopFlag::default());
    let watcher = tokio::spawn(watch_stop(
        info.clone(),
        limits.idle_timeout,
        removed.clone(),
        stop.clone(),
    ));
    let ctx = h1_server::ConnCtx {
        info: info.clone(),
        limits: guard_limits,
        sink: Arc::new(Rejections(info.clone())),
        stop,
        tunnel_idle: limits.tcp_idle_timeout,
    };
    let outcome = h1_server::serve(stream, ctx).await;
    watcher.abort();
    if let h1_server::Outcome::Http2 { read, io } = outcome {
        let io = TokioIo::new(crate::pipe::Prefixed::new(read, io));
        drive(h2, io, info, limits.idle_timeout, removed).await;
    }
}

/// Serve one connection until it ends. It is asked to finish (GOAWAY on h2,
/// `Connection: close` on h1) on drain, when idle too long, or when a reload removes
/// its listener.
///
/// Those signals are watched by a small task of their own that raises a flag: the
/// connection's task wakes for every read and write of every request on it, and
/// checking one flag there is much cheaper than polling three signal futures.
async fn drive<IO>(
    b: auto::Builder<TokioExecutor>,
    io: IO,
    info: Arc<ConnInfo>,
    idle: Duration,
    removed: watch::Receiver<()>,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc_info = info.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        dispatch::handle(svc_info.clone(), req.map(crate::body::RequestBody::Hyper))
    });
    let conn = b.serve_connection(io, svc);
    tokio::pin!(conn);
    let stop = Arc::new(StopFlag::default());
    let watcher = tokio::spawn(watch_stop(info.clone(), idle, removed, stop.clone()));
    let stopped = std::future::poll_fn(|cx| {
        if stop.poll_raised(cx) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    let result = tokio::select! {
        biased;
        r = conn.as_mut() => r,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    watcher.abort();
    if let Err(e) = result {
        tracing::debug!(client = %info.client, error = %e, "connection ended with an error");
    }
}

/// Raised once when a connection should finish.
#[derive(Debug, Default)]
pub(crate) struct StopFlag {
    raised: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl StopFlag {
    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Whether it is raised; if not, `cx` is woken when it is.
    pub(crate) fn poll_raised(&self, cx: &std::task::Context<'_>) -> bool {
        if self.is_raised() {
            return true;
        }
        self.waker.register(cx.waker());
        self.is_raised()
    }
}

/// Raise `stop` on drain, on removal of the listener, or after `idle` with no request.
async fn watch_stop(
    info: Arc<ConnInfo>,
    idle: Duration,
    mut removed: watch::Receiver<()>,
    stop: Arc<StopFlag>,
) {
    let mut drain = info.shared.drain.subscribe();
    let tick = (idle / 4).max(Duration::from_millis(250));
    let mut interval = tokio::time::interval(tick);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = drain.changed() => break,
            _ = removed.changed() => break,
            _ = interval.tick() => {
                let a = &info.activity;
                let since = info.shared.now_ms().saturating_sub(a.last.load(Ordering::Relaxed));
                if a.in_flight.load(Ordering::Relaxed) == 0 && since >= idle.as_millis() as u64 {
                    break;
                }
            }
        }
    }
    stop.raised.store(true, Ordering::Release);
    stop.waker.wake();
}
