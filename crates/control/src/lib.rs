//! meshgate's control plane: the config center.
//!
//! - [`store`]: the [`Store`] trait, revisions and commits; [`embedded`] keeps them
//!   in one redb file, [`etcd`] in etcd v3 for several control planes.
//! - [`plane`]: reads, writes (each validated whole by the config compiler), history,
//!   diff and rollback.
//! - [`http`]: the admin REST API under `/api/v1/`.
//! - [`openapi`]: OpenAPI 3.1 export of the published Apis, and import of drafts.
//! - [`release`]: grey releases of Apis: start, status, promote, roll back.
//! - [`push`]: the gRPC stream that sends the config to proxies; [`agent`] is the
//!   proxy's end of it.

pub mod agent;
pub mod ca;
pub mod embedded;
pub mod etcd;
pub mod guard;
pub mod http;
pub mod openapi;
pub mod plane;
pub mod push;
pub mod registry;
pub mod release;
pub mod store;
pub mod tls;

pub use embedded::Embedded;
pub use etcd::{Etcd, EtcdTls};
pub use plane::{Meta, Plane, Write, WriteError, Written};
pub use store::{Commit, Config, Store, StoreError};

/// Whether an `Authorization` header value is `Bearer TOKEN` with this token,
/// compared in constant time.
pub(crate) fn bearer_is(header: Option<&str>, token: &str) -> bool {
    let given = header.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()).into()
}

/// The bearer tokens the control plane asks for.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// For the admin API (`ctl`).
    pub admin: String,
    /// For proxies' push streams.
    pub node: String,
}

/// Serve the admin API and the push stream on `listener` until `shutdown`
/// resolves; over TLS when given a server config.
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    plane: std::sync::Arc<Plane<S>>,
    tokens: Tokens,
    ca: ca::CaOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let ca = ca::open(plane.store(), &ca)
        .await
        .map_err(std::io::Error::other)?;
    let push = push::Publisher::start(
        plane.clone(),
        tokens.node,
        std::sync::Arc::new(ca),
        stopping.clone(),
    )
    .await
    .map_err(std::io::Error::other)?;
    tokio::spawn(guard::run(push.clone(), plane.clone(), stopping.clone()));
    let app = http::router(plane, push, tokens.admin)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let stopped = |mut s: tokio::sync::watch::Receiver<bool>| async move {
        let _ = s.wait_for(|s| *s).await;
    };
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stopping))
                .await
        }
        Some(config) => {
            use axum::serve::ListenerExt as _;
            // tap_io: so the peer's address reaches handlers as ConnectInfo.
            let listener = tls::TlsListener::new(listener, config)?.tap_io(|_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped(stopping))
                .await
        }
    }
}
