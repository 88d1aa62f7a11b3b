//! `acl`: allow or deny by the authenticated Consumer's name or groups.

use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// Deny wins over allow. With an allow list, a Consumer must match it; with only a
/// deny list, every other Consumer passes. A request with no Consumer is 401: `acl`
/// must follow an auth filter.
#[derive(Debug)]
pub struct Acl {
    allow: Vec<String>,
    deny: Vec<String>,
}

impl Acl {
    pub fn from_config(value: &serde_json::Value) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        if cfg.allow.is_empty() && cfg.deny.is_empty() {
            return Err(BuildError::new(
                "config",
                "give allow or deny (Consumer groups or names)",
            ));
        }
        Ok(Self {
            allow: cfg.allow,
            deny: cfg.deny,
        })
    }
}

impl Filter for Acl {
    fn name(&self) -> &'static str {
        "acl"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        _req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let Some(c) = &ctx.consumer else {
            return Step::Done(Err(GatewayError::new(
                ErrorCode::Unauthorized,
                "authentication required",
            )));
        };
        let matches = |list: &[String]| {
            list.iter()
                .any(|e| *e == *c.name || c.groups.iter().any(|g| **g == **e))
        };
        if matches(&self.deny) || (!self.allow.is_empty() && !matches(&self.allow)) {
            return Step::Done(Err(GatewayError::new(
                ErrorCode::Forbidden,
                "this consumer may not call this API",
            )));
        }
        Step::Done(Ok(Flow::Continue))
    }
}
