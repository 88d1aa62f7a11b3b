//! `transform`: edit request headers, query and path on the way in, and response
//! headers on the way out.

mod config;
#[cfg(test)]
mod tests;

pub use config::TransformConfig;

use crate::{BuildError, Filter, Flow, HeaderOps, Step};
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use meshgate_route::RewriteTemplate;
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Transform {
    request_headers: HeaderOps,
    query_set: Vec<(String, String)>,
    query_remove: Vec<String>,
    path: Option<RewriteTemplate>,
    response_headers: HeaderOps,
}

impl Transform {
    pub fn from_config(
        value: &serde_json::Value,
        captures: &[Arc<str>],
    ) -> Result<Self, BuildError> {
        let cfg: TransformConfig = crate::parse_config(value)?;
        cfg.compile(captures)
    }

    /// Just response header edits: the Api's `response.headers`.
    pub fn response_headers(ops: HeaderOps) -> Self {
        Self {
            response_headers: ops,
            ..Self::default()
        }
    }

    fn edit_uri(
        &self,
        ctx: &RequestCtx,
        req: &mut http::request::Parts,
    ) -> Result<(), GatewayError> {
        if self.query_set.is_empty() && self.query_remove.is_empty() && self.path.is_none() {
            return Ok(());
        }
        let path = match &self.path {
            Some(t) => t.render(|n| ctx.capture(n)),
            None => req.uri.path().to_string(),
        };
        let mut pairs: Vec<(String, String)> = Vec::new();
        for kv in req
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let drop = self.query_remove.iter().any(|r| r == k)
                || self.query_set.iter().any(|(s, _)| s == k);
            if !drop {
                pairs.push((k.to_string(), v.to_string()));
            }
        }
        pairs.extend(self.query_set.iter().cloned());
        let mut pq = path;
        if !pairs.is_empty() {
            pq.push('?');
            let joined: Vec<String> = pairs
                .iter()
                .map(|(k, v)| {
                    if v.is_empty() {
                        k.clone()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect();
            pq.push_str(&joined.join("&"));
        }
        req.uri = crate::with_path_and_query(&req.uri, pq).map_err(|e| {
            GatewayError::new(
                ErrorCode::InvalidRequest,
                format!("transform produced a bad path: {e}"),
            )
        })?;
        Ok(())
    }
}

impl Filter for Transform {
    fn name(&self) -> &'static str {
        "transform"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        self.request_headers.apply(&mut req.headers);
        Step::Done(self.edit_uri(ctx, req).map(|()| Flow::Continue))
    }

    fn on_response(&self, _ctx: &RequestCtx, resp: &mut http::response::Parts) {
        self.response_headers.apply(&mut resp.headers);
    }
}
