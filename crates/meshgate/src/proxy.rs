//! `meshgate proxy`: a data plane fed by the control plane. The agent (in
//! `meshgate-control`) holds the push stream; each revision it receives is compiled
//! here, narrowed to this proxy's Gateway and handed to the data plane, whose
//! answer becomes the ACK or NACK. The last good config is cached on disk and
//! served at start-up until the control plane answers.

use meshgate_config::sidecar::Sidecar;
use meshgate_config::{Placement, Snapshot};
use meshgate_control::agent::{Agent, Held, Identity, OnEndpoints, Registration};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A gateway: the listeners of one Gateway resource.
    #[default]
    Edge,
    /// Next to one service instance: inbound in front of the app, outbound for
    /// the app's calls to other services by name.
    Sidecar,
}

/// The flags of `--role sidecar`.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// The service this instance belongs to (sidecar).
    #[arg(long)]
    service: Option<String>,
    /// The local app, IP:PORT (sidecar).
    #[arg(long)]
    app: Option<SocketAddr>,
    /// Where other proxies reach this instance, IP:PORT; several, comma-separated,
    /// listen on each (an IPv4 and an IPv6 address, say) (sidecar).
    #[arg(long, value_delimiter = ',')]
    inbound: Vec<SocketAddr>,
    /// The address registered for this instance, when --inbound listens on all
    /// interfaces. Default: the first --inbound address (sidecar).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Where the app calls other services by name; several, comma-separated
    /// (`127.0.0.1:15001,[::1]:15001` where IPv6 traffic is intercepted) (sidecar).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:15001")]
    outbound: Vec<SocketAddr>,
    /// The admin listener (sidecar; an edge proxy takes its Gateway's).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The zone registered for this instance (sidecar).
    #[arg(long, default_value = "")]
    zone: String,
    /// The registration's lease: the instance leaves the registry this long after
    /// the control plane last heard from the proxy (sidecar).
    #[arg(long, default_value = "10s", value_parser = lease)]
    lease: Duration,
    /// The sidecar's access log: off, stdout or a file path (sidecar).
    #[arg(long, default_value = "off")]
    access_log: String,
    /// Close a relayed TCP connection (intercepted, not HTTP) after this long with no
    /// byte either way (sidecar).
    #[arg(long, default_value = "1h", value_parser = positive)]
    tcp_idle_timeout: String,
}

fn positive(s: &str) -> Result<String, String> {
    match meshgate_config::parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s}: give a duration above 0s")),
        _ => Ok(s.to_owned()),
    }
}

fn lease(s: &str) -> Result<Duration, String> {
    let d = meshgate_config::parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d) {
        return Err(format!("{s}: give a lease from 1s to 300s"));
    }
    Ok(d)
}

/// A sidecar's settings.
#[derive(Debug, Clone)]
pub struct SidecarOptions {
    pub sidecar: Sidecar,
    pub advertise: SocketAddr,
    pub zone: String,
    pub lease: Duration,
}

impl SidecarArgs {
    /// The sidecar's settings for `role`, or why the flags do not fit it.
    pub fn check(self, role: Role) -> Result<Option<SidecarOptions>, String> {
        if role == Role::Edge {
            let given = [
                ("--service", self.service.is_some()),
                ("--app", self.app.is_some()),
                ("--inbound", !self.inbound.is_empty()),
                ("--advertise", self.advertise.is_some()),
            ];
            return match given.iter().find(|(_, g)| *g) {
                Some((flag, _)) => Err(format!("{flag} is for --role sidecar")),
                None => Ok(None),
            };
        }
        let (Some(service), Some(app), Some(&first)) =
            (self.service, self.app, self.inbound.first())
        else {
            return Err(
                "--role sidecar needs --service NAME, --app IP:PORT and --inbound IP:PORT".into(),
            );
        };
        let advertise = self.advertise.unwrap_or(first);
        if advertise.ip().is_unspecified() {
            return Err(format!(
                "--inbound {first} listens on every interface: give the address other proxies reach it on with --advertise IP:PORT"
            ));
        }
        for (flag, list) in [("--inbound", &self.inbound), ("--outbound", &self.outbound)] {
            if let Some(twice) = list
                .iter()
                .enumerate()
                .find(|(i, a)| list[..*i].contains(a))
            {
                return Err(format!("{flag} names {} twice", twice.1));
            }
        }
        Ok(Some(SidecarOptions {
            sidecar: Sidecar {
                service,
                app,
                inbound: self.inbound,
                outbound: self.outbound,
                admin: Some(self.admin),
                access_log: self.access_log,
                tcp_idle_timeout: self.tcp_idle_timeout,
            },
            advertise,
            zone: self.zone,
            lease: self.lease,
        }))
    }
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
    pub sidecar: Option<SidecarOptions>,
    pub trace: Option<meshgate_proxy::trace::TraceOptions>,
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
/// the Gateway this proxy serves. A sidecar adds its inbound and outbound
/// gateways, and serves a Gateway of the config only when named (the fused mode).
fn compile(
    held: &Held,
    gateway: Option<&str>,
    labels: &BTreeMap<String, String>,
    sidecar: Option<&Sidecar>,
) -> Result<Snapshot, Vec<String>> {
    let mut sources: Vec<_> = held
        .resources
        .iter()
        .map(|(k, t)| meshgate_control::store::source(k, t))
        .collect();
    if let Some(s) = sidecar {
        let services: Vec<&str> = held
            .resources
            .keys()
            .filter_map(|k| k.strip_prefix("Service/"))
            .collect();
        sources.push(s.source(&services));
    }
    let (snapshot, diags) = meshgate_config::compile_for(&sources, Placement::Node(labels));
    let Some(mut snapshot) = snapshot else {
        return Err(diags.iter().map(ToString::to_string).collect());
    };
    let added = [
        meshgate_config::sidecar::INBOUND,
        meshgate_config::sidecar::OUTBOUND,
    ];
    let names: Vec<&str> = snapshot
        .gateways
        .iter()
        .map(|g| g.name.as_str())
        .filter(|n| sidecar.is_none() || !added.contains(n))
        .collect();
    let keep = match gateway {
        Some(g) if names.contains(&g) => Some(g.to_string()),
        Some(g) => {
            return Err(vec![format!(
                "this proxy serves Gateway/{g} (--gateway), which the config does not have (it has: {})",
                names.join(", ")
            )]);
        }
        None if sidecar.is_some() => None,
        None if names.len() == 1 => Some(names[0].to_string()),
        None => {
            return Err(vec![format!(
                "the config has {} Gateways ({}): pick this proxy's with --gateway",
                names.len(),
                names.join(", ")
            )]);
        }
    };
    snapshot.gateways.retain(|g| {
        Some(&g.name) == keep.as_ref() || (sidecar.is_some() && added.contains(&g.name.as_str()))
    });
    if let Some(s) = sidecar {
        s.place(&mut snapshot);
    }
    snapshot.revision = held.revision.to_string();
    Ok(snapshot)
}

/// The registry as the control plane pushes it, into the data plane's table.
fn follow_registry(registry: Arc<meshgate_proxy::Registry>) -> OnEndpoints {
    OnEndpoints::new(move |service, list| {
        let instances = list
            .into_iter()
            .filter_map(|r| match r.address.parse() {
                Ok(address) => Some(meshgate_proxy::Instance {
                    address,
                    labels: r.labels,
                }),
                Err(_) => {
                    tracing::warn!(service, address = %r.address, "a registered address that is not IP:PORT; skipped");
                    None
                }
            })
            .collect();
        registry.set(service, instances);
    })
}

/// At shutdown, before draining: take the instance out of the registry and wait
/// (up to [`DEREGISTER_WAIT`]) until the control plane lists it no more, so that
/// the other proxies have stopped picking it before its listeners close.
const DEREGISTER_WAIT: Duration = Duration::from_secs(2);

async fn deregister(
    leaving: tokio::sync::watch::Sender<bool>,
    registry: Arc<meshgate_proxy::Registry>,
    service: String,
    address: SocketAddr,
) {
    leaving.send_replace(true);
    let gone = registry.until(&service, move |list| {
        list.iter().all(|i| i.address != address)
    });
    match tokio::time::timeout(DEREGISTER_WAIT, gone).await {
        Ok(()) => tracing::info!(%service, %address, "deregistered"),
        Err(_) => {
            tracing::warn!(%service, %address, wait = ?DEREGISTER_WAIT, "the control plane did not confirm the deregistration; draining anyway")
        }
    }
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
    let sidecar = o.sidecar.as_ref().map(|s| &s.sidecar);
    let mut good = Held::default();
    let mut first = Snapshot::default();
    match Held::load(&o.cache_dir) {
        Ok(Some(cached)) => match compile(&cached, o.gateway.as_deref(), &o.labels, sidecar) {
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
    let registry = Arc::new(meshgate_proxy::Registry::default());
    let mesh = Arc::new(meshgate_proxy::mesh::MeshTls::default());
    let (leaving, left) = tokio::sync::watch::channel(false);
    let before_drain = o.sidecar.as_ref().map(|s| {
        let stop = deregister(
            leaving,
            registry.clone(),
            s.sidecar.service.clone(),
            s.advertise,
        );
        Box::pin(stop) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    });
    let agent = Agent {
        url: o.control.clone(),
        token: o.token,
        identity: Identity {
            node: o.node,
            labels: o.labels.clone(),
            role: if o.sidecar.is_some() {
                "sidecar"
            } else {
                "edge"
            }
            .into(),
            gateway: o.gateway.clone().unwrap_or_default(),
            instance: o.sidecar.as_ref().map(|s| Registration {
                service: s.sidecar.service.clone(),
                address: s.advertise.to_string(),
                labels: o.labels.clone(),
                zone: s.zone.clone(),
                lease: s.lease,
            }),
        },
        cache_dir: Some(o.cache_dir),
        ca,
        report: Some(meshgate_control::agent::Reporter::new({
            let counts = counts.clone();
            move || counts.read()
        })),
        endpoints: Some(follow_registry(registry.clone())),
        leaving: Some(left),
        certificate: Some(meshgate_control::agent::OnCertificate::new({
            let mesh = mesh.clone();
            move |c| {
                let id = c.spiffe_id.clone();
                let taken = mesh.set(meshgate_proxy::mesh::Material {
                    key: c.key,
                    chain: c.chain,
                    roots: c.roots,
                    spiffe_id: c.spiffe_id,
                });
                if let Err(e) = taken {
                    tracing::error!(spiffe_id = %id, error = %e, "mesh certificate refused; keeping the one held");
                }
            }
        })),
    };
    let gateway = o.gateway;
    let labels = Arc::new(agent.identity.labels.clone());
    let own = o.sidecar.map(|s| Arc::new(s.sidecar));
    tokio::spawn(agent.run(good, move |held| {
        let pushes = pushes.clone();
        let gateway = gateway.clone();
        let labels = labels.clone();
        let own = own.clone();
        async move {
            let compiled = tokio::task::spawn_blocking(move || {
                compile(&held, gateway.as_deref(), &labels, own.as_deref())
            })
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
        trace: o.trace,
    };
    let feed = meshgate_proxy::Feed {
        pushes: Some(received),
        counts: Some(counts),
        registry,
        mesh,
        before_drain,
    };
    Ok(meshgate_proxy::run(options, first, feed).await?)
}
