//! `meshgate control`: the control plane's admin API over a store.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub struct Options {
    pub listen: SocketAddr,
    /// A file path (the embedded store) or `etcd://host:port[,host:port][/prefix]`.
    pub store: String,
    pub tokens: meshgate_control::Tokens,
}

/// The admin token: `--token-file`, else `MESHGATE_ADMIN_TOKEN`. Without one, the
/// reason is printed for `meshgate COMMAND` and the exit code (2) returned.
pub fn token(command: &str, file: Option<&Path>) -> Result<String, std::process::ExitCode> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .map_err(|e| format!("cannot read --token-file {}: {e}", f.display())),
        None => Ok(std::env::var("MESHGATE_ADMIN_TOKEN").unwrap_or_default()),
    };
    match token {
        Ok(t) if !t.is_empty() => Ok(t),
        Ok(_) => Err(
            "an admin token is required: set MESHGATE_ADMIN_TOKEN or pass --token-file FILE".into(),
        ),
        Err(e) => Err(e),
    }
    .map_err(|e: String| {
        eprintln!("meshgate {command}: {e}");
        std::process::ExitCode::from(2)
    })
}

/// The token proxies present: `--node-token-file`, else `MESHGATE_NODE_TOKEN`, else
/// none (proxies then present the admin token).
pub fn node_token(file: Option<&Path>) -> Result<Option<String>, std::process::ExitCode> {
    match file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Err(format!("--node-token-file {} is empty", f.display())),
            Err(e) => Err(format!(
                "cannot read --node-token-file {}: {e}",
                f.display()
            )),
        },
        None => Ok(std::env::var("MESHGATE_NODE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())),
    }
    .map_err(|e| {
        eprintln!("meshgate control: {e}");
        std::process::ExitCode::from(2)
    })
}

pub fn default_store(state_dir: &Path) -> PathBuf {
    state_dir.join("control.redb")
}

pub async fn serve(o: Options) -> anyhow::Result<()> {
    if let Some(rest) = o.store.strip_prefix("etcd://") {
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{p}")),
            Some((h, _)) => (h, DEFAULT_ETCD_PREFIX.to_string()),
            None => (rest, DEFAULT_ETCD_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            anyhow::bail!(
                "--store {}: name at least one etcd member, etcd://HOST:PORT",
                o.store
            );
        }
        let store = meshgate_control::Etcd::connect(&endpoints, &prefix).await?;
        let shown = format!("etcd {} under {prefix}", endpoints.join(","));
        return serve_on(o, store, shown).await;
    }
    let path = PathBuf::from(o.store.strip_prefix("file://").unwrap_or(&o.store));
    let store = meshgate_control::Embedded::open(&path)?;
    let shown = path.display().to_string();
    serve_on(o, store, shown).await
}

/// Where in etcd the config lives unless the URL names a path.
const DEFAULT_ETCD_PREFIX: &str = "/meshgate";

async fn serve_on<S: meshgate_control::Store>(
    o: Options,
    store: S,
    shown: String,
) -> anyhow::Result<()> {
    let plane = meshgate_control::Plane::new(store).await?;
    let listener = tokio::net::TcpListener::bind(o.listen)
        .await
        .with_context(|| format!("cannot listen on {}", o.listen))?;
    tracing::info!(
        listen = %o.listen,
        store = %shown,
        revision = *plane.watch().borrow(),
        "control plane ready"
    );
    meshgate_control::serve(listener, plane, o.tokens, shutdown()).await?;
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
