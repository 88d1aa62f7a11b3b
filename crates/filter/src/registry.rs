use crate::Filter;
use crate::consumers::ConsumerSet;
use std::fmt;
use std::sync::Arc;

/// A problem with one filter's config: `path` is relative to the filter's entry
/// (`config.request.headers.set`), so the config loader can place it on a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Filters the SPEC names that later work will add; naming one is a clear error
/// until it exists, never a silent no-op.
const PLANNED: &[&str] = &["waf"];

const BUILT: &[&str] = &[
    "transform",
    "key-auth",
    "acl",
    "ip-restriction",
    "cors",
    "jwt",
    "hmac-auth",
    "oauth2-introspection",
    "rate-limit",
    "concurrency-limit",
    "cache",
    "fault",
    "quota",
    "mirror",
    "compress",
    "authz",
];

/// True for names that are built in or planned (used for "did you mean" style errors).
pub fn is_known(name: &str) -> bool {
    BUILT.contains(&name) || PLANNED.contains(&name)
}

/// What building a filter may consult besides its own config.
#[derive(Debug, Clone, Copy)]
pub struct BuildCtx<'a> {
    /// The Api's path captures, for templates.
    pub captures: &'a [Arc<str>],
    /// The snapshot's Consumers, for auth filters.
    pub consumers: &'a Arc<ConsumerSet>,
    /// Directory of the config file, for relative paths in filter configs.
    pub base: Option<&'a std::path::Path>,
    /// Where the filter is written (`Api/orders spec.filters.1`): stateful filters
    /// keep their state across reloads under this name and their config.
    pub site: &'a str,
    /// Names of the snapshot's Services, for filters that send to one (`mirror`).
    pub services: &'a std::collections::BTreeSet<String>,
}

/// Build a built-in filter from its config. The one place that knows every built-in:
/// adding a filter means adding an arm here.
pub fn build(
    name: &str,
    config: Option<&serde_json::Value>,
    ctx: BuildCtx<'_>,
) -> Result<Arc<dyn Filter>, BuildError> {
    let empty = serde_json::Value::Object(Default::default());
    let config = config.unwrap_or(&empty);
    match name {
        "transform" => Ok(Arc::new(crate::Transform::from_config(
            config,
            ctx.captures,
        )?)),
        "key-auth" => Ok(Arc::new(crate::auth::KeyAuth::from_config(
            config,
            ctx.consumers,
        )?)),
        "acl" => Ok(Arc::new(crate::auth::Acl::from_config(config)?)),
        "ip-restriction" => Ok(Arc::new(crate::access::IpRestriction::from_config(config)?)),
        "cors" => Ok(Arc::new(crate::access::Cors::from_config(config)?)),
        "authz" => Ok(Arc::new(crate::access::Authz::from_config(config)?)),
        "oauth2-introspection" => Ok(Arc::new(crate::auth::Introspection::from_config(
            config,
            ctx.consumers,
            ctx.base,
        )?)),
        "hmac-auth" => Ok(Arc::new(crate::auth::HmacAuth::from_config(
            config,
            ctx.consumers,
        )?)),
        "jwt" => Ok(Arc::new(crate::auth::Jwt::from_config(
            config,
            ctx.consumers,
            ctx.base,
        )?)),
        "rate-limit" => Ok(Arc::new(crate::traffic::RateLimit::from_config(
            config, ctx,
        )?)),
        "concurrency-limit" => Ok(Arc::new(crate::traffic::ConcurrencyLimit::from_config(
            config, ctx,
        )?)),
        "cache" => Ok(Arc::new(crate::traffic::Cache::from_config(config, ctx)?)),
        "fault" => Ok(Arc::new(crate::traffic::Fault::from_config(config, ctx)?)),
        "quota" => Ok(Arc::new(crate::traffic::Quota::from_config(config, ctx)?)),
        "mirror" => Ok(Arc::new(crate::traffic::Mirror::from_config(config, ctx)?)),
        "compress" => Ok(Arc::new(crate::compress::Compress::from_config(config)?)),
        n if PLANNED.contains(&n) => Err(BuildError::new(
            "name",
            format!("filter {n:?} is not built yet in this version of meshgate"),
        )),
        n => Err(BuildError::new(
            "name",
            format!("unknown filter {n:?} (built in: {})", BUILT.join(", ")),
        )),
    }
}
