//! meshgate's data plane: listeners (HTTP/1.1, h2c, TLS with SNI and ALPN), the
//! request phases (route → filters → invoke → response filters → completion), the
//! upstream client, the admin endpoints, metrics and access log, hot reload and
//! graceful drain. Config arrives as a compiled `Snapshot`; this crate never parses
//! YAML itself and does not know about the control plane.

mod access_log;
mod admin;
mod body;
pub mod busy_poll;
mod client;
mod compress;
mod discovery;
mod dispatch;
mod forwarded;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod guard;
mod h1;
mod h1_server;
mod header_maps;
mod health;
mod invoke;
mod lane;
pub mod mesh;
mod metrics;
mod mirror;
mod pipe;
mod respond;
mod server;
mod state;
pub mod tls;
pub mod trace;
mod transparent;

pub use discovery::{Instance, Registry};
pub use server::bind;
mod usage;

use arc_swap::ArcSwap;
use meshgate_config::{Diagnostic, Snapshot};
use state::Active;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How the proxy was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// Files and directories to (re)load config from (`meshgate run`).
    pub config: Vec<PathBuf>,
    /// The control plane that pushes the config instead (`meshgate proxy`); file
    /// reloads do not apply then.
    pub control: Option<String>,
    /// Where quota counters and usage persist (`meshgate.redb` in it).
    pub state_dir: PathBuf,
    /// Export spans by OTLP/HTTP (none: no tracing).
    pub trace: Option<trace::TraceOptions>,
}

/// A config pushed from outside (the control plane's agent), and where to say
/// whether it was applied: `Ok(revision)` or the reasons it was not.
#[derive(Debug)]
pub struct Push {
    pub snapshot: Snapshot,
    pub reply: tokio::sync::oneshot::Sender<Result<String, Vec<String>>>,
}

/// What a control plane's agent gives the proxy (`meshgate proxy`); `meshgate
/// run` has none of it.
#[derive(Default)]
pub struct Feed {
    /// Configs to swap in, each answered.
    pub pushes: Option<tokio::sync::mpsc::Receiver<Push>>,
    /// Filled in once the proxy runs, for the agent's reports.
    pub counts: Option<Arc<ReleaseCounts>>,
    /// The registered instances Services with registry discovery follow.
    pub registry: Arc<Registry>,
    /// The mesh certificate, as the control plane signs and rotates it.
    pub mesh: Arc<mesh::MeshTls>,
    /// Run when the proxy is told to stop, before it drains: a sidecar takes its
    /// instance out of the registry so that no new request is sent its way.
    pub before_drain: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").finish_non_exhaustive()
    }
}

/// The answers of the grey releases this proxy serves, for the control plane's
/// automatic rollback; readable once [`run`] has started.
#[derive(Debug, Default)]
pub struct ReleaseCounts(std::sync::OnceLock<std::sync::Weak<Shared>>);

impl ReleaseCounts {
    /// For each release in the active config: its name, its answers since the
    /// proxy started, and how many of them were 5xx.
    pub fn read(&self) -> Vec<(Arc<str>, u64, u64)> {
        let Some(shared) = self.0.get().and_then(std::sync::Weak::upgrade) else {
            return Vec::new();
        };
        let active = shared.active.load();
        let mut out = Vec::new();
        for (i, api) in active.snapshot.apis.iter().enumerate() {
            if api.release_of.is_none() {
                continue;
            }
            let (mut all, mut failed) = (0, 0);
            for g in &active.gateways {
                let (a, f) = g.api_stats[i].totals();
                all += a;
                failed += f;
            }
            out.push((api.name.clone(), all, failed));
        }
        out
    }
}

/// The outcome of the last reload attempt, for `GET /config`.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub at: SystemTime,
    pub ok: bool,
    pub revision: Option<String>,
    pub errors: Vec<String>,
}

/// State shared by every listener, connection and the admin server.
#[derive(Debug)]
pub struct Shared {
    pub options: Options,
    pub active: ArcSwap<Active>,
    pub metrics: metrics::Metrics,
    listeners: server::Listeners,
    admins: admin::Admins,
    loggers: access_log::Loggers,
    registry: Arc<Registry>,
    mesh: Arc<mesh::MeshTls>,
    pub tracer: Option<trace::Tracer>,
    last_reload: Mutex<Option<ReloadStatus>>,
    reload_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    drain: watch::Sender<bool>,
    epoch: Instant,
}

impl Shared {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// Milliseconds since start-up at `now` (one clock read serves several uses).
    pub fn ms_at(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn record(&self, status: ReloadStatus) {
        if let Ok(mut s) = self.last_reload.lock() {
            *s = Some(status);
        }
    }

    /// Compile the config files again and swap them in. In-flight requests keep
    /// the snapshot they started with; a bad config changes nothing.
    pub async fn reload(self: &Arc<Self>, trigger: &str) -> Result<String, Vec<String>> {
        if let Some(url) = &self.options.control {
            return Err(vec![format!(
                "this proxy's config comes from the control plane at {url}: change it there (meshgate ctl)"
            )]);
        }
        let _one_at_a_time = self.reload_lock.lock().await;
        let paths = self.options.config.clone();
        let compiled =
            tokio::task::spawn_blocking(move || meshgate_config::compile_paths(&paths)).await;
        let (snapshot, diags): (Option<Snapshot>, Vec<Diagnostic>) = match compiled {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "config compile task failed");
                (None, Vec::new())
            }
        };
        let result = match snapshot {
            None => Err(if diags.is_empty() {
                vec!["config compile failed".to_string()]
            } else {
                diags.iter().map(|d| d.to_string()).collect()
            }),
            Some(s) => match s
                .nothing_listens()
                .map(str::to_string)
                .or_else(|| s.needs_mesh_ca())
            {
                Some(why) => Err(vec![why]),
                None => self.activate(Arc::new(s)).await.map_err(|e| vec![e]),
            },
        };
        self.settle(trigger, result)
    }

    /// Swap in a config compiled elsewhere (a control-plane push).
    pub async fn apply(
        self: &Arc<Self>,
        trigger: &str,
        snapshot: Snapshot,
    ) -> Result<String, Vec<String>> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let result = self.activate(Arc::new(snapshot)).await.map_err(|e| vec![e]);
        self.settle(trigger, result)
    }

    /// Log, count and record the outcome of a reload or push.
    fn settle(
        &self,
        trigger: &str,
        result: Result<String, Vec<String>>,
    ) -> Result<String, Vec<String>> {
        match &result {
            Ok(rev) => {
                tracing::info!(%trigger, revision = %rev, "config reloaded");
                self.metrics.reload(true);
            }
            Err(errs) => {
                for e in errs {
                    tracing::error!(%trigger, "config rejected: {e}");
                }
                self.metrics.reload(false);
            }
        }
        self.record(ReloadStatus {
            at: SystemTime::now(),
            ok: result.is_ok(),
            revision: result.as_ref().ok().cloned(),
            errors: result.as_ref().err().cloned().unwrap_or_default(),
        });
        result
    }

    async fn activate(self: &Arc<Self>, snapshot: Arc<Snapshot>) -> Result<String, String> {
        let prev = self.active.load_full();
        if prev.snapshot.revision == snapshot.revision {
            return Ok(snapshot.revision.clone());
        }
        let next = Active::build(
            snapshot,
            Some(&prev),
            &self.metrics,
            &self.loggers,
            (&self.registry, &self.mesh),
        );
        let prepared = self.listeners.prepare(&next, &self.mesh).await?;
        let admins = self.admins.prepare(&next.snapshot).await?;
        let rev = next.snapshot.revision.clone();
        self.active.store(Arc::new(next));
        self.listeners.commit(self, prepared);
        self.admins.commit(self, admins);
        Ok(rev)
    }
}

/// Serve a compiled config until SIGTERM or SIGINT, then drain and return. With
/// a `feed`'s pushes, each config received there is swapped in and answered.
pub async fn run(options: Options, snapshot: Snapshot, feed: Feed) -> std::io::Result<()> {
    let Feed {
        pushes,
        counts,
        registry,
        mesh,
        before_drain,
    } = feed;
    let store = open_state(&options.state_dir)?;
    let metrics = metrics::Metrics::default();
    let loggers = access_log::Loggers::default();
    let snapshot = Arc::new(snapshot);
    let active = Active::build(
        snapshot.clone(),
        None,
        &metrics,
        &loggers,
        (&registry, &mesh),
    );
    let (drain, _) = watch::channel(false);
    let spans = trace::SpanCounts {
        exported: metrics.spans_exported.clone(),
        dropped: metrics.spans_dropped.clone(),
    };
    let tracer = options
        .trace
        .clone()
        .map(|o| trace::Tracer::start(o, spans));
    let shared = Arc::new(Shared {
        tracer,
        options,
        active: ArcSwap::from_pointee(active),
        metrics,
        listeners: server::Listeners::default(),
        admins: admin::Admins::default(),
        loggers,
        registry,
        mesh,
        last_reload: Mutex::new(None),
        reload_lock: tokio::sync::Mutex::new(()),
        draining: AtomicBool::new(false),
        drain,
        epoch: Instant::now(),
    });
    if let Some(c) = counts {
        let _ = c.0.set(Arc::downgrade(&shared));
    }
    let prepared = shared
        .listeners
        .prepare(&shared.active.load(), &shared.mesh)
        .await
        .map_err(std::io::Error::other)?;
    shared.listeners.commit(&shared, prepared);
    shared.metrics.reload(true);
    shared.record(ReloadStatus {
        at: SystemTime::now(),
        ok: true,
        revision: Some(snapshot.revision.clone()),
        errors: Vec::new(),
    });
    let admins = shared
        .admins
        .prepare(&snapshot)
        .await
        .map_err(std::io::Error::other)?;
    shared.admins.commit(&shared, admins);
    let _watch = watch_files(&shared);
    if let Some(mut pushes) = pushes {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(p) = pushes.recv().await {
                let _ = p
                    .reply
                    .send(shared.apply("control plane", p.snapshot).await);
            }
        });
    }
    tracing::info!(revision = %snapshot.revision, "meshgate ready");
    wait_for_stop(&shared).await?;
    if let Some(first) = before_drain {
        first.await;
    }
    drain_all(&shared).await;
    shared.admins.stop_all();
    store.abort();
    if let Err(e) = meshgate_meter::meter().flush(meshgate_meter::unix_now()) {
        tracing::error!(error = %e, "could not save quota counters and usage at shutdown");
    }
    Ok(())
}

/// How often quota counters and usage are written to the state store.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Open the state store, restore the quota counters it holds, and write changes to
/// it every [`FLUSH_EVERY`] from the returned task.
fn open_state(dir: &std::path::Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let fail = |e: String| std::io::Error::other(format!("state store: {e}"));
    std::fs::create_dir_all(dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let ledger = meshgate_meter::Ledger::open(&dir.join("meshgate.redb")).map_err(fail)?;
    let meter = meshgate_meter::meter();
    meter
        .attach(ledger, meshgate_meter::unix_now())
        .map_err(fail)?;
    tracing::info!(dir = %dir.display(), "quota counters and usage persist here");
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let result =
                tokio::task::spawn_blocking(|| meter.flush(meshgate_meter::unix_now())).await;
            match result {
                Ok(Err(e)) if !failing => {
                    tracing::error!(error = %e, "cannot save quota counters and usage; retrying");
                    failing = true;
                }
                Ok(Ok(())) if failing => {
                    tracing::info!("quota counters and usage saved again");
                    failing = false;
                }
                _ => {}
            }
        }
    }))
}

async fn wait_for_stop(shared: &Arc<Shared>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                let _ = shared.reload("SIGHUP").await;
            }
        }
    }
}

/// Stop accepting, tell every connection to finish (GOAWAY on h2, `Connection:
/// close` on h1), and wait for them up to the grace period.
async fn drain_all(shared: &Arc<Shared>) {
    let grace = shared
        .active
        .load()
        .snapshot
        .gateways
        .iter()
        .map(|g| g.drain_timeout)
        .max()
        .unwrap_or(Duration::from_secs(30));
    tracing::info!(?grace, "draining");
    shared.draining.store(true, Ordering::Relaxed);
    shared.listeners.stop_all();
    let _ = shared.drain.send(true);
    let deadline = Instant::now() + grace;
    while shared.metrics.downstream_connections.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.metrics.downstream_connections.get();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "grace period over; closing remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
}

/// Reload when a config file changes (debounced). The watcher lives as long as the
/// returned value.
fn watch_files(shared: &Arc<Shared>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // A config file's whole directory is watched, but only changes to the config
    // itself count: other files there (logs, pid files) must not cause reloads.
    let ours: Vec<PathBuf> = shared
        .options
        .config
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && (ev.kind.is_modify() || ev.kind.is_create() || ev.kind.is_remove())
            && ev
                .paths
                .iter()
                .any(|p| ours.iter().any(|o| p.starts_with(o)))
        {
            let _ = tx.send(());
        }
    })
    .map_err(
        |e| tracing::warn!(error = %e, "file watching unavailable; use SIGHUP or POST /reload"),
    )
    .ok()?;
    for p in &shared.options.config {
        // Watch directories, and a file's directory (editors replace files).
        let target = if p.is_dir() {
            p.clone()
        } else {
            p.parent().map(PathBuf::from).unwrap_or_else(|| p.clone())
        };
        let target = if target.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            target
        };
        if let Err(e) = watcher.watch(&target, RecursiveMode::Recursive) {
            tracing::warn!(path = %target.display(), error = %e, "cannot watch");
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: editors write in several steps.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let _ = shared.reload("file change").await;
        }
    });
    Some(watcher)
}
