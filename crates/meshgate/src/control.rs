//! `meshgate control`: the control plane's admin API over a store.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub struct Options {
    pub listen: SocketAddr,
    /// A file path (the embedded store) or `etcd://host:port[,host:port]`.
    pub store: String,
    pub token: String,
}

/// The admin token: `--token-file`, else `MESHGATE_ADMIN_TOKEN`.
pub fn token(file: Option<&Path>) -> Result<String, String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read --token-file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => std::env::var("MESHGATE_ADMIN_TOKEN").unwrap_or_default(),
    };
    if token.is_empty() {
        return Err(
            "an admin token is required: set MESHGATE_ADMIN_TOKEN or pass --token-file FILE".into(),
        );
    }
    Ok(token)
}

pub fn default_store(state_dir: &Path) -> PathBuf {
    state_dir.join("control.redb")
}

pub async fn serve(o: Options) -> anyhow::Result<()> {
    if o.store.starts_with("etcd://") {
        anyhow::bail!("the etcd store is not built yet in this version of meshgate");
    }
    let path = PathBuf::from(o.store.strip_prefix("file://").unwrap_or(&o.store));
    let store = meshgate_control::Embedded::open(&path)?;
    let plane = meshgate_control::Plane::new(store).await?;
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("cannot listen on {}", o.listen))?;
    tracing::info!(
        listen = %o.listen,
        store = %path.display(),
        revision = *plane.watch().borrow(),
        "control plane ready"
    );
    meshgate_control::serve(listener, plane, o.token, shutdown()).await?;
    tracing::info!("control plane stopped");
    Ok(())
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
