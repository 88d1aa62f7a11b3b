//! meshgate's control plane: the config center.
//!
//! - [`store`]: the [`Store`] trait, revisions and commits; [`embedded`] keeps them
//!   in one redb file.
//! - [`plane`]: reads, writes (each validated whole by the config compiler), history,
//!   diff and rollback.
//! - [`http`]: the admin REST API under `/api/v1/`.

pub mod embedded;
pub mod http;
pub mod plane;
pub mod store;

pub use embedded::Embedded;
pub use plane::{Meta, Plane, Write, WriteError, Written};
pub use store::{Commit, Config, Store, StoreError};

/// Serve the admin API on `listener` until `shutdown` resolves.
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    plane: std::sync::Arc<Plane<S>>,
    token: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, http::router(plane, token))
        .with_graceful_shutdown(shutdown)
        .await
}
