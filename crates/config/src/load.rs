use crate::diag::Diagnostic;
use crate::index::{DocSpan, scan};
use meshgate_api::{
    API_VERSION, ApiSpec, ConsumerSpec, Envelope, GatewaySpec, Head, Kind, MeshSpec, PolicySpec,
    ServiceSpec,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The text of one config file.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<str>,
    pub text: String,
}

/// A typed resource of any kind.
#[derive(Debug, Clone)]
pub enum Resource {
    Gateway(Envelope<GatewaySpec>),
    Service(Envelope<ServiceSpec>),
    Api(Envelope<ApiSpec>),
    Policy(Envelope<PolicySpec>),
    Consumer(Envelope<ConsumerSpec>),
    Mesh(Envelope<MeshSpec>),
}

impl Resource {
    /// The resource as shown by `GET /config`: secrets redacted (Consumer secrets by
    /// their type, secret members of JWKs inside filter configs here).
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Self::Gateway(e) => serde_json::to_value(e),
            Self::Service(e) => serde_json::to_value(e),
            Self::Api(e) => serde_json::to_value(e),
            Self::Policy(e) => serde_json::to_value(e),
            Self::Consumer(e) => serde_json::to_value(e),
            Self::Mesh(e) => serde_json::to_value(e),
        };
        let mut v = v.unwrap_or(serde_json::Value::Null);
        redact_jwks(&mut v);
        v
    }
}

/// JWK members that are secret (RFC 7518 §6): the symmetric key and private parts.
const JWK_SECRETS: &[&str] = &["k", "d", "p", "q", "dp", "dq", "qi", "oth"];

/// Replace the secret members of every JSON Web Key (an object with `kty`).
fn redact_jwks(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let is_jwk = map.contains_key("kty");
            for (k, child) in map.iter_mut() {
                if is_jwk && JWK_SECRETS.contains(&k.as_str()) {
                    *child = serde_json::Value::String(meshgate_api::REDACTED.into());
                } else {
                    redact_jwks(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_jwks),
        _ => {}
    }
}

/// One parsed document and where it came from.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: Arc<str>,
    pub span: DocSpan,
    pub kind: Kind,
    pub name: String,
    pub resource: Resource,
}

impl Doc {
    pub fn diag(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: self.span.line_of(path),
            resource: format!("{}/{}", self.kind.as_str(), self.name),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

const MAX_FILE_BYTES: u64 = 16 << 20;

/// Read files, and `*.yaml`/`*.yml` files under directories (recursively, sorted).
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Source>, Vec<Diagnostic>> {
    let mut files = Vec::new();
    let mut diags = Vec::new();
    for p in paths {
        collect(p, &mut files, &mut diags);
    }
    let mut sources = Vec::new();
    for f in files {
        let name: Arc<str> = f.display().to_string().into();
        let read = std::fs::metadata(&f).and_then(|m| {
            if m.len() > MAX_FILE_BYTES {
                Err(std::io::Error::other("file is larger than 16 MiB"))
            } else {
                std::fs::read_to_string(&f)
            }
        });
        match read {
            Ok(text) => sources.push(Source { file: name, text }),
            Err(e) => diags.push(io_diag(name, &e)),
        }
    }
    if diags.is_empty() {
        Ok(sources)
    } else {
        Err(diags)
    }
}

fn io_diag(file: Arc<str>, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file,
        line: 1,
        resource: "-".into(),
        path: "-".into(),
        message: format!("cannot read: {e}"),
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>, diags: &mut Vec<Diagnostic>) {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(p) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                diags.push(io_diag(p.display().to_string().into(), &e));
                return;
            }
        };
        entries.sort();
        for e in entries {
            let yaml = e.extension().is_some_and(|x| x == "yaml" || x == "yml");
            if e.is_dir() || yaml {
                collect(&e, out, diags);
            }
        }
    } else if p.exists() {
        out.push(p.to_path_buf());
    } else {
        diags.push(io_diag(
            p.display().to_string().into(),
            &std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
}

fn options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.with_snippet = false;
    o
}

/// Deserialize one document slice, mapping a failure onto the file's lines.
fn de<T: DeserializeOwned>(
    file: &Arc<str>,
    span: &DocSpan,
    text: &str,
    resource: &str,
) -> Result<T, Diagnostic> {
    serde_saphyr::from_str_with_options::<T>(text, options()).map_err(|e| {
        let rel = e.location().map_or(1, |l| l.line() as u32);
        let line = span.first_line + rel - 1;
        let mut message = e.to_string();
        // The library appends its own location; ours is in front.
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        Diagnostic {
            file: file.clone(),
            line,
            resource: resource.to_string(),
            path: span.path_at(line).unwrap_or("-").to_string(),
            message,
        }
    })
}

fn newlines(text: &str) -> u32 {
    text.bytes().filter(|b| *b == b'\n').count() as u32
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

/// Stage 1: every document of every source, typed by its kind.
/// Parsed documents kept between compiles of mostly unchanged sources (the control
/// plane compiles the whole config on every write): only new or changed texts are
/// parsed again. It keeps the sources of the last compile only.
#[derive(Debug, Default)]
pub struct ParseCache(std::sync::Mutex<HashMap<SourceKey, Vec<Doc>>>);

/// A source's file name and text.
type SourceKey = (Arc<str>, String);

/// [`parse_sources`], taking unchanged sources' documents from `cache`.
pub fn parse_sources_cached(
    sources: &[Source],
    diags: &mut Vec<Diagnostic>,
    cache: &ParseCache,
) -> Vec<Doc> {
    let Ok(mut map) = cache.0.lock() else {
        return parse_sources(sources, diags);
    };
    let mut kept = HashMap::with_capacity(sources.len());
    let mut docs = Vec::new();
    for src in sources {
        let key = (src.file.clone(), src.text.clone());
        if let Some(d) = map.remove(&key) {
            docs.extend(d.iter().cloned());
            kept.insert(key, d);
            continue;
        }
        let before = diags.len();
        let d = parse_sources(std::slice::from_ref(src), diags);
        docs.extend(d.iter().cloned());
        if diags.len() == before {
            kept.insert(key, d);
        }
    }
    *map = kept;
    docs
}

pub fn parse_sources(sources: &[Source], diags: &mut Vec<Diagnostic>) -> Vec<Doc> {
    let mut docs = Vec::new();
    for src in sources {
        let mut spans = scan(&src.text);
        if spans.is_empty() && !is_blank(&src.text) {
            // The scanner failed at the start; let the deserialiser say where.
            spans.push(DocSpan {
                start: 0,
                end: src.text.len(),
                first_line: 1,
                lines: Default::default(),
            });
        }
        // Lines are counted on from the previous document, not from the top.
        let (mut at, mut line) = (0, 1);
        for mut span in spans {
            let start = span.start.min(src.text.len());
            line += newlines(&src.text[at.min(start)..start]);
            at = start;
            span.first_line = line;
            let text = &src.text[span.start..span.end];
            if is_blank(text) {
                continue;
            }
            match parse_doc(&src.file, &span, text) {
                Ok(d) => docs.push(d),
                Err(d) => diags.push(d),
            }
        }
    }
    docs
}

fn parse_doc(file: &Arc<str>, span: &DocSpan, text: &str) -> Result<Doc, Diagnostic> {
    let head: Head = de(file, span, text, "-")?;
    let resource = format!("{}/{}", head.kind, head.metadata.name);
    let place = |path: &str, message: String| Diagnostic {
        file: file.clone(),
        line: span.line_of(path),
        resource: resource.clone(),
        path: path.to_string(),
        message,
    };
    if head.api_version != API_VERSION {
        return Err(place(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?} (expected {API_VERSION:?})",
                head.api_version
            ),
        ));
    }
    let (kind, res) = match head.kind.as_str() {
        "Gateway" => (
            Kind::Gateway,
            Resource::Gateway(de(file, span, text, &resource)?),
        ),
        "Service" => (
            Kind::Service,
            Resource::Service(de(file, span, text, &resource)?),
        ),
        "Api" => (Kind::Api, Resource::Api(de(file, span, text, &resource)?)),
        "Policy" => (
            Kind::Policy,
            Resource::Policy(de(file, span, text, &resource)?),
        ),
        "Consumer" => (
            Kind::Consumer,
            Resource::Consumer(de(file, span, text, &resource)?),
        ),
        "Mesh" => (Kind::Mesh, Resource::Mesh(de(file, span, text, &resource)?)),
        other => {
            return Err(place(
                "kind",
                format!(
                    "unknown kind {other:?} (expected Gateway, Service, Api, Consumer, Policy or Mesh)"
                ),
            ));
        }
    };
    Ok(Doc {
        file: file.clone(),
        span: span.clone(),
        kind,
        name: head.metadata.name,
        resource: res,
    })
}
