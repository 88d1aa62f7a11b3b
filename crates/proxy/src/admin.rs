//! The admin listener: `GET /ready`, `GET /metrics`, `GET /config`, `POST /reload`,
//! `GET /upstreams` (SPEC §5) and `GET /usage` (metering for billing). Bind it to
//! loopback: it has no authentication.

use crate::Shared;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;

pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{v:#}\n"))
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            if shared.draining() {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                reply(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/config") => json(StatusCode::OK, &config(&shared)),
        (&Method::POST, "/reload") => match shared.reload("admin").await {
            Ok(rev) => json(
                StatusCode::OK,
                &json!({"status": "accepted", "revision": rev}),
            ),
            Err(errors) => json(
                StatusCode::BAD_REQUEST,
                &json!({"error": {"code": "invalid_config", "message": "config rejected; the previous config keeps serving", "diagnostics": errors}}),
            ),
        },
        (&Method::GET, "/upstreams") => json(StatusCode::OK, &upstreams(&shared)),
        (&Method::GET, "/usage") => {
            let query = req.uri().query().unwrap_or("").to_string();
            match tokio::task::spawn_blocking(move || crate::usage::report(&query)).await {
                Ok(Ok(v)) => json(StatusCode::OK, &v),
                Ok(Err(crate::usage::Error::Query(m))) => json(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": {"code": "invalid_request", "message": m}}),
                ),
                Ok(Err(crate::usage::Error::Store(m))) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"error": {"code": "internal_error", "message": format!("usage store: {m}")}}),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"error": {"code": "internal_error", "message": e.to_string()}}),
                ),
            }
        }
        (_, "/ready" | "/metrics" | "/config" | "/reload" | "/upstreams" | "/usage") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": {"code": "method_not_allowed", "message": "wrong method for this endpoint"}}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": {"code": "not_found", "message": "admin endpoints: /ready /metrics /config /reload /upstreams /usage"}}),
        ),
    };
    Ok(resp)
}

/// Where the config comes from: files, or `control:URL`.
fn sources(shared: &Shared) -> Vec<String> {
    match &shared.options.control {
        Some(url) => vec![format!("control:{url}")],
        None => shared
            .options
            .config
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    }
}

fn config(shared: &Shared) -> serde_json::Value {
    let active = shared.active.load();
    let last = shared.last_reload.lock().ok().and_then(|s| s.clone());
    json!({
        "revision": active.snapshot.revision,
        "loadedAt": humantime::format_rfc3339_millis(active.loaded_at).to_string(),
        "sources": sources(shared),
        "lastReload": last.map(|l| json!({
            "at": humantime::format_rfc3339_millis(l.at).to_string(),
            "ok": l.ok,
            "revision": l.revision,
            "errors": l.errors,
        })),
        "resources": active.snapshot.resources,
    })
}

fn upstreams(shared: &Shared) -> serde_json::Value {
    let active = shared.active.load();
    let services: Vec<serde_json::Value> = active
        .clusters
        .values()
        .map(|c| {
            let set = c.cluster.endpoints();
            let now = std::time::Instant::now();
            let checked = c.service.health_check.is_some();
            let detecting = c.service.outlier.is_some();
            let endpoints: Vec<serde_json::Value> = set
                .endpoints
                .iter()
                .map(|e| {
                    let h = e.health.view(now, checked, detecting);
                    json!({
                        "address": e.addr.to_string(),
                        "weight": e.weight,
                        "labels": e.labels,
                        "inFlight": e.in_flight(),
                        "health": h.state.as_str(),
                        "reason": h.reason,
                        "healthCheck": checked.then(|| json!({
                            "checks": h.checks,
                            "passedInRow": h.passed_in_row,
                            "failedInRow": h.failed_in_row,
                        })),
                        "outlier": detecting.then(|| json!({
                            "ejected": h.ejected_for.is_some(),
                            "ejectedForMs": h.ejected_for.map(|d| d.as_millis() as u64),
                            "ejections": h.ejections,
                            "consecutiveErrors": h.consecutive_errors,
                        })),
                    })
                })
                .collect();
            let pool = match &c.transport {
                crate::client::Transport::H1(pool) => pool.limits(),
                crate::client::Transport::H2(_) => None,
            };
            let breaker = c.breaker.as_ref().map(|b| {
                let (opened, refused) = b.events();
                json!({
                    "state": b.state(std::time::Instant::now()).as_str(),
                    "inFlight": b.in_flight(),
                    "opened": opened,
                    "refused": refused,
                    "connections": pool.map(|p| p.connections),
                    "pending": pool.map(|p| p.pending),
                    "pendingOverflow": pool.map(|p| p.overflowed),
                })
            });
            json!({
                "service": c.service.name,
                "protocol": format!("{:?}", c.service.protocol).to_lowercase(),
                "loadBalancer": format!("{:?}", c.cluster.policy),
                "discovery": if c.service.dns.is_some() { "dns" } else { "static" },
                "circuitBreaker": breaker,
                "retryBudget": {
                    "percent": c.budget.config().percent,
                    "minRetriesPerSecond": c.budget.config().min_per_second,
                    "windowMs": c.budget.config().window.as_millis() as u64,
                    "exhausted": c.budget.exhausted(),
                },
                "panic": set.panic(),
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({"revision": active.snapshot.revision, "services": services})
}

/// The admin listeners, reconciled with each config like the data listeners.
#[derive(Debug, Default)]
pub struct Admins {
    running: std::sync::Mutex<
        std::collections::HashMap<std::net::SocketAddr, tokio::task::JoinHandle<()>>,
    >,
}

/// Admin sockets bound for a config not yet active.
#[derive(Debug, Default)]
pub struct PreparedAdmins {
    bind: Vec<(std::net::SocketAddr, tokio::net::TcpListener)>,
    wanted: Vec<std::net::SocketAddr>,
}

impl Admins {
    /// Bind admin addresses the config adds. Nothing changes on failure.
    pub async fn prepare(
        &self,
        snapshot: &meshgate_config::Snapshot,
    ) -> Result<PreparedAdmins, String> {
        let running: Vec<std::net::SocketAddr> = self
            .running
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default();
        let mut p = PreparedAdmins::default();
        for addr in snapshot.gateways.iter().filter_map(|g| g.admin) {
            p.wanted.push(addr);
            if !running.contains(&addr) {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("admin: cannot listen on {addr}: {e}"))?;
                p.bind.push((addr, l));
            }
        }
        Ok(p)
    }

    pub fn commit(&self, shared: &Arc<Shared>, p: PreparedAdmins) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        for (addr, l) in p.bind {
            tracing::info!(%addr, "admin listening");
            running.insert(addr, tokio::spawn(serve(shared.clone(), l)));
        }
        running.retain(|addr, task| {
            let keep = p.wanted.contains(addr);
            if !keep {
                tracing::info!(%addr, "admin listener removed");
                task.abort();
            }
            keep
        });
    }

    pub fn stop_all(&self) {
        if let Ok(mut running) = self.running.lock() {
            for t in running.values() {
                t.abort();
            }
            running.clear();
        }
    }
}
