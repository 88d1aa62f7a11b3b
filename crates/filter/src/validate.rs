//! Request validation from the Api's `request.params` and `request.body.schema`:
//! path, query and header parameters by type, bounds, enum and pattern; the body by
//! JSON Schema (draft 2020-12). It runs after the Api's filters, so callers that fail
//! authentication learn nothing about the API's shape. Failures are 400
//! `invalid_request` naming the parameter or the JSON pointer.

use crate::registry::BuildError;
use crate::{Filter, FilterResult, Flow, Step};
use bytes::Bytes;
use meshgate_core::{ErrorCode, GatewayError, RequestCtx};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParamConfig {
    name: String,
    #[serde(rename = "in")]
    location: Location,
    #[serde(default, rename = "type")]
    kind: Kind,
    #[serde(default)]
    required: Option<bool>,
    #[serde(default)]
    minimum: Option<f64>,
    #[serde(default)]
    maximum: Option<f64>,
    #[serde(default)]
    min_length: Option<usize>,
    #[serde(default)]
    max_length: Option<usize>,
    #[serde(default, rename = "enum")]
    one_of: Vec<serde_json::Value>,
    #[serde(default)]
    pattern: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Location {
    Path,
    Query,
    Header,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    String,
    Integer,
    Number,
    Boolean,
}

#[derive(Debug)]
struct Param {
    name: String,
    header: Option<http::HeaderName>,
    location: Location,
    kind: Kind,
    required: bool,
    minimum: Option<f64>,
    maximum: Option<f64>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    one_of: Vec<String>,
    pattern: Option<regex::Regex>,
}

pub struct RequestValidator {
    params: Vec<Param>,
    schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for RequestValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestValidator")
            .field("params", &self.params)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

fn invalid(message: String) -> GatewayError {
    GatewayError::new(ErrorCode::InvalidRequest, message)
}

impl Param {
    fn build(
        i: usize,
        p: ParamConfig,
        captures: &[std::sync::Arc<str>],
    ) -> Result<Self, BuildError> {
        let at = |f: &str| format!("params.{i}.{f}");
        if p.location == Location::Path && !captures.iter().any(|c| **c == *p.name) {
            return Err(BuildError::new(
                at("name"),
                format!("the path template has no capture {{{}}}", p.name),
            ));
        }
        let header = match p.location {
            Location::Header => Some(http::HeaderName::from_bytes(p.name.as_bytes()).map_err(
                |_| BuildError::new(at("name"), format!("{:?} is not a header name", p.name)),
            )?),
            _ => None,
        };
        let numeric = matches!(p.kind, Kind::Integer | Kind::Number);
        if (p.minimum.is_some() || p.maximum.is_some()) && !numeric {
            return Err(BuildError::new(
                at("minimum"),
                "minimum and maximum apply to integer and number parameters",
            ));
        }
        let pattern = p
            .pattern
            .as_deref()
            .map(|r| {
                regex::Regex::new(r).map_err(|e| {
                    BuildError::new(
                        at("pattern"),
                        format!("bad regex: {}", e.to_string().lines().last().unwrap_or("")),
                    )
                })
            })
            .transpose()?;
        let one_of = p
            .one_of
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        Ok(Self {
            required: p.required.unwrap_or(p.location == Location::Path),
            name: p.name,
            header,
            location: p.location,
            kind: p.kind,
            minimum: p.minimum,
            maximum: p.maximum,
            min_length: p.min_length,
            max_length: p.max_length,
            one_of,
            pattern,
        })
    }

    fn describe(&self) -> String {
        let place = match self.location {
            Location::Path => "path parameter",
            Location::Query => "query parameter",
            Location::Header => "header",
        };
        format!("{place} {:?}", self.name)
    }

    /// Check one value; the message says what was expected.
    fn check(&self, value: &str) -> Result<(), String> {
        let number = match self.kind {
            Kind::String => None,
            Kind::Integer => Some(
                value
                    .parse::<i64>()
                    .map_err(|_| "must be an integer".to_string())? as f64,
            ),
            Kind::Number => Some(
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .ok_or("must be a number")?,
            ),
            Kind::Boolean => {
                if value != "true" && value != "false" {
                    return Err("must be true or false".into());
                }
                None
            }
        };
        if let Some(n) = number {
            if self.minimum.is_some_and(|m| n < m) {
                return Err(format!(
                    "must be at least {}",
                    self.minimum.unwrap_or_default()
                ));
            }
            if self.maximum.is_some_and(|m| n > m) {
                return Err(format!(
                    "must be at most {}",
                    self.maximum.unwrap_or_default()
                ));
            }
        }
        let chars = value.chars().count();
        if self.min_length.is_some_and(|m| chars < m) {
            return Err(format!(
                "must be at least {} characters",
                self.min_length.unwrap_or_default()
            ));
        }
        if self.max_length.is_some_and(|m| chars > m) {
            return Err(format!(
                "must be at most {} characters",
                self.max_length.unwrap_or_default()
            ));
        }
        if !self.one_of.is_empty() && !self.one_of.iter().any(|o| o == value) {
            return Err(format!("must be one of {}", self.one_of.join(", ")));
        }
        if let Some(p) = &self.pattern
            && !p.is_match(value)
        {
            return Err(format!("must match {}", p.as_str()));
        }
        Ok(())
    }

    fn values(
        &self,
        ctx: &RequestCtx,
        req: &http::request::Parts,
    ) -> Result<Vec<String>, GatewayError> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| invalid(format!("{} is not valid UTF-8", self.describe())))
        };
        match self.location {
            Location::Path => ctx.capture(&self.name).map(decode).into_iter().collect(),
            Location::Query => crate::query_values(req.uri.query().unwrap_or(""), &self.name)
                .map(|v| {
                    String::from_utf8(v)
                        .map_err(|_| invalid(format!("{} is not valid UTF-8", self.describe())))
                })
                .collect(),
            Location::Header => req
                .headers
                .get_all(self.header.as_ref().map_or("", |h| h.as_str()))
                .iter()
                .map(|v| {
                    v.to_str()
                        .map(String::from)
                        .map_err(|_| invalid(format!("{} is not ASCII", self.describe())))
                })
                .collect(),
        }
    }
}

impl RequestValidator {
    /// Build from `request.params` and `request.body.schema`; `None` when there is
    /// nothing to check. Error paths are relative to `spec.request`.
    pub fn from_spec(
        params: Option<&serde_json::Value>,
        schema: Option<&serde_json::Value>,
        captures: &[std::sync::Arc<str>],
    ) -> Result<Option<Self>, BuildError> {
        let list: Vec<ParamConfig> = match params {
            None => Vec::new(),
            Some(v) => Vec::<ParamConfig>::deserialize(v)
                .map_err(|e| BuildError::new("params", e.to_string()))?,
        };
        let params = list
            .into_iter()
            .enumerate()
            .map(|(i, p)| Param::build(i, p, captures))
            .collect::<Result<Vec<_>, _>>()?;
        let schema = schema
            .map(|s| {
                jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .with_pattern_options(jsonschema::PatternOptions::regex())
                    .build(s)
                    .map_err(|e| {
                        BuildError::new("body.schema", format!("not a valid JSON Schema: {e}"))
                    })
            })
            .transpose()?;
        if params.is_empty() && schema.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { params, schema }))
    }
}

impl Filter for RequestValidator {
    fn name(&self) -> &'static str {
        "request-validation"
    }

    fn on_request<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        req: &'a mut http::request::Parts,
    ) -> Step<'a> {
        for p in &self.params {
            let values = match p.values(ctx, req) {
                Ok(v) => v,
                Err(e) => return Step::Done(Err(e)),
            };
            if values.is_empty() && p.required {
                return Step::Done(Err(invalid(format!("{} is required", p.describe()))));
            }
            for v in &values {
                if let Err(why) = p.check(v) {
                    return Step::Done(Err(invalid(format!("{} {why}", p.describe()))));
                }
            }
        }
        Step::Done(Ok(Flow::Continue))
    }

    fn wants_body(&self) -> bool {
        self.schema.is_some()
    }

    /// The schema applies to every body sent; an empty body is refused only for the
    /// methods that exist to carry one (POST, PUT, PATCH).
    fn on_body(
        &self,
        _ctx: &mut RequestCtx,
        req: &http::request::Parts,
        body: &Bytes,
    ) -> FilterResult {
        let Some(schema) = &self.schema else {
            return Ok(Flow::Continue);
        };
        if body.is_empty() {
            let carries = matches!(
                req.method,
                http::Method::POST | http::Method::PUT | http::Method::PATCH
            );
            if !carries {
                return Ok(Flow::Continue);
            }
            return Err(invalid("a JSON request body is required".into()));
        }
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("request body is not valid JSON: {e}")))?;
        if let Err(e) = schema.validate(&doc) {
            let at = e.instance_path().as_str().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            return Err(invalid(format!("request body at {at}: {e}")));
        }
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::RequestId;
    use serde_json::json;
    use std::sync::Arc;

    fn validator(params: serde_json::Value, schema: Option<serde_json::Value>) -> RequestValidator {
        RequestValidator::from_spec(Some(&params), schema.as_ref(), &["id".into()])
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("nothing to check"))
    }

    fn run(v: &RequestValidator, uri: &str, id: &str) -> Result<(), String> {
        let (mut parts, ()) = http::Request::builder()
            .uri(uri)
            .header("x-tenant", "acme")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts();
        let mut ctx = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
        ctx.captures = [(Arc::from("id"), id.to_string())].into_iter().collect();
        match v.on_request(&mut ctx, &mut parts) {
            Step::Done(Ok(_)) => Ok(()),
            Step::Done(Err(e)) => Err(e.message.to_string()),
            Step::Pending(_) => panic!("validation never waits"),
        }
    }

    #[test]
    fn params_by_type_bounds_enum_and_pattern() {
        let v = validator(
            json!([
                {"name": "id", "in": "path", "type": "integer", "minimum": 1},
                {"name": "verbose", "in": "query", "type": "boolean"},
                {"name": "sort", "in": "query", "enum": ["asc", "desc"]},
                {"name": "x-tenant", "in": "header", "pattern": "^[a-z]+$", "required": true},
            ]),
            None,
        );
        assert_eq!(run(&v, "/u/7?verbose=true&sort=asc", "7"), Ok(()));
        let err = |uri: &str, id: &str| run(&v, uri, id).err().unwrap_or_default();
        assert!(err("/u/0", "0").contains("path parameter \"id\" must be at least 1"));
        assert!(err("/u/x", "x").contains("must be an integer"));
        assert!(
            err("/u/7?verbose=yes", "7")
                .contains("query parameter \"verbose\" must be true or false")
        );
        assert!(err("/u/7?sort=up", "7").contains("must be one of asc, desc"));
        assert!(err("/u/7?verbose=true&verbose=1", "7").contains("verbose"));
    }

    #[test]
    fn body_schema_names_the_pointer() {
        let v = validator(
            json!([]),
            Some(json!({
                "type": "object",
                "required": ["items"],
                "properties": {"items": {"type": "array", "items": {"type": "object",
                    "properties": {"price": {"type": "number", "minimum": 0}}}}}
            })),
        );
        let mut ctx = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
        let (parts, ()) = http::Request::post("/")
            .body(())
            .unwrap_or_else(|e| panic!("{e}"))
            .into_parts();
        let body = |s: &str| v.on_body(&mut ctx.clone(), &parts, &Bytes::from(s.to_string()));
        assert!(body(r#"{"items": [{"price": 1}]}"#).is_ok());
        let e = body(r#"{"items": [{"price": -1}]}"#)
            .err()
            .map(|e| e.message.to_string())
            .unwrap_or_default();
        assert!(e.contains("/items/0/price"), "{e}");
        let e = body("{nope")
            .err()
            .map(|e| e.message.to_string())
            .unwrap_or_default();
        assert!(e.contains("not valid JSON"), "{e}");
        ctx.api = None;
    }

    #[test]
    fn bad_specs_name_the_field() {
        let e =
            RequestValidator::from_spec(Some(&json!([{"name": "nope", "in": "path"}])), None, &[])
                .err()
                .map(|e| e.path);
        assert_eq!(e.as_deref(), Some("params.0.name"));
        let e = RequestValidator::from_spec(None, Some(&json!({"type": 12})), &[])
            .err()
            .map(|e| e.path);
        assert_eq!(e.as_deref(), Some("body.schema"));
    }
}
