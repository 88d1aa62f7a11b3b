//! `meshgate control`: the control plane's admin API over a store.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub struct Options {
    pub listen: SocketAddr,
    /// A file path (the embedded store) or `etcd[s]://host:port[,host:port][/prefix]`.
    pub store: String,
    pub tokens: meshgate_control::Tokens,
    /// Serve over TLS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// For `etcds://`: the CA of etcd's certificates, and a client certificate
    /// and key (PEM files).
    pub etcd_ca: Option<PathBuf>,
    pub etcd_client: Option<(PathBuf, PathBuf)>,
    pub mesh: MeshArgs,
}

/// The mesh CA's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshArgs {
    /// The trust domain of the mesh's SPIFFE IDs (`spiffe://DOMAIN/svc/NAME`).
    #[arg(long, default_value = meshgate_control::ca::DEFAULT_TRUST_DOMAIN, value_parser = trust_domain)]
    pub trust_domain: String,
    /// How long a mesh certificate lives; proxies renew theirs at half of it.
    #[arg(long, default_value = "1h", value_parser = cert_ttl)]
    pub mesh_cert_ttl: std::time::Duration,
    /// Sign with this CA certificate (PEM) instead of the root kept in the store;
    /// needs --mesh-ca-key.
    #[arg(long, requires = "mesh_ca_key")]
    pub mesh_ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --mesh-ca-cert.
    #[arg(long, requires = "mesh_ca_cert")]
    pub mesh_ca_key: Option<PathBuf>,
}

fn trust_domain(s: &str) -> Result<String, String> {
    meshgate_control::ca::check_trust_domain(s).map(|()| s.to_string())
}

fn cert_ttl(s: &str) -> Result<std::time::Duration, String> {
    use meshgate_control::ca::{MAX_TTL, MIN_TTL};
    let d = meshgate_config::parse_duration(s)?;
    if !(MIN_TTL..=MAX_TTL).contains(&d) {
        return Err(format!("{s}: give a lifetime from {MIN_TTL:?} to 30 days"));
    }
    Ok(d)
}

impl MeshArgs {
    fn ca(&self) -> anyhow::Result<meshgate_control::ca::CaOptions> {
        let read = |flag: &str, f: &Path| {
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", f.display()))
        };
        let root = match (&self.mesh_ca_cert, &self.mesh_ca_key) {
            (Some(c), Some(k)) => Some(meshgate_control::ca::RootPem {
                cert: read("--mesh-ca-cert", c)?,
                key: read("--mesh-ca-key", k)?,
            }),
            _ => None,
        };
        Ok(meshgate_control::ca::CaOptions {
            trust_domain: self.trust_domain.clone(),
            ttl: self.mesh_cert_ttl,
            root,
        })
    }
}

/// A bearer token from `file` (given as `flag`), else from the first of `envs`
/// that is set; `None` when neither gives one.
fn find_token(file: Option<&Path>, flag: &str, envs: &[&str]) -> Result<Option<String>, String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {flag} {}: {e}", f.display()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("{flag} {} is empty", f.display()));
        }
        return Ok(Some(token.to_string()));
    }
    Ok(envs
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|t| !t.is_empty())))
}

/// `found`, or the reason there is none printed for `meshgate COMMAND` and exit
/// code 2.
fn or_exit<T>(command: &str, found: Result<T, String>) -> Result<T, std::process::ExitCode> {
    found.map_err(|e| {
        eprintln!("meshgate {command}: {e}");
        std::process::ExitCode::from(2)
    })
}

fn required(found: Result<Option<String>, String>, missing: &str) -> Result<String, String> {
    found?.ok_or_else(|| missing.to_string())
}

/// The admin token: `--token-file`, else `MESHGATE_ADMIN_TOKEN`.
pub fn token(command: &str, file: Option<&Path>) -> Result<String, std::process::ExitCode> {
    let found = find_token(file, "--token-file", &["MESHGATE_ADMIN_TOKEN"]);
    or_exit(
        command,
        required(
            found,
            "an admin token is required: set MESHGATE_ADMIN_TOKEN or pass --token-file FILE",
        ),
    )
}

/// The token proxies present: `--node-token-file`, else `MESHGATE_NODE_TOKEN`, else
/// none (proxies then present the admin token).
pub fn node_token(file: Option<&Path>) -> Result<Option<String>, std::process::ExitCode> {
    or_exit(
        "control",
        find_token(file, "--node-token-file", &["MESHGATE_NODE_TOKEN"]),
    )
}

/// The token a proxy presents: `--token-file`, else `MESHGATE_NODE_TOKEN`, else
/// `MESHGATE_ADMIN_TOKEN` (a control plane with no node token of its own takes
/// the admin token from proxies).
pub fn proxy_token(file: Option<&Path>) -> Result<String, std::process::ExitCode> {
    let found = find_token(
        file,
        "--token-file",
        &["MESHGATE_NODE_TOKEN", "MESHGATE_ADMIN_TOKEN"],
    );
    or_exit(
        "proxy",
        required(
            found,
            "a node token is required: set MESHGATE_NODE_TOKEN (or MESHGATE_ADMIN_TOKEN) or pass --token-file FILE",
        ),
    )
}

pub fn default_store(state_dir: &Path) -> PathBuf {
    state_dir.join("control.redb")
}

pub async fn serve(o: Options) -> anyhow::Result<()> {
    let etcd = o
        .store
        .strip_prefix("etcd://")
        .map(|r| ("http", r))
        .or_else(|| o.store.strip_prefix("etcds://").map(|r| ("https", r)));
    if let Some((scheme, rest)) = etcd {
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{p}")),
            Some((h, _)) => (h, DEFAULT_ETCD_PREFIX.to_string()),
            None => (rest, DEFAULT_ETCD_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            anyhow::bail!(
                "--store {}: name at least one etcd member, etcd://HOST:PORT",
                o.store
            );
        }
        let tls = etcd_tls(&o, scheme == "https")?;
        let store = meshgate_control::Etcd::connect(&endpoints, &prefix, tls).await?;
        let shown = format!("etcd {} under {prefix}", endpoints.join(","));
        return serve_on(o, store, shown).await;
    }
    let path = PathBuf::from(o.store.strip_prefix("file://").unwrap_or(&o.store));
    let store = meshgate_control::Embedded::open(&path)?;
    let shown = path.display().to_string();
    serve_on(o, store, shown).await
}

/// TLS towards etcd from `--etcd-ca` (required for `etcds://`, refused without
/// it) and `--etcd-cert`/`--etcd-key`.
fn etcd_tls(o: &Options, tls: bool) -> anyhow::Result<Option<meshgate_control::EtcdTls>> {
    let read = |flag: &str, f: &Path| {
        std::fs::read(f).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", f.display()))
    };
    match (&o.etcd_ca, tls) {
        (None, false) if o.etcd_client.is_none() => Ok(None),
        (None, true) => anyhow::bail!(
            "--store {}: give the CA of etcd's certificates with --etcd-ca",
            o.store
        ),
        (Some(_), false) | (None, false) => anyhow::bail!(
            "--etcd-ca, --etcd-cert and --etcd-key are for TLS: use --store etcds://HOST:PORT"
        ),
        (Some(ca), true) => Ok(Some(meshgate_control::EtcdTls {
            ca: read("--etcd-ca", ca)?,
            client: match &o.etcd_client {
                Some((c, k)) => Some((read("--etcd-cert", c)?, read("--etcd-key", k)?)),
                None => None,
            },
        })),
    }
}

/// Where in etcd the config lives unless the URL names a path.
const DEFAULT_ETCD_PREFIX: &str = "/meshgate";

async fn serve_on<S: meshgate_control::Store>(
    o: Options,
    store: S,
    shown: String,
) -> anyhow::Result<()> {
    let tls = match &o.tls {
        Some((cert, key)) => Some(
            meshgate_proxy::tls::server_config(&[meshgate_config::Certificate {
                cert_file: cert.clone(),
                key_file: key.clone(),
                hosts: Vec::new(),
            }])
            .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?,
        ),
        None => None,
    };
    let plane = meshgate_control::Plane::new(store).await?;
    let listener =
        meshgate_proxy::bind(o.listen).with_context(|| format!("cannot listen on {}", o.listen))?;
    tracing::info!(
        listen = %o.listen,
        tls = tls.is_some(),
        store = %shown,
        revision = *plane.watch().borrow(),
        "control plane ready"
    );
    let ca = o.mesh.ca()?;
    meshgate_control::serve(listener, tls, plane, o.tokens, ca, shutdown()).await?;
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
