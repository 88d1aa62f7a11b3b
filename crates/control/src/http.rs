//! The admin REST API under `/api/v1/` (JSON, bearer token).
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/{kind}` | list (`?revision=` for a past one) |
//! | `POST /api/v1/{kind}` | create one resource (409 if it exists) |
//! | `GET`, `PUT`, `DELETE /api/v1/{kind}/{name}` | read, create or replace, delete |
//! | `GET /api/v1/{kind}/{name}/history` | commits that touched it |
//! | `POST /api/v1/{kind}/{name}/rollback` | `{"to": REV}`: it as it was then |
//! | `POST /api/v1/apis/{name}/lifecycle` | `{"stage", "sunset"?, "link"?}`: another stage |
//! | `POST /api/v1/apply` | `{"files": [{"name", "text"}], "delete": ["Kind/name"]}` |
//! | `GET /api/v1/history` | every commit, newest first |
//! | `GET /api/v1/diff?from=&to=&kind=&name=` | unified diffs between revisions |
//! | `POST /api/v1/rollback` | `{"to": REV}`: the whole config as it was then |
//! | `GET /api/v1/revision` | the newest revision |
//! | `GET /api/v1/nodes` | the proxies, what they run and their last error |
//! | `GET /api/v1/openapi.json?gateway=` | OpenAPI 3.1 of the published Apis |
//! | `POST /api/v1/import/openapi?service=` | draft Apis from an OpenAPI 3.x document (the body) |
//! | `GET`, `POST /api/v1/releases` | grey releases and where they run; start one |
//! | `GET /api/v1/releases/{name}` | one release and where it runs |
//! | `POST /api/v1/releases/{name}/promote` | the Api becomes the release |
//! | `POST /api/v1/releases/{name}/rollback` | the release goes |
//!
//! The push stream (gRPC, `meshgate.control.v1.Push`) is served on the same port,
//! behind the node token instead of the admin token.
//!
//! Writes take `?dryRun=true` (validate only), and the author and message from the
//! `x-meshgate-author` and `x-meshgate-message` headers. Errors have the gateway's
//! JSON shape, `{"error": {"code", "message", "diagnostics"?}}`.

use crate::plane::{Meta, Plane, Write, WriteError, Written};
use crate::push::Publisher;
use crate::store::{Store, StoreError, key};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshgate_api::Kind;
use meshgate_config::Source;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;
/// Most commits one history answer lists.
const HISTORY_LIMIT: usize = 1000;

struct Ctx<S> {
    plane: Arc<Plane<S>>,
    push: Arc<Publisher<S>>,
    token: String,
}

/// The admin API's routes over `plane`, behind `token`, and the push service.
pub fn router<S: Store>(plane: Arc<Plane<S>>, push: Arc<Publisher<S>>, token: String) -> Router {
    let grpc = push.service();
    let ctx = Arc::new(Ctx { plane, push, token });
    Router::new()
        .route("/api/v1/revision", get(revision::<S>))
        .route("/api/v1/nodes", get(nodes::<S>))
        .route("/api/v1/registry", get(registry::<S>))
        .route("/api/v1/registry/{service}", get(registry_one::<S>))
        .route("/api/v1/mesh/ca", get(mesh_ca::<S>))
        .route("/api/v1/mesh/certificates", post(mesh_certificate::<S>))
        .route("/api/v1/history", get(history_all::<S>))
        .route("/api/v1/diff", get(diff::<S>))
        .route("/api/v1/rollback", post(rollback::<S>))
        .route("/api/v1/apply", post(apply::<S>))
        .route("/api/v1/openapi.json", get(openapi_export::<S>))
        .route("/api/v1/import/openapi", post(openapi_import::<S>))
        .route(
            "/api/v1/releases",
            get(releases::<S>).post(release_start::<S>),
        )
        .route("/api/v1/releases/{name}", get(release_one::<S>))
        .route(
            "/api/v1/releases/{name}/promote",
            post(release_promote::<S>),
        )
        .route(
            "/api/v1/releases/{name}/rollback",
            post(release_rollback::<S>),
        )
        .route("/api/v1/{kind}", get(list::<S>).post(create::<S>))
        .route(
            "/api/v1/{kind}/{name}",
            get(read::<S>).put(replace::<S>).delete(remove::<S>),
        )
        .route("/api/v1/{kind}/{name}/history", get(history_one::<S>))
        .route("/api/v1/{kind}/{name}/rollback", post(rollback::<S>))
        .route("/api/v1/{kind}/{name}/lifecycle", post(lifecycle::<S>))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint") })
        .layer(middleware::from_fn_with_state(ctx.clone(), auth::<S>))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // Added after the admin token's layer: the service checks the node token.
        .route_service("/meshgate.control.v1.Push/{*method}", grpc)
        .with_state(ctx)
}

async fn auth<S: Store>(State(ctx): State<Arc<Ctx<S>>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !crate::bearer_is(given, &ctx.token) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer TOKEN)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    next.run(req).await
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

impl IntoResponse for WriteError {
    fn into_response(self) -> Response {
        match self {
            WriteError::Invalid(diags) => {
                let list: Vec<String> = diags.iter().map(ToString::to_string).collect();
                let body = json!({"error": {
                    "code": "invalid_config",
                    "message": format!("the config would be invalid: {} problem(s); nothing was written", list.len()),
                    "diagnostics": list,
                }});
                (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
            }
            WriteError::NotFound(k) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{k} does not exist"),
            ),
            WriteError::Exists(k) => error(
                StatusCode::CONFLICT,
                "already_exists",
                format!("{k} already exists"),
            ),
            WriteError::BadRequest(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
            WriteError::Store(StoreError::NoRevision(r, newest)) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no revision {r} (the newest is {newest})"),
            ),
            WriteError::Store(e) => {
                tracing::error!(error = %e, "store failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    e.to_string(),
                )
            }
        }
    }
}

type Answer = Result<Response, WriteError>;

fn kind_of(s: &str) -> Result<Kind, WriteError> {
    Kind::parse(s).ok_or_else(|| {
        WriteError::BadRequest(format!(
            "unknown kind {s:?} (apis, services, consumers, gateways, policies)"
        ))
    })
}

fn meta(headers: &HeaderMap) -> Meta {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let author = h("x-meshgate-author");
    Meta {
        author: if author.is_empty() {
            "admin".into()
        } else {
            author
        },
        message: h("x-meshgate-message"),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Flags {
    #[serde(default)]
    dry_run: bool,
    revision: Option<u64>,
}

fn written(w: Written, status: StatusCode) -> Response {
    (status, axum::Json(written_json(w))).into_response()
}

/// What a write answers: the revision, whether it was dry, and the changes.
fn written_json(w: Written) -> Value {
    json!({"revision": w.revision, "dryRun": w.dry_run, "changes": w.changes})
}

/// Run a write with the request's author, message and `dryRun`.
async fn write<S: Store>(
    ctx: &Ctx<S>,
    headers: &HeaderMap,
    f: Flags,
    w: Write,
    status: StatusCode,
) -> Answer {
    let w = Write {
        dry_run: f.dry_run,
        ..w
    };
    Ok(written(ctx.plane.write(meta(headers), w).await?, status))
}

fn item(r: &crate::plane::Read) -> Value {
    json!({"revision": r.revision, "resource": r.json})
}

async fn revision<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Answer {
    let rev = ctx.plane.revision().await?;
    Ok(axum::Json(json!({"revision": rev})).into_response())
}

/// Every registered instance, by service.
async fn registry<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Response {
    axum::Json(json!({"items": ctx.push.registry.list(None)})).into_response()
}

/// One service's registered instances (an empty list for a service with none).
async fn registry_one<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path(service): Path<String>,
) -> Response {
    axum::Json(json!({"items": ctx.push.registry.list(Some(&service))})).into_response()
}

/// The mesh's root certificate (PEM): what a workload outside meshgate trusts
/// mesh certificates with.
async fn mesh_ca<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Response {
    let ca = &ctx.push.ca;
    axum::Json(json!({"trustDomain": ca.trust_domain, "root": ca.root_pem})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    /// The PKCS#10 request, PEM.
    csr: String,
    /// The service whose identity the certificate names.
    service: String,
}

/// Sign a certificate for a service's workload that does not run a meshgate
/// proxy (or for tooling): the admin token vouches for the identity.
async fn mesh_certificate<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    body: axum::body::Bytes,
) -> Response {
    use rustls_pki_types::pem::PemObject as _;
    let req: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("send JSON {{\"csr\": PEM, \"service\": NAME}}: {e}"),
            );
        }
    };
    if !meshgate_config::valid_name(&req.service) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "service: a resource name (lower-case letters, digits, '-', '.')",
        );
    }
    let der =
        match rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(req.csr.as_bytes()) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("csr: {e}")),
        };
    let ca = &ctx.push.ca;
    match ca.sign(der.as_ref(), &ca.service_id(&req.service)) {
        Ok(issued) => {
            let not_after = jiff::Timestamp::try_from(issued.not_after)
                .map(|t| t.to_string())
                .unwrap_or_default();
            axum::Json(json!({
                "certificate": issued.pem,
                "root": ca.root_pem,
                "spiffeId": issued.spiffe_id,
                "notAfter": not_after,
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", e),
    }
}

async fn nodes<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Response {
    let revision = ctx.push.current().revision;
    let items = ctx.push.all_nodes().await;
    axum::Json(json!({"revision": revision, "items": items})).into_response()
}

async fn list<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path(kind): Path<String>,
    Query(f): Query<Flags>,
) -> Answer {
    let (rev, items) = ctx.plane.get(kind_of(&kind)?, None, f.revision).await?;
    let items: Vec<Value> = items.iter().map(item).collect();
    Ok(axum::Json(json!({"revision": rev, "items": items})).into_response())
}

async fn read<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path((kind, name)): Path<(String, String)>,
    Query(f): Query<Flags>,
) -> Answer {
    let (_, items) = ctx
        .plane
        .get(kind_of(&kind)?, Some(&name), f.revision)
        .await?;
    let first = items.first().map(item).unwrap_or(Value::Null);
    Ok(axum::Json(first).into_response())
}

/// One resource from a request body, which must hold exactly `want` (when given).
fn one_document(
    body: String,
    want: Option<(Kind, &str)>,
    kind: Kind,
) -> Result<Source, WriteError> {
    let source = Source {
        file: "request".into(),
        text: body,
    };
    let docs = meshgate_config::documents(&source).map_err(WriteError::Invalid)?;
    let [doc] = docs.as_slice() else {
        return Err(WriteError::BadRequest(format!(
            "the body must hold exactly one resource, not {}",
            docs.len()
        )));
    };
    if doc.kind != kind {
        return Err(WriteError::BadRequest(format!(
            "the body is a {}, not a {}",
            doc.kind.as_str(),
            kind.as_str()
        )));
    }
    if let Some((_, name)) = want
        && doc.name != name
    {
        return Err(WriteError::BadRequest(format!(
            "the body names {:?}, the path {name:?}",
            doc.name
        )));
    }
    Ok(source)
}

async fn create<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path(kind): Path<String>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let kind = kind_of(&kind)?;
    let source = one_document(body, None, kind)?;
    let w = Write {
        files: vec![source],
        create_only: true,
        ..Write::default()
    };
    write(&ctx, &headers, f, w, StatusCode::CREATED).await
}

async fn replace<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path((kind, name)): Path<(String, String)>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let kind = kind_of(&kind)?;
    let source = one_document(body, Some((kind, &name)), kind)?;
    let w = Write {
        files: vec![source],
        ..Write::default()
    };
    write(&ctx, &headers, f, w, StatusCode::OK).await
}

async fn remove<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path((kind, name)): Path<(String, String)>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
) -> Answer {
    let w = Write {
        deletes: vec![key(kind_of(&kind)?, &name)],
        ..Write::default()
    };
    write(&ctx, &headers, f, w, StatusCode::OK).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    #[serde(default)]
    files: Vec<FileBody>,
    #[serde(default)]
    delete: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    name: String,
    text: String,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, WriteError> {
    serde_json::from_str(body).map_err(|e| WriteError::BadRequest(format!("request body: {e}")))
}

async fn apply<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let b: ApplyBody = json_body(&body)?;
    let mut deletes = Vec::new();
    for d in &b.delete {
        let (kind, name) = d
            .split_once('/')
            .ok_or_else(|| WriteError::BadRequest(format!("{d:?}: delete takes Kind/name")))?;
        deletes.push(key(kind_of(kind)?, name));
    }
    let files = b
        .files
        .into_iter()
        .map(|f| Source {
            file: f.name.into(),
            text: f.text,
        })
        .collect();
    let w = Write {
        files,
        deletes,
        ..Write::default()
    };
    write(&ctx, &headers, f, w, StatusCode::OK).await
}

fn commits(list: Vec<crate::store::Commit>) -> Response {
    let items: Vec<Value> = list
        .into_iter()
        .map(|c| {
            let time = jiff::Timestamp::from_second(c.time)
                .map(|t| t.to_string())
                .unwrap_or_default();
            json!({
                "revision": c.revision,
                "author": c.author,
                "message": c.message,
                "time": time,
                "changes": c.changes,
            })
        })
        .collect();
    axum::Json(json!({"items": items})).into_response()
}

async fn history_all<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Answer {
    Ok(commits(ctx.plane.history(None, HISTORY_LIMIT).await?))
}

async fn history_one<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path((kind, name)): Path<(String, String)>,
) -> Answer {
    let k = key(kind_of(&kind)?, &name);
    Ok(commits(ctx.plane.history(Some(&k), HISTORY_LIMIT).await?))
}

#[derive(Debug, Deserialize)]
struct DiffQuery {
    from: u64,
    to: Option<u64>,
    kind: Option<String>,
    name: Option<String>,
}

async fn diff<S: Store>(State(ctx): State<Arc<Ctx<S>>>, Query(q): Query<DiffQuery>) -> Answer {
    let only = match (&q.kind, &q.name) {
        (Some(k), Some(n)) => Some(key(kind_of(k)?, n)),
        (None, None) => None,
        _ => {
            return Err(WriteError::BadRequest(
                "diff of one resource takes both kind and name".into(),
            ));
        }
    };
    let diffs = ctx.plane.diff(q.from, q.to, only.as_deref()).await?;
    Ok(axum::Json(json!({"from": q.from, "to": q.to, "items": diffs})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    to: u64,
}

/// `POST /api/v1/rollback` (the whole config) and `POST /api/v1/{kind}/{name}/rollback`.
async fn rollback<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    one: Option<Path<(String, String)>>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let only = match one {
        Some(Path((kind, name))) => Some(key(kind_of(&kind)?, &name)),
        None => None,
    };
    let b: RollbackBody = json_body(&body)?;
    let w = ctx
        .plane
        .rollback(meta(&headers), b.to, only, f.dry_run)
        .await?;
    Ok(written(w, StatusCode::OK))
}

async fn lifecycle<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path((kind, name)): Path<(String, String)>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    if kind_of(&kind)? != Kind::Api {
        return Err(WriteError::BadRequest(
            "only Apis have a lifecycle: POST /api/v1/apis/NAME/lifecycle".into(),
        ));
    }
    let change: crate::plane::StageChange = json_body(&body)?;
    let w = ctx
        .plane
        .lifecycle(meta(&headers), &name, change, f.dry_run)
        .await?;
    Ok(written(w, StatusCode::OK))
}

async fn releases<S: Store>(State(ctx): State<Arc<Ctx<S>>>) -> Answer {
    let (revision, list) = crate::release::list(&ctx.plane).await?;
    let nodes = ctx.push.all_nodes().await;
    let items: Vec<Value> = list
        .iter()
        .map(|r| crate::release::status(r, &nodes, &ctx.push.observed))
        .collect();
    Ok(axum::Json(json!({"revision": revision, "items": items})).into_response())
}

async fn release_one<S: Store>(State(ctx): State<Arc<Ctx<S>>>, Path(name): Path<String>) -> Answer {
    let (_, list) = crate::release::list(&ctx.plane).await?;
    let r = list
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| WriteError::NotFound(key(Kind::Api, &name)))?;
    let nodes = ctx.push.all_nodes().await;
    Ok(axum::Json(crate::release::status(r, &nodes, &ctx.push.observed)).into_response())
}

async fn release_start<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let start: crate::release::Start = json_body(&body)?;
    let (name, w) = crate::release::start(&ctx.plane, meta(&headers), start, f.dry_run).await?;
    let mut resp = written(w, StatusCode::CREATED);
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("/api/v1/releases/{name}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn release_promote<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path(name): Path<String>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
) -> Answer {
    let w = crate::release::promote(&ctx.plane, meta(&headers), &name, f.dry_run).await?;
    Ok(written(w, StatusCode::OK))
}

async fn release_rollback<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Path(name): Path<String>,
    Query(f): Query<Flags>,
    headers: HeaderMap,
) -> Answer {
    let w = crate::release::roll_back(&ctx.plane, meta(&headers), &name, f.dry_run).await?;
    Ok(written(w, StatusCode::OK))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenApiQuery {
    gateway: Option<String>,
    service: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn openapi_export<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Query(q): Query<OpenApiQuery>,
) -> Answer {
    let config = ctx.plane.store().load(None).await?;
    let resources = crate::openapi::Resources::from_texts(
        config
            .resources
            .iter()
            .map(|(k, s)| (k.as_str(), s.text.as_str())),
    );
    let doc = crate::openapi::export(
        &resources,
        q.gateway.as_deref(),
        &config.revision.to_string(),
    )
    .map_err(|_| WriteError::NotFound(key(Kind::Gateway, q.gateway.as_deref().unwrap_or(""))))?;
    Ok(axum::Json(doc).into_response())
}

async fn openapi_import<S: Store>(
    State(ctx): State<Arc<Ctx<S>>>,
    Query(q): Query<OpenApiQuery>,
    headers: HeaderMap,
    body: String,
) -> Answer {
    let imported =
        crate::openapi::import(&body, q.service.as_deref()).map_err(WriteError::BadRequest)?;
    let files = imported
        .apis
        .iter()
        .map(|(name, text)| crate::store::source(&key(Kind::Api, name), text))
        .collect();
    let mut m = meta(&headers);
    if m.message.is_empty() {
        m.message = format!("import {} Apis from OpenAPI", imported.apis.len());
    }
    let w = Write {
        files,
        create_only: true,
        dry_run: q.dry_run,
        ..Write::default()
    };
    let mut answer = written_json(ctx.plane.write(m, w).await?);
    answer["skipped"] = json!(imported.skipped);
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}
