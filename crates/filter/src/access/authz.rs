//! `authz`: mesh authorization by the caller's workload identity, the SPIFFE ID
//! its mesh certificate proved (in the manner of Istio's AuthorizationPolicy).
//!
//! Rules name callers (`from`), methods and paths; a field left out matches
//! anything. A request matching a `deny` rule is refused; then, when there are
//! `allow` rules, a request must match one of them. A caller with no verified
//! identity (plaintext) matches no `from` entry, so it passes only rules without
//! one.

use crate::registry::BuildError;
use crate::{Filter, Flow, Step};
use http::Method;
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    allow: Vec<RuleConfig>,
    #[serde(default)]
    deny: Vec<RuleConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleConfig {
    /// SPIFFE IDs; `PREFIX*` matches IDs starting with PREFIX; `*` any
    /// verified identity.
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    /// Exact paths, or `PREFIX*`.
    #[serde(default)]
    paths: Vec<String>,
}

/// An exact string, or a prefix (written with a trailing `*`).
#[derive(Debug)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn new(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(p) => Self::Prefix(p.to_string()),
            None => Self::Exact(s.to_string()),
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<Pattern>,
    methods: Vec<Method>,
    paths: Vec<Pattern>,
}

impl Rule {
    fn build(field: &str, c: &RuleConfig) -> Result<Self, BuildError> {
        for (i, f) in c.from.iter().enumerate() {
            if f != "*" && !f.starts_with("spiffe://") {
                return Err(BuildError::new(
                    format!("config.{field}.from.{i}"),
                    format!(
                        "{f:?}: give a SPIFFE ID (spiffe://TRUST_DOMAIN/svc/NAME), a prefix ending in '*', or '*'"
                    ),
                ));
            }
        }
        for (i, p) in c.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(BuildError::new(
                    format!("config.{field}.paths.{i}"),
                    format!("{p:?}: a path starts with '/'"),
                ));
            }
        }
        let methods = c
            .methods
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                    BuildError::new(
                        format!("config.{field}.methods.{i}"),
                        format!("{m:?} is not an HTTP method"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            from: c.from.iter().map(|f| Pattern::new(f)).collect(),
            methods,
            paths: c.paths.iter().map(|p| Pattern::new(p)).collect(),
        })
    }

    fn matches(&self, caller: Option<&str>, method: &Method, path: &str) -> bool {
        let from =
            self.from.is_empty() || caller.is_some_and(|c| self.from.iter().any(|p| p.matches(c)));
        from && (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

#[derive(Debug)]
pub struct Authz {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Authz {
    pub fn from_config(value: &serde_json::Value) -> Result<Self, BuildError> {
        let cfg: Config = crate::parse_config(value)?;
        super::allow_or_deny(&cfg.allow, &cfg.deny)?;
        let rules = |field: &str, list: &[RuleConfig]| {
            list.iter()
                .enumerate()
                .map(|(i, r)| Rule::build(&format!("{field}.{i}"), r))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            allow: rules("allow", &cfg.allow)?,
            deny: rules("deny", &cfg.deny)?,
        })
    }

    fn permits(&self, caller: Option<&str>, method: &Method, path: &str) -> bool {
        let hit = |rules: &[Rule]| rules.iter().any(|r| r.matches(caller, method, path));
        !hit(&self.deny) && (self.allow.is_empty() || hit(&self.allow))
    }
}

impl Filter for Authz {
    fn name(&self) -> &'static str {
        "authz"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        let caller = ctx.identity.as_deref();
        if self.permits(caller, &req.method, req.uri.path()) {
            return Step::Done(Ok(Flow::Continue));
        }
        let who = caller.unwrap_or("a caller without a mesh identity");
        Step::Done(Err(GatewayError::new(
            ErrorCode::Forbidden,
            format!(
                "{who} is not allowed to call {} {}",
                req.method,
                req.uri.path()
            ),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn authz(v: serde_json::Value) -> Authz {
        Authz::from_config(&v).unwrap_or_else(|e| panic!("{e}"))
    }

    const FRONT: Option<&str> = Some("spiffe://cluster.local/svc/front");
    const EVIL: Option<&str> = Some("spiffe://cluster.local/svc/evil");

    #[test]
    fn allow_list_admits_only_its_callers_methods_and_paths() {
        let a = authz(json!({"allow": [
            {"from": ["spiffe://cluster.local/svc/front"], "methods": ["get"], "paths": ["/orders/*"]},
            {"paths": ["/healthz"]},
        ]}));
        assert!(a.permits(FRONT, &Method::GET, "/orders/1"));
        assert!(!a.permits(FRONT, &Method::POST, "/orders/1"));
        assert!(!a.permits(FRONT, &Method::GET, "/users/1"));
        assert!(!a.permits(EVIL, &Method::GET, "/orders/1"));
        assert!(!a.permits(None, &Method::GET, "/orders/1"));
        // A rule without `from` admits anyone, even without an identity.
        assert!(a.permits(None, &Method::GET, "/healthz"));
    }

    #[test]
    fn deny_wins_and_star_means_any_verified_identity() {
        let a = authz(json!({
            "allow": [{"from": ["*"]}],
            "deny": [{"from": ["spiffe://cluster.local/svc/ev*"]}],
        }));
        assert!(a.permits(FRONT, &Method::GET, "/"));
        assert!(!a.permits(EVIL, &Method::GET, "/"));
        assert!(!a.permits(None, &Method::GET, "/"));
    }

    #[test]
    fn bad_config_says_where() {
        for (cfg, path) in [
            (json!({}), "config"),
            (
                json!({"allow": [{"from": ["front"]}]}),
                "config.allow.0.from.0",
            ),
            (
                json!({"deny": [{"paths": ["orders"]}]}),
                "config.deny.0.paths.0",
            ),
            (
                json!({"allow": [{"methods": ["GE T"]}]}),
                "config.allow.0.methods.0",
            ),
        ] {
            let e = Authz::from_config(&cfg)
                .err()
                .unwrap_or_else(|| panic!("{cfg} accepted"));
            assert_eq!(e.path, path, "{cfg}");
        }
    }
}
