use crate::BuildError;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The DSL shape of a header edit: `{set: {..}, add: {..}, remove: [..]}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOpsConfig {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Compiled header edits, applied remove → set → add.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

fn name(path: &str, n: &str) -> Result<HeaderName, BuildError> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| BuildError::new(path, format!("{n:?} is not a valid header name")))
}

fn pair(path: &str, n: &str, v: &str) -> Result<(HeaderName, HeaderValue), BuildError> {
    let value = HeaderValue::from_str(v)
        .map_err(|_| BuildError::new(format!("{path}.{n}"), "not a valid header value"))?;
    Ok((name(path, n)?, value))
}

impl HeaderOps {
    pub fn compile(cfg: &HeaderOpsConfig, path: &str) -> Result<Self, BuildError> {
        let set_path = format!("{path}.set");
        let add_path = format!("{path}.add");
        let remove_path = format!("{path}.remove");
        Ok(Self {
            set: cfg
                .set
                .iter()
                .map(|(n, v)| pair(&set_path, n, v))
                .collect::<Result<_, _>>()?,
            add: cfg
                .add
                .iter()
                .map(|(n, v)| pair(&add_path, n, v))
                .collect::<Result<_, _>>()?,
            remove: cfg
                .remove
                .iter()
                .map(|n| name(&remove_path, n))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}
