//! Active health checks and the timers of outlier detection. The counting and the
//! decisions live in `meshgate_upstream` (table-tested); this module owns the sockets
//! and the clock.
//!
//! Every `interval` (±10%, so gateways started together do not probe in step) each
//! endpoint of the Service is probed at once, on a fresh connection: an HTTP GET of
//! the path (HTTP/2 prior knowledge for `http2` and `grpc` Services, HTTP/1.1 with
//! `Connection: close` otherwise) or a TCP connect. The first round runs at start.
//! A Service called over TLS (mesh mTLS or `simple`) is probed over it too: a TCP
//! check then also completes the handshake, so an endpoint with the wrong identity
//! or an untrusted certificate fails it.

use crate::metrics::HealthStats;
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_upstream::{Cluster, Endpoint, HealthCheckConfig, Probe};
use std::sync::{Arc, Weak};
use std::time::Instant;
use tokio_util::either::Either;

/// How a Service's endpoints are spoken to.
#[derive(Debug, Clone)]
pub struct Probing {
    /// HTTP/2 prior knowledge (`http2`, `grpc`), else HTTP/1.1.
    pub h2: bool,
    /// TLS, for a Service with `tls.mode: mesh` or `simple`.
    pub tls: Option<crate::client::Secure>,
}

/// Probe `cluster`'s endpoints until the task is aborted.
pub async fn check_forever(
    cluster: Arc<Cluster>,
    cfg: Arc<HealthCheckConfig>,
    how: Probing,
    stats: HealthStats,
) {
    let how = Arc::new(how);
    loop {
        let set = cluster.endpoints();
        let mut round = tokio::task::JoinSet::new();
        for e in &set.endpoints {
            let (e, cfg, how) = (e.clone(), cfg.clone(), how.clone());
            round.spawn(async move {
                let result = probe(&e, &cfg, &how).await;
                (e, result)
            });
        }
        while let Some(joined) = round.join_next().await {
            // A probe that panicked tells nothing; the others still count.
            let Ok((e, result)) = joined else { continue };
            match &result {
                Ok(()) => stats.checks_passed.inc(),
                Err(_) => stats.checks_failed.inc(),
            };
            let why = result.as_ref().err().cloned();
            match cluster.checked(&e, result, &cfg) {
                Some(true) => {
                    tracing::info!(service = %cluster.name, endpoint = %e.addr, "endpoint passed its health checks: healthy again");
                }
                Some(false) => {
                    tracing::warn!(service = %cluster.name, endpoint = %e.addr, error = why.as_deref().unwrap_or(""), "endpoint failed its health checks: unhealthy");
                }
                None => {}
            }
        }
        stats.publish(&cluster);
        tokio::time::sleep(cfg.interval.mul_f64(0.9 + fastrand::f64() * 0.2)).await;
    }
}

/// One check of one endpoint: `Ok` when it passed, the reason otherwise.
async fn probe(e: &Endpoint, cfg: &HealthCheckConfig, how: &Probing) -> Result<(), String> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(e.addr)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &how.tls {
            Some(tls) => tls
                .handshake(tcp)
                .await
                .map_err(|err| format!("TLS: {err}"))?,
            None => Either::Left(tcp),
        };
        let Probe::Http {
            path,
            host,
            expected,
        } = &cfg.probe
        else {
            return Ok(());
        };
        let status = http_status(TokioIo::new(stream), e, path, host.as_deref(), how.h2).await?;
        if expected
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&status))
        {
            Ok(())
        } else {
            Err(format!("{path} answered {status}"))
        }
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

/// GET `path` over a fresh connection and return the status. The connection is
/// driven inside this future, so a timeout above drops it whole.
async fn http_status(
    io: TokioIo<crate::client::UpstreamIo>,
    e: &Endpoint,
    path: &str,
    host: Option<&str>,
    h2: bool,
) -> Result<u16, String> {
    let authority = host.unwrap_or(e.authority.as_str());
    let failed = |err: hyper::Error| format!("GET {path}: {err}");
    let builder = Request::get(if h2 {
        format!("http://{authority}{path}")
    } else {
        path.to_string()
    })
    .header(header::USER_AGENT, "meshgate-health-check");
    if h2 {
        let req = builder
            .body(Empty::<Bytes>::new())
            .map_err(|err| err.to_string())?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(failed)?;
        answer(send.send_request(req), conn).await.map_err(failed)
    } else {
        let req = builder
            .header(header::HOST, authority)
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|err| err.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(failed)?;
        answer(send.send_request(req), conn).await.map_err(failed)
    }
}

/// Drive the connection until the response head arrives. The connection may finish
/// first (the server answered and closed): the answer is then already delivered.
async fn answer<B>(
    response: impl Future<Output = hyper::Result<http::Response<B>>>,
    conn: impl Future,
) -> hyper::Result<u16> {
    tokio::pin!(response);
    tokio::select! {
        biased;
        r = &mut response => r.map(|r| r.status().as_u16()),
        _ = conn => response.await.map(|r| r.status().as_u16()),
    }
}

/// Return an ejected endpoint when its time is up. Holds the cluster weakly: a
/// reload that replaces it ends the wait.
pub async fn restore_at(cluster: Weak<Cluster>, until: Instant, stats: HealthStats) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
    if let Some(c) = cluster.upgrade() {
        // Let a slightly early timer not strand the endpoint.
        let now = Instant::now().max(until);
        let _ = c.restore_due(now);
        stats.publish(&c);
        tracing::info!(service = %c.name, "ejection over: endpoint back in the set");
    }
}

/// After `cluster.observe` ejected an endpoint: count it and schedule its return.
pub fn ejected(cluster: &Arc<Cluster>, endpoint: &Endpoint, until: Instant, stats: &HealthStats) {
    stats.ejections.inc();
    stats.publish(cluster);
    tracing::warn!(service = %cluster.name, endpoint = %endpoint.addr, for_ = ?until.saturating_duration_since(Instant::now()), "outlier detection ejected an endpoint");
    tokio::spawn(restore_at(Arc::downgrade(cluster), until, stats.clone()));
}
