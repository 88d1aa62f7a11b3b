//! `meshgate proxy`: a data plane fed by the control plane. The agent (in
//! `meshgate-control`) holds the push stream; each revision it receives is compiled
//! here, narrowed to this proxy's Gateway and handed to the data plane, whose
//! answer becomes the ACK or NACK. The last good config is cached on disk and
//! served at start-up until the control plane answers.

use meshgate_config::{Placement, Snapshot};
use meshgate_control::agent::{Agent, Held, Identity};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A gateway: the listeners of one Gateway resource.
    #[default]
    Edge,
    /// Next to one service instance (not built yet).
    Sidecar,
}

pub struct Options {
    pub control: String,
    pub token: String,
    pub node: String,
    pub gateway: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub cache_dir: PathBuf,
    /// The CA certificates for an `https://` control plane.
    pub control_ca: Option<PathBuf>,
    pub state_dir: PathBuf,
}

/// `k=v,k=v` as a map.
pub fn labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("{p:?} is not KEY=VALUE")),
        })
        .collect()
}

/// Compile a received config for this proxy: the whole config as the control plane
/// compiled it, with the grey releases placed on this proxy's labels, then only
/// the Gateway this proxy serves.
fn compile(
    held: &Held,
    gateway: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<Snapshot, Vec<String>> {
    let sources: Vec<_> = held
        .resources
        .iter()
        .map(|(k, t)| meshgate_control::store::source(k, t))
        .collect();
    let (snapshot, diags) = meshgate_config::compile_for(&sources, Placement::Node(labels));
    let Some(mut snapshot) = snapshot else {
        return Err(diags.iter().map(ToString::to_string).collect());
    };
    let names: Vec<&str> = snapshot.gateways.iter().map(|g| g.name.as_str()).collect();
    let keep = match gateway {
        Some(g) if names.contains(&g) => g.to_string(),
        Some(g) => {
            return Err(vec![format!(
                "this proxy serves Gateway/{g} (--gateway), which the config does not have (it has: {})",
                names.join(", ")
            )]);
        }
        None if names.len() == 1 => names[0].to_string(),
        None => {
            return Err(vec![format!(
                "the config has {} Gateways ({}): pick this proxy's with --gateway",
                names.len(),
                names.join(", ")
            )]);
        }
    };
    snapshot.gateways.retain(|g| g.name == keep);
    snapshot.revision = held.revision.to_string();
    Ok(snapshot)
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let ca = match &o.control_ca {
        Some(f) => Some(
            std::fs::read(f).map_err(|e| anyhow::anyhow!("--control-ca {}: {e}", f.display()))?,
        ),
        None => None,
    };
    for url in o.control.split(',').map(str::trim) {
        match url.split_once("://") {
            Some(("http", _)) => {}
            Some(("https", _)) if ca.is_some() => {}
            Some(("https", _)) => anyhow::bail!(
                "--control {url:?}: give the CA certificates that sign the control plane's certificate with --control-ca (or MESHGATE_CONTROL_CA)"
            ),
            _ => anyhow::bail!(
                "--control {url:?}: give http://HOST:PORT or https://HOST:PORT (several, comma-separated, for replicas)"
            ),
        }
    }
    let mut good = Held::default();
    let mut first = Snapshot::default();
    match Held::load(&o.cache_dir) {
        Ok(Some(cached)) => match compile(&cached, o.gateway.as_deref(), &o.labels) {
            Ok(s) => {
                tracing::info!(revision = cached.revision, dir = %o.cache_dir.display(), "starting from the cached config");
                first = s;
                good = cached;
            }
            Err(errors) => {
                tracing::warn!(
                    ?errors,
                    "the cached config does not compile; waiting for the control plane"
                )
            }
        },
        Ok(None) => tracing::info!("no cached config; waiting for the control plane"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cached config; waiting for the control plane")
        }
    }
    let (pushes, received) = tokio::sync::mpsc::channel(1);
    let counts = Arc::new(meshgate_proxy::ReleaseCounts::default());
    let agent = Agent {
        url: o.control.clone(),
        token: o.token,
        identity: Identity {
            node: o.node,
            labels: o.labels,
            role: "edge".into(),
            gateway: o.gateway.clone().unwrap_or_default(),
        },
        cache_dir: Some(o.cache_dir),
        ca,
        report: Some(meshgate_control::agent::Reporter::new({
            let counts = counts.clone();
            move || counts.read()
        })),
    };
    let gateway = o.gateway;
    let labels = Arc::new(agent.identity.labels.clone());
    tokio::spawn(agent.run(good, move |held| {
        let pushes = pushes.clone();
        let gateway = gateway.clone();
        let labels = labels.clone();
        async move {
            let compiled =
                tokio::task::spawn_blocking(move || compile(&held, gateway.as_deref(), &labels))
                    .await
                    .map_err(|e| vec![format!("compile task failed: {e}")])?;
            let snapshot = compiled?;
            let (reply, answer) = tokio::sync::oneshot::channel();
            pushes
                .send(meshgate_proxy::Push { snapshot, reply })
                .await
                .map_err(|_| vec!["the proxy is stopping".to_string()])?;
            answer
                .await
                .map_err(|_| vec!["the proxy is stopping".to_string()])?
                .map(|_| ())
        }
    }));
    let options = meshgate_proxy::Options {
        config: Vec::new(),
        control: Some(o.control),
        state_dir: o.state_dir,
    };
    Ok(meshgate_proxy::run(options, first, Some(received), Some(counts)).await?)
}
