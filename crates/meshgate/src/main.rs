//! The `meshgate` binary: command line, exit codes and the wiring of roles. Logic
//! that tests need lives in the library crates.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod control;
mod ctl;
mod demo;
mod heap;
mod mesh;
mod proxy;

#[derive(Parser, Debug)]
#[command(
    name = "meshgate",
    version,
    about = "One engine for the API gateway and the service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway from config files and directories (hot-reloaded).
    Run {
        /// A YAML file or a directory of them; repeat for several.
        #[arg(short = 'c', long = "config", required = true)]
        config: Vec<PathBuf>,
        /// Also start the bundled demo upstream on this address (for the quickstart).
        #[arg(long)]
        demo_upstream: Option<String>,
        /// Where quota counters and usage are kept across restarts (one gateway per
        /// directory). Default: $XDG_STATE_HOME/meshgate or ~/.local/state/meshgate.
        #[arg(long, env = "MESHGATE_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Check config files: exit 0 if valid, else print every problem and exit 1.
    Validate {
        #[arg(short = 'c', long = "config", required = true)]
        config: Vec<PathBuf>,
    },
    /// Run the control plane: the versioned config store and its admin API.
    Control {
        /// Where the admin API listens; loopback unless you choose otherwise.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: std::net::SocketAddr,
        /// A file path (the embedded store) or `etcd://HOST:PORT[,HOST:PORT][/PREFIX]`
        /// (the config then lives under PREFIX, default `/meshgate`).
        /// Default: control.redb in the state directory.
        #[arg(long)]
        store: Option<String>,
        /// Read the admin token from this file instead of MESHGATE_ADMIN_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Read the token proxies present from this file instead of
        /// MESHGATE_NODE_TOKEN. Default: proxies present the admin token.
        #[arg(long)]
        node_token_file: Option<PathBuf>,
        /// Serve the admin API and the push streams over TLS with this
        /// certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// With --store etcds://: the CA certificates (PEM) of etcd's members.
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// A client certificate (PEM) for etcd, when it asks for one.
        #[arg(long, requires = "etcd_key")]
        etcd_cert: Option<PathBuf>,
        /// The private key (PEM) of --etcd-cert.
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        #[arg(long, env = "MESHGATE_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        mesh: control::MeshArgs,
    },
    /// Run a data plane whose config the control plane pushes.
    Proxy {
        /// The control plane, `http://HOST:PORT`; replicas comma-separated (the
        /// proxy moves to the next when its stream fails).
        #[arg(long, env = "MESHGATE_CONTROL")]
        control: String,
        /// This proxy's name, unique among the control plane's proxies.
        #[arg(long)]
        node: String,
        /// The Gateway resource whose listeners this proxy serves (default: the
        /// only one).
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        role: proxy::Role,
        /// `k=v,k=v`: what releases can select this proxy by.
        #[arg(long, value_parser = proxy::labels, default_value = "")]
        labels: std::collections::BTreeMap<String, String>,
        /// Where the last good config is kept. Default: `control-cache` in the
        /// state directory.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Read the node token from this file instead of MESHGATE_NODE_TOKEN (or
        /// MESHGATE_ADMIN_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The CA certificates (PEM) that sign the control plane's certificate,
        /// for an `https://` --control.
        #[arg(long, env = "MESHGATE_CONTROL_CA")]
        control_ca: Option<PathBuf>,
        #[arg(long, env = "MESHGATE_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        sidecar: proxy::SidecarArgs,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Talk to a control plane's admin API.
    Ctl {
        #[arg(long, env = "MESHGATE_SERVER", default_value = "http://127.0.0.1:7400")]
        server: String,
        /// Read the admin token from this file instead of MESHGATE_ADMIN_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The CA certificates (PEM) that sign the control plane's certificate,
        /// for an `https://` --server.
        #[arg(long, env = "MESHGATE_CA_FILE")]
        ca_file: Option<PathBuf>,
        /// table (default), json (as the API answered) or yaml.
        #[arg(short = 'o', long, value_enum, default_value_t, global = true)]
        output: ctl::Output,
        #[command(subcommand)]
        action: ctl::Action,
    },
    /// Mesh set-up helpers.
    Mesh {
        #[command(subcommand)]
        action: MeshAction,
    },
    /// Run the small demo upstream the quickstart uses, alone.
    Demo {
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: String,
    },
}

#[derive(Subcommand, Debug)]
enum MeshAction {
    /// Print (or --apply) the iptables rules that send a workload's TCP traffic
    /// through its sidecar (transparent interception).
    Iptables(mesh::IptablesArgs),
}

fn main() -> ExitCode {
    heap::keep_top_of_heap();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Validate { config } => validate(&config),
        Command::Run {
            config,
            demo_upstream,
            state_dir,
            trace,
        } => match trace.options("meshgate") {
            Ok(trace) => run(
                config,
                demo_upstream,
                state_dir.unwrap_or_else(default_state_dir),
                trace,
            ),
            Err(code) => code,
        },
        Command::Mesh {
            action: MeshAction::Iptables(a),
        } => mesh::iptables(&a),
        Command::Demo { listen } => runtime_then(|| demo::serve(listen)),
        Command::Proxy {
            control,
            node,
            gateway,
            role,
            labels,
            cache_dir,
            token_file,
            control_ca,
            state_dir,
            sidecar,
            trace,
        } => {
            let sidecar = match sidecar.check(role) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("meshgate proxy: {e}");
                    return ExitCode::from(2);
                }
            };
            let token = match control::proxy_token(token_file.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            let cache_dir = cache_dir.unwrap_or_else(|| state_dir.join("control-cache"));
            let trace = match trace.options(
                sidecar
                    .as_ref()
                    .map(|s| s.sidecar.service.as_str())
                    .or(gateway.as_deref())
                    .unwrap_or(node.as_str()),
            ) {
                Ok(t) => t,
                Err(code) => return code,
            };
            runtime_then(move || {
                proxy::run(proxy::Options {
                    control,
                    token,
                    node,
                    gateway,
                    labels,
                    cache_dir,
                    control_ca,
                    state_dir,
                    trace,
                    sidecar,
                })
            })
        }
        Command::Control {
            listen,
            store,
            token_file,
            node_token_file,
            tls_cert,
            tls_key,
            etcd_ca,
            etcd_cert,
            etcd_key,
            state_dir,
            mesh,
        } => {
            let token = match control::token("control", token_file.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let node_token = match control::node_token(node_token_file.as_deref()) {
                Ok(t) => t.unwrap_or_else(|| token.clone()),
                Err(code) => return code,
            };
            let store = store.unwrap_or_else(|| {
                let dir = state_dir.unwrap_or_else(default_state_dir);
                control::default_store(&dir).display().to_string()
            });
            runtime_then(move || {
                control::serve(control::Options {
                    listen,
                    store,
                    tokens: meshgate_control::Tokens {
                        admin: token,
                        node: node_token,
                    },
                    tls: tls_cert.zip(tls_key),
                    etcd_ca,
                    etcd_client: etcd_cert.zip(etcd_key),
                    mesh,
                })
            })
        }
        Command::Ctl {
            server,
            token_file,
            ca_file,
            output,
            action,
        } => {
            let token = match control::token("ctl", token_file.as_deref()) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let client = match ctl::Client::new(server, token, ca_file.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("meshgate ctl: {e}");
                    return ExitCode::from(2);
                }
            };
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(client.run(action, output)),
                Err(e) => {
                    eprintln!("meshgate ctl: {e}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    let (snapshot, diags) = meshgate_config::compile_paths(paths);
    for d in &diags {
        println!("{d}");
    }
    match snapshot {
        Some(s) => {
            println!(
                "ok: {} gateway(s), {} service(s), {} api(s); revision {}",
                s.gateways.len(),
                s.services.len(),
                s.apis.len(),
                s.revision
            );
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("{} problem(s) found", diags.len());
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime_then<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    init_tracing();
    let threads = std::env::var("MESHGATE_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // One worker (like nginx's worker_processes 1): a current-thread runtime has no
    // work-stealing or cross-thread wake-ups to pay for.
    let mut busy_poll = busy_poll_budget();
    if threads > 1 && busy_poll.take().is_some() {
        tracing::warn!("MESHGATE_BUSY_POLL_US applies to one worker (MESHGATE_WORKERS=1); ignored");
    }
    let rt = if threads <= 1 {
        let mut b = tokio::runtime::Builder::new_current_thread();
        if let Some(budget) = busy_poll {
            b.on_thread_park(meshgate_proxy::busy_poll::park_hook(budget));
        }
        b.enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshgate: cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let run = async {
        if busy_poll.is_some() {
            tokio::spawn(meshgate_proxy::busy_poll::Spinner);
        }
        f().await
    };
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshgate: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// `$XDG_STATE_HOME/meshgate`, else `~/.local/state/meshgate`, else `.meshgate-state`.
fn default_state_dir() -> PathBuf {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from("XDG_STATE_HOME")
        .or_else(|| from("HOME").map(|h| h.join(".local/state")))
        .map_or_else(|| PathBuf::from(".meshgate-state"), |d| d.join("meshgate"))
}

/// Tracing flags of the data plane commands.
#[derive(Debug, Clone, clap::Args)]
struct TraceArgs {
    /// Export spans to this collector: its OTLP/HTTP traces URL
    /// (`http://HOST:4318/v1/traces`), or with `--otlp-protocol grpc` its
    /// `http://HOST:4317`; `https://` for TLS.
    #[arg(long, env = "MESHGATE_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    otlp_endpoint: Option<http::Uri>,
    /// How spans travel: OTLP over HTTP (protobuf) or over gRPC.
    #[arg(long, env = "MESHGATE_OTLP_PROTOCOL", value_enum, default_value_t = OtlpProtocol::Http, requires = "otlp_endpoint")]
    otlp_protocol: OtlpProtocol,
    /// The CA certificates (PEM) that sign an https:// collector's certificate
    /// (default: the system's).
    #[arg(long, env = "MESHGATE_OTLP_CA", requires = "otlp_endpoint")]
    otlp_ca: Option<PathBuf>,
    /// The percentage of new traces sampled (a request carrying a trace context
    /// keeps its caller's decision).
    #[arg(long, default_value_t = 100.0, value_parser = percent)]
    trace_sample: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OtlpProtocol {
    Http,
    Grpc,
}

fn otlp_endpoint(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "{s}: give an http:// or https://HOST:PORT/PATH URL (OTLP/HTTP), or http(s)://HOST:PORT (OTLP/gRPC)"
        ));
    }
    Ok(uri)
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s}: give a percentage from 0 to 100")),
    }
}

impl TraceArgs {
    /// The tracer's settings, or why the flags do not make them (exit 2).
    fn options(
        &self,
        service: &str,
    ) -> Result<Option<meshgate_proxy::trace::TraceOptions>, ExitCode> {
        let Some(endpoint) = self.otlp_endpoint.clone() else {
            return Ok(None);
        };
        let protocol = match self.otlp_protocol {
            OtlpProtocol::Http => meshgate_proxy::trace::OtlpProtocol::Http,
            OtlpProtocol::Grpc => meshgate_proxy::trace::OtlpProtocol::Grpc,
        };
        if protocol == meshgate_proxy::trace::OtlpProtocol::Grpc
            && !matches!(endpoint.path(), "" | "/")
        {
            eprintln!(
                "meshgate: --otlp-endpoint {endpoint}: an OTLP/gRPC collector is http(s)://HOST:PORT, without a path"
            );
            return Err(ExitCode::from(2));
        }
        let ca = match &self.otlp_ca {
            Some(f) => {
                let pem = std::fs::read(f)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| match reqwest::Certificate::from_pem_bundle(&pem) {
                        Ok(certs) if !certs.is_empty() => Ok(pem),
                        Ok(_) => Err("no PEM certificate in it".to_string()),
                        Err(e) => Err(e.to_string()),
                    })
                    .map_err(|e| {
                        eprintln!("meshgate: --otlp-ca {}: {e}", f.display());
                        ExitCode::from(2)
                    })?;
                Some(pem)
            }
            None => None,
        };
        Ok(Some(meshgate_proxy::trace::TraceOptions {
            endpoint,
            protocol,
            ca,
            sample: self.trace_sample / 100.0,
            service: service.to_string(),
        }))
    }
}

fn run(
    config: Vec<PathBuf>,
    demo_upstream: Option<String>,
    state_dir: PathBuf,
    trace: Option<meshgate_proxy::trace::TraceOptions>,
) -> ExitCode {
    let (snapshot, diags) = meshgate_config::compile_paths(&config);
    let Some(snapshot) = snapshot else {
        for d in &diags {
            eprintln!("{d}");
        }
        eprintln!("meshgate: config rejected: {} problem(s)", diags.len());
        return ExitCode::from(1);
    };
    let refused = snapshot
        .nothing_listens()
        .map(str::to_string)
        .or_else(|| snapshot.needs_mesh_ca());
    if let Some(why) = refused {
        let paths: Vec<String> = config.iter().map(|p| p.display().to_string()).collect();
        eprintln!("{}: {why}", paths.join(", "));
        return ExitCode::from(1);
    }
    runtime_then(move || async move {
        if let Some(addr) = demo_upstream {
            tokio::spawn(async move {
                if let Err(e) = demo::serve(addr).await {
                    tracing::error!("demo upstream failed: {e:#}");
                }
            });
        }
        let options = meshgate_proxy::Options {
            config,
            control: None,
            state_dir,
            trace,
        };
        Ok(meshgate_proxy::run(options, snapshot, meshgate_proxy::Feed::default()).await?)
    })
}

/// `MESHGATE_BUSY_POLL_US`: how long a one-worker proxy keeps polling its sockets
/// after it last sent something, instead of sleeping (`busy_poll`, ADR 0008).
fn busy_poll_budget() -> Option<std::time::Duration> {
    let raw = std::env::var("MESHGATE_BUSY_POLL_US").ok()?;
    match raw.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(us) => Some(std::time::Duration::from_micros(us.min(10_000))),
        Err(_) => {
            eprintln!(
                "meshgate: MESHGATE_BUSY_POLL_US={raw:?} is not a whole number of microseconds; busy polling off"
            );
            None
        }
    }
}
