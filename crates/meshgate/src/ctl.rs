//! `meshgate ctl`: the control plane's admin API from the command line. Human tables
//! by default; `-o json` prints what the API answered, `-o yaml` the resources as
//! YAML documents that `ctl apply` takes back.

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Create or replace the resources in files and directories, as one revision.
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Validate only: show what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why: kept with the revision.
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// List resources of a kind, or show one; `get nodes` lists the proxies,
    /// `get registry [SERVICE]` the registered instances.
    Get {
        kind: String,
        name: Option<String>,
        /// Read a past revision.
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Delete a resource (refused if the rest of the config still uses it).
    Delete {
        kind: String,
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// The revisions that changed a resource, or every revision.
    History {
        kind: Option<String>,
        name: Option<String>,
    },
    /// What changed between two revisions (to: the newest).
    Diff {
        kind: Option<String>,
        name: Option<String>,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Move an Api to another stage: draft, published, deprecated or offline.
    Lifecycle {
        name: String,
        #[arg(value_parser = ["draft", "published", "deprecated", "offline"])]
        stage: String,
        /// When a deprecated Api stops (RFC 3339); it answers 410 after.
        #[arg(long)]
        sunset: Option<String>,
        /// Where callers read about the change (Link: rel="deprecation").
        #[arg(long)]
        link: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// The OpenAPI 3.1 document of the published Apis (JSON; `-o yaml` for YAML).
    Openapi {
        /// Only the Apis this Gateway serves, with its global policies' security.
        #[arg(long)]
        gateway: Option<String>,
    },
    /// Create draft Apis from an OpenAPI 3.x document (JSON or YAML), one per
    /// operation, as one revision.
    Import {
        #[arg(value_parser = ["openapi"])]
        format: String,
        file: PathBuf,
        /// The Service the Apis call; without it they answer with mocks of the
        /// documented examples.
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// Grey releases: start one, see where it runs, promote it or roll it back.
    #[command(subcommand)]
    Release(ReleaseAction),
    /// Make a resource (or, without one, the whole config) what it was at a revision,
    /// as a new revision.
    Rollback {
        kind: Option<String>,
        name: Option<String>,
        #[arg(long)]
        to: u64,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReleaseAction {
    /// Release a new revision of an Api to part of the traffic or of the proxies.
    /// FILE holds the Api as it will be once promoted, under the Api's own name.
    Start {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The release's name (default: API-canary).
        #[arg(long)]
        name: Option<String>,
        /// Only proxies with these labels serve it (k=v,k=v).
        #[arg(long)]
        nodes: Option<String>,
        /// The share of requests, by a stable hash of --by.
        #[arg(long)]
        percent: Option<f64>,
        /// What --percent hashes: header:NAME, cookie:NAME, query:NAME, ip or
        /// consumer.
        #[arg(long)]
        by: Option<String>,
        /// Only requests with this header matching this regex (NAME=REGEX; repeat).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Only requests from Consumers with these labels (k=v,k=v).
        #[arg(long)]
        consumers: Option<String>,
        /// Roll back on its own when more than this percent of the release's
        /// answers are 5xx over --window.
        #[arg(long)]
        rollback_above: Option<f64>,
        /// The window --rollback-above looks at (default 60s).
        #[arg(long, requires = "rollback_above")]
        window: Option<String>,
        /// The fewest answers in the window to judge by (default 20).
        #[arg(long, requires = "rollback_above")]
        min_requests: Option<u64>,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// Every release (or one) and where it runs.
    Status { name: Option<String> },
    /// The Api becomes the release, everywhere, as one revision.
    Promote {
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
    /// Withdraw the release: the Api serves all of its traffic again.
    Rollback {
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(short = 'm', long, default_value = "")]
        message: String,
    },
}

pub struct Client {
    server: String,
    token: String,
    http: reqwest::Client,
}

/// Why a command failed, and its exit code: 1 for a refused request (invalid input),
/// 3 when the control plane could not be reached or failed.
struct Failed(u8, String);

impl Client {
    /// A client of the admin API at `server`; an `https://` server is verified
    /// against the CA certificates in `ca_file` (PEM).
    pub fn new(server: String, token: String, ca_file: Option<&Path>) -> Result<Self, String> {
        let mut http = reqwest::Client::builder();
        match ca_file {
            Some(f) => {
                let pem =
                    std::fs::read(f).map_err(|e| format!("--ca-file {}: {e}", f.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| format!("--ca-file {}: {e}", f.display()))?;
                http = http.tls_certs_only(certs);
            }
            None if server.starts_with("https://") => {
                return Err(format!(
                    "--server {server}: give the CA certificates that sign its certificate with --ca-file (or MESHGATE_CA_FILE)"
                ));
            }
            None => {}
        }
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            token,
            http: http.build().map_err(|e| e.to_string())?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        message: Option<&str>,
    ) -> Result<Value, Failed> {
        let body = body.map(|b| ("application/json", b.to_string()));
        self.send(method, path, body, message).await
    }

    /// `call` with a body of any text.
    async fn call_text(
        &self,
        method: reqwest::Method,
        path: &str,
        text: String,
        message: Option<&str>,
    ) -> Result<Value, Failed> {
        self.send(method, path, Some(("text/plain", text)), message)
            .await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
        message: Option<&str>,
    ) -> Result<Value, Failed> {
        let url = format!("{}{path}", self.server);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .header("x-meshgate-author", author());
        if let Some(m) = message.filter(|m| !m.is_empty()) {
            req = req.header("x-meshgate-message", m);
        }
        if let Some((content_type, b)) = body {
            req = req.header("content-type", content_type).body(b);
        }
        let resp = req.send().await.map_err(|e| {
            // The causes say what went wrong: refused, a certificate, a timeout.
            let mut why = String::new();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let _ = write!(why, ": {c}");
                cause = c.source();
            }
            Failed(3, format!("cannot reach the control plane at {url}{why}"))
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failed(3, format!("reading the answer from {url}: {e}")))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(v);
        }
        let err = &v["error"];
        let mut out = format!(
            "{} ({})",
            err["message"].as_str().unwrap_or("request failed"),
            status.as_u16()
        );
        for d in err["diagnostics"].as_array().into_iter().flatten() {
            let _ = write!(out, "\n{}", d.as_str().unwrap_or_default());
        }
        let code = if status.is_client_error() { 1 } else { 3 };
        Err(Failed(code, out))
    }

    pub async fn run(&self, action: Action, output: Output) -> ExitCode {
        match self.act(action, output).await {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(Failed(code, message)) => {
                eprintln!("meshgate ctl: {message}");
                ExitCode::from(code)
            }
        }
    }

    async fn act(&self, action: Action, output: Output) -> Result<String, Failed> {
        use reqwest::Method;
        match action {
            Action::Apply {
                files,
                dry_run,
                message,
            } => {
                let sources = meshgate_config::load_paths(&files)
                    .map_err(|diags| Failed(1, diags.iter().map(|d| format!("\n{d}")).collect()))?;
                let files: Vec<Value> = sources
                    .iter()
                    .map(|s| json!({"name": &*s.file, "text": s.text}))
                    .collect();
                let v = self
                    .call(
                        Method::POST,
                        &format!("/api/v1/apply{}", dry_flag(dry_run)),
                        Some(json!({"files": files})),
                        Some(&message),
                    )
                    .await?;
                Ok(render_written(&v, output))
            }
            Action::Get { kind, name, .. } if matches!(kind.as_str(), "releases" | "release") => {
                self.release(ReleaseAction::Status { name }, output).await
            }
            Action::Release(r) => self.release(r, output).await,
            Action::Openapi { gateway } => {
                let path = match gateway {
                    Some(g) => format!("/api/v1/openapi.json?gateway={g}"),
                    None => "/api/v1/openapi.json".into(),
                };
                let v = self.call(Method::GET, &path, None, None).await?;
                Ok(match output {
                    Output::Yaml => serde_saphyr::to_string(&v).unwrap_or_default(),
                    _ => pretty(&v),
                })
            }
            Action::Import {
                file,
                service,
                dry_run,
                message,
                ..
            } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| Failed(1, format!("{}: {e}", file.display())))?;
                let mut path = format!("/api/v1/import/openapi?dryRun={dry_run}");
                if let Some(s) = service {
                    let _ = write!(path, "&service={s}");
                }
                let v = self
                    .call_text(Method::POST, &path, text, Some(&message))
                    .await?;
                let mut out = render_written(&v, output);
                if matches!(output, Output::Table) {
                    for s in v["skipped"].as_array().into_iter().flatten() {
                        let _ = writeln!(out, "skipped: {}", s.as_str().unwrap_or(""));
                    }
                }
                Ok(out)
            }
            Action::Get { kind, name, .. } if kind == "registry" => {
                let path = match name {
                    Some(service) => format!("/api/v1/registry/{service}"),
                    None => "/api/v1/registry".into(),
                };
                let v = self.call(Method::GET, &path, None, None).await?;
                Ok(render(output, &v, registry_table))
            }
            Action::Get { kind, .. } if matches!(kind.as_str(), "nodes" | "node") => {
                let v = self.call(Method::GET, "/api/v1/nodes", None, None).await?;
                Ok(render(output, &v, nodes_table))
            }
            Action::Get {
                kind,
                name,
                revision,
            } => {
                let at = revision.map_or(String::new(), |r| format!("?revision={r}"));
                let path = match &name {
                    Some(n) => format!("/api/v1/{}/{n}{at}", plural(&kind)?),
                    None => format!("/api/v1/{}{at}", plural(&kind)?),
                };
                let v = self.call(Method::GET, &path, None, None).await?;
                let items = match name {
                    Some(_) => vec![v.clone()],
                    None => v["items"].as_array().cloned().unwrap_or_default(),
                };
                Ok(match output {
                    Output::Json => pretty(&v),
                    Output::Yaml => yaml_docs(&items),
                    Output::Table => {
                        let apis = plural(&kind)? == "apis";
                        let rows = items
                            .iter()
                            .map(|i| {
                                let r = &i["resource"];
                                let mut row = vec![
                                    r["kind"].as_str().unwrap_or("").to_string(),
                                    r["metadata"]["name"].as_str().unwrap_or("").to_string(),
                                    i["revision"].to_string(),
                                ];
                                if apis {
                                    let stage = r["spec"]["lifecycle"]["stage"].as_str();
                                    row.push(stage.unwrap_or("published").to_string());
                                }
                                row
                            })
                            .collect();
                        let head: &[&str] = if apis {
                            &["KIND", "NAME", "REVISION", "STAGE"]
                        } else {
                            &["KIND", "NAME", "REVISION"]
                        };
                        table(head, rows)
                    }
                })
            }
            Action::Delete {
                kind,
                name,
                dry_run,
                message,
            } => {
                let path = format!("/api/v1/{}/{name}{}", plural(&kind)?, dry_flag(dry_run));
                let v = self
                    .call(Method::DELETE, &path, None, Some(&message))
                    .await?;
                Ok(render_written(&v, output))
            }
            Action::History { kind, name } => {
                let path = format!("{}/history", one(kind.as_deref(), name.as_deref())?);
                let v = self.call(Method::GET, &path, None, None).await?;
                Ok(render(output, &v, |v| {
                    let rows = v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            let changes = changes(c);
                            let shown = match changes.len() {
                                0..=3 => changes.join(", "),
                                n => format!("{}, and {} more", changes[..2].join(", "), n - 2),
                            };
                            vec![
                                c["revision"].to_string(),
                                c["time"].as_str().unwrap_or("").to_string(),
                                c["author"].as_str().unwrap_or("").to_string(),
                                shown,
                                c["message"].as_str().unwrap_or("").to_string(),
                            ]
                        })
                        .collect();
                    table(&["REVISION", "TIME", "AUTHOR", "CHANGES", "MESSAGE"], rows)
                }))
            }
            Action::Diff {
                kind,
                name,
                from,
                to,
            } => {
                let mut path = format!("/api/v1/diff?from={from}");
                if let Some(t) = to {
                    let _ = write!(path, "&to={t}");
                }
                if let (Some(k), Some(n)) = (&kind, &name) {
                    let _ = write!(path, "&kind={}&name={n}", plural(k)?);
                }
                let v = self.call(Method::GET, &path, None, None).await?;
                Ok(render(output, &v, |v| {
                    v["items"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|d| d["diff"].as_str().unwrap_or("").to_string())
                        .collect()
                }))
            }
            Action::Lifecycle {
                name,
                stage,
                sunset,
                link,
                dry_run,
                message,
            } => {
                let mut body = json!({"stage": stage});
                if let Some(t) = sunset {
                    body["sunset"] = t.into();
                }
                if let Some(l) = link {
                    body["link"] = l.into();
                }
                let path = format!("/api/v1/apis/{name}/lifecycle{}", dry_flag(dry_run));
                let v = self
                    .call(Method::POST, &path, Some(body), Some(&message))
                    .await?;
                Ok(render_written(&v, output))
            }
            Action::Rollback {
                kind,
                name,
                to,
                dry_run,
                message,
            } => {
                let path = format!(
                    "{}/rollback{}",
                    one(kind.as_deref(), name.as_deref())?,
                    dry_flag(dry_run)
                );
                let v = self
                    .call(Method::POST, &path, Some(json!({"to": to})), Some(&message))
                    .await?;
                Ok(render_written(&v, output))
            }
        }
    }
}

impl Client {
    async fn release(&self, action: ReleaseAction, output: Output) -> Result<String, Failed> {
        use reqwest::Method;
        let (path, body, message) = match action {
            ReleaseAction::Status { name } => {
                let path = match &name {
                    Some(n) => format!("/api/v1/releases/{n}"),
                    None => "/api/v1/releases".into(),
                };
                let v = self.call(Method::GET, &path, None, None).await?;
                let items = match name {
                    Some(_) => vec![v.clone()],
                    None => v["items"].as_array().cloned().unwrap_or_default(),
                };
                return Ok(render(output, &v, |_| releases_table(&items)));
            }
            ReleaseAction::Start {
                file,
                name,
                nodes,
                percent,
                by,
                headers,
                consumers,
                rollback_above,
                window,
                min_requests,
                dry_run,
                message,
            } => {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| Failed(1, format!("{}: {e}", file.display())))?;
                let nodes = crate::proxy::labels(nodes.as_deref().unwrap_or(""))
                    .map_err(|e| Failed(2, format!("--nodes: {e}")))?;
                let consumers = crate::proxy::labels(consumers.as_deref().unwrap_or(""))
                    .map_err(|e| Failed(2, format!("--consumers: {e}")))?;
                let mut matches = serde_json::Map::new();
                for h in headers {
                    let Some((n, re)) = h.split_once('=') else {
                        return Err(Failed(2, format!("--header {h:?}: give NAME=REGEX")));
                    };
                    matches.insert(n.to_string(), re.into());
                }
                let mut body = json!({
                    "text": text, "nodes": nodes, "headers": matches, "consumers": consumers,
                });
                if let Some(n) = name {
                    body["name"] = n.into();
                }
                if let Some(p) = percent {
                    body["percent"] = p.into();
                }
                if let Some(b) = by {
                    body["by"] = b.into();
                }
                if let Some(p) = rollback_above {
                    let mut rule = json!({"errorPercent": p});
                    if let Some(w) = window {
                        rule["window"] = w.into();
                    }
                    if let Some(n) = min_requests {
                        rule["minRequests"] = n.into();
                    }
                    body["rollback"] = rule;
                }
                let path = format!("/api/v1/releases{}", dry_flag(dry_run));
                (path, Some(body), message)
            }
            ReleaseAction::Promote {
                name,
                dry_run,
                message,
            } => (
                format!("/api/v1/releases/{name}/promote{}", dry_flag(dry_run)),
                None,
                message,
            ),
            ReleaseAction::Rollback {
                name,
                dry_run,
                message,
            } => (
                format!("/api/v1/releases/{name}/rollback{}", dry_flag(dry_run)),
                None,
                message,
            ),
        };
        let v = self.call(Method::POST, &path, body, Some(&message)).await?;
        Ok(render_written(&v, output))
    }
}

/// Releases: what they release, to whom, and how many placed proxies run them.
fn releases_table(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|r| {
            let rule = &r["rule"];
            let nodes = pairs(&rule["nodes"]);
            let mut share = r["share"].as_str().unwrap_or("").to_string();
            if let Some(by) = rule["by"].as_str() {
                let _ = write!(share, " by {by}");
            }
            let running: Vec<String> = r["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["runs"] != "current")
                .map(|n| {
                    format!(
                        "{}{}",
                        n["node"].as_str().unwrap_or(""),
                        if n["runs"] == "pending" {
                            " (pending)"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            vec![
                r["name"].as_str().unwrap_or("").to_string(),
                r["of"].as_str().unwrap_or("").to_string(),
                r["revision"].to_string(),
                if nodes.is_empty() {
                    "all".to_string()
                } else {
                    nodes
                },
                share,
                format!("{}/{}", r["nodesApplied"], r["nodesPlaced"]),
                running.join(", "),
            ]
        })
        .collect();
    table(
        &[
            "RELEASE",
            "API",
            "REVISION",
            "NODES",
            "SHARE",
            "APPLIED",
            "RUNNING ON",
        ],
        rows,
    )
}

/// The proxies: what each runs against the newest revision, and why not if it
/// rejected it.
/// A JSON map of strings as `k=v,k=v`.
fn pairs(map: &Value) -> String {
    let pairs: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    pairs.join(",")
}

fn registry_table(v: &Value) -> String {
    let rows = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let labels = pairs(&i["labels"]);
            let text = |k: &str| i[k].as_str().unwrap_or("").to_string();
            vec![
                text("service"),
                text("address"),
                text("node"),
                labels,
                text("zone"),
                format!("{}s", i["leaseSeconds"]),
                // Held by another control plane: its lease is kept there.
                i["expiresInMs"]
                    .as_f64()
                    .map_or("-".to_string(), |ms| format!("{:.1}s", ms / 1000.0)),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "ADDRESS",
            "NODE",
            "LABELS",
            "ZONE",
            "LEASE",
            "EXPIRES IN",
        ],
        rows,
    )
}

fn nodes_table(v: &Value) -> String {
    let newest = v["revision"].as_u64().unwrap_or(0);
    let rows = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let revision = n["revision"].as_u64().unwrap_or(0);
            let status = if n["connected"].as_bool() != Some(true) {
                "disconnected"
            } else if !n["lastError"].is_null() {
                "rejected"
            } else if revision == newest {
                "in sync"
            } else {
                "behind"
            };
            let labels = pairs(&n["labels"]);
            let error = n["lastError"]["errors"]
                .as_array()
                .and_then(|e| e.first())
                .map(|e| {
                    format!(
                        "revision {}: {}",
                        n["lastError"]["revision"],
                        e.as_str().unwrap_or("")
                    )
                })
                .unwrap_or_default();
            vec![
                n["name"].as_str().unwrap_or("").to_string(),
                n["gateway"].as_str().unwrap_or("").to_string(),
                labels,
                revision.to_string(),
                status.to_string(),
                n["lastContact"].as_str().unwrap_or("").to_string(),
                error,
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "GATEWAY",
            "LABELS",
            "REVISION",
            "STATUS",
            "LAST CONTACT",
            "ERROR",
        ],
        rows,
    )
}

/// `/api/v1/KIND/NAME` for one resource, `/api/v1` for the whole config.
fn one(kind: Option<&str>, name: Option<&str>) -> Result<String, Failed> {
    match (kind, name) {
        (Some(k), Some(n)) => Ok(format!("/api/v1/{}/{n}", plural(k)?)),
        (None, None) => Ok("/api/v1".into()),
        _ => Err(Failed(2, "name both KIND and NAME, or neither".into())),
    }
}

fn plural(kind: &str) -> Result<&'static str, Failed> {
    meshgate_api::Kind::parse(kind)
        .map(meshgate_api::Kind::plural)
        .ok_or_else(|| {
            Failed(
                2,
                format!("unknown kind {kind:?} (api, service, consumer, gateway, policy)"),
            )
        })
}

/// The query string of a write that is only validated.
fn dry_flag(dry: bool) -> &'static str {
    if dry { "?dryRun=true" } else { "" }
}

fn author() -> String {
    std::env::var("MESHGATE_AUTHOR")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "ctl".into())
}

/// The `changes` of a commit or a write, as `op Kind/name`.
fn changes(v: &Value) -> Vec<String> {
    v["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {}",
                c["op"].as_str().unwrap_or(""),
                c["key"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// One answer as asked: JSON as the API gave it, YAML, or the human `table`.
fn render(output: Output, v: &Value, table: impl FnOnce(&Value) -> String) -> String {
    match output {
        Output::Json => pretty(v),
        Output::Yaml => yaml_docs(std::slice::from_ref(v)),
        Output::Table => table(v),
    }
}

fn render_written(v: &Value, output: Output) -> String {
    render(output, v, |v| {
        let changes: Vec<String> = changes(v).iter().map(|c| format!("  {c}\n")).collect();
        let rev = &v["revision"];
        let head = if v["dryRun"].as_bool() == Some(true) {
            format!("dry run: valid; would change (at revision {rev}):\n")
        } else if changes.is_empty() {
            format!("no changes (revision {rev})\n")
        } else {
            format!("revision {rev}:\n")
        };
        head + &changes.concat()
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// The `resource` of each item (or the item itself) as YAML documents.
fn yaml_docs(items: &[Value]) -> String {
    items
        .iter()
        .map(|i| {
            let r = i.get("resource").unwrap_or(i);
            format!("---\n{}", serde_saphyr::to_string(r).unwrap_or_default())
        })
        .collect()
}

fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let _ = write!(s, "{c:<w$}   ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}
