use super::Transform;
use crate::BuildError;
use crate::header_ops::{HeaderOps, HeaderOpsConfig};
use meshgate_route::RewriteTemplate;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransformConfig {
    #[serde(default)]
    pub request: RequestTransform,
    #[serde(default)]
    pub response: ResponseTransform,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestTransform {
    #[serde(default)]
    pub headers: HeaderOpsConfig,
    #[serde(default)]
    pub query: QueryOps,
    /// A rewrite template; captures are checked when the Api is linked.
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseTransform {
    #[serde(default)]
    pub headers: HeaderOpsConfig,
}

const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'<')
    .add(b'>')
    .add(b'%');

impl TransformConfig {
    pub fn compile(&self, captures: &[Arc<str>]) -> Result<Transform, BuildError> {
        let path = match &self.request.path {
            None => None,
            Some(p) => Some(
                RewriteTemplate::parse(p, captures)
                    .map_err(|e| BuildError::new("config.request.path", e.to_string()))?,
            ),
        };
        Ok(Transform {
            request_headers: HeaderOps::compile(&self.request.headers, "config.request.headers")?,
            query_set: self
                .request
                .query
                .set
                .iter()
                .map(|(k, v)| {
                    (
                        utf8_percent_encode(k, QUERY).to_string(),
                        utf8_percent_encode(v, QUERY).to_string(),
                    )
                })
                .collect(),
            query_remove: self.request.query.remove.clone(),
            path,
            response_headers: HeaderOps::compile(
                &self.response.headers,
                "config.response.headers",
            )?,
        })
    }
}
