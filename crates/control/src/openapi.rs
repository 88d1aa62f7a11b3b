//! OpenAPI 3.1 from the published Apis ([`export`]), and draft Apis from an
//! OpenAPI 3.x document ([`import`]).
//!
//! Export maps, per Api: the path template (`{*rest}` becomes `{rest}`), each
//! method an operation (no methods: get, put, post, delete and patch), path
//! captures, `request.params` and `request.headers` as parameters,
//! `request.body.schema` as a JSON request body, a mock's status and body as the
//! response, the auth filters (the Api's, its Policies', and with a gateway the
//! gateway's) as security schemes, and the gateway's own error answers (401, 429,
//! 400) with the SPEC's error shape. Drafts, offline Apis and grey releases are left
//! out; deprecated Apis are marked `deprecated`.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// HTTP methods an OpenAPI path item has fields for.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// What an Api without `methods` (any method) is listed under.
const ANY_METHOD: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// The resources an export reads, by kind: the parsed YAML of each.
#[derive(Debug, Default)]
pub struct Resources {
    pub apis: Vec<Value>,
    pub policies: BTreeMap<String, Value>,
    pub gateways: BTreeMap<String, Value>,
}

impl Resources {
    /// Read the stored texts of a config (Apis, Policies and Gateways only).
    pub fn from_texts<'a>(texts: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut out = Self::default();
        for (key, text) in texts {
            let Some((kind, name)) = key.split_once('/') else {
                continue;
            };
            if !matches!(kind, "Api" | "Policy" | "Gateway") {
                continue;
            }
            let Ok(v) = serde_saphyr::from_str::<Value>(text) else {
                continue;
            };
            match kind {
                "Api" => out.apis.push(v),
                "Policy" => {
                    out.policies.insert(name.to_string(), v);
                }
                _ => {
                    out.gateways.insert(name.to_string(), v);
                }
            }
        }
        out
    }
}

/// The OpenAPI 3.1 document of the published Apis (of one gateway, when given).
/// Errors only for an unknown gateway.
pub fn export(r: &Resources, gateway: Option<&str>, version: &str) -> Result<Value, String> {
    let globals: Vec<Value> = match gateway {
        Some(g) => {
            let gw = r
                .gateways
                .get(g)
                .ok_or_else(|| format!("unknown Gateway {g:?}"))?;
            gw["spec"]["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .flat_map(|p| policy_filters(r, p))
                .collect()
        }
        None => Vec::new(),
    };
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut schemes = Map::new();
    let mut unlisted = Vec::new();
    let mut apis: Vec<&Value> = r.apis.iter().collect();
    apis.sort_by(|a, b| {
        a["metadata"]["name"]
            .as_str()
            .cmp(&b["metadata"]["name"].as_str())
    });
    for api in apis {
        let name = api["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &api["spec"];
        let stage = spec["lifecycle"]["stage"].as_str().unwrap_or("published");
        if !spec["release"].is_null() || matches!(stage, "draft" | "offline") {
            continue;
        }
        if let (Some(g), Some(list)) = (gateway, spec["gateways"].as_array())
            && !list.is_empty()
            && !list.iter().any(|x| x.as_str() == Some(g))
        {
            continue;
        }
        let (path, captures) = openapi_path(spec["request"]["path"].as_str().unwrap_or("/"));
        let methods: Vec<String> = match spec["request"]["methods"].as_array() {
            Some(m) if !m.is_empty() => m
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect(),
            _ => ANY_METHOD.iter().map(|m| m.to_string()).collect(),
        };
        let mut filters: Vec<Value> = globals.clone();
        for f in spec["filters"].as_array().into_iter().flatten() {
            match f["policy"].as_str() {
                Some(p) => filters.extend(policy_filters(r, p)),
                None => filters.push(f.clone()),
            }
        }
        let security = security(&filters, &mut schemes);
        let several = methods.len() > 1;
        for method in methods {
            if !METHODS.contains(&method.as_str()) {
                unlisted.push(json!({"api": name, "reason": format!("method {} has no OpenAPI 3.1 field", method.to_uppercase())}));
                continue;
            }
            let item = paths.entry(path.clone()).or_default();
            if let Some(taken) = item.get(&method) {
                unlisted.push(json!({"api": name, "reason": format!(
                    "{} {path} is already listed for Api {} (the two differ by host or header)",
                    method.to_uppercase(), taken["x-meshgate-api"].as_str().unwrap_or(""))}));
                continue;
            }
            let mut op = operation(api, name, &method, &captures, &filters);
            op["operationId"] = if several {
                format!("{name}-{method}").into()
            } else {
                name.into()
            };
            if !security.is_empty() {
                op["security"] = Value::Array(security.clone());
            }
            item.insert(method, op);
        }
    }
    let title = match gateway {
        Some(g) => format!("meshgate Gateway {g}"),
        None => "meshgate APIs".to_string(),
    };
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": {"Error": error_schema()},
            "securitySchemes": schemes,
        },
    });
    if !unlisted.is_empty() {
        doc["x-meshgate-unlisted"] = unlisted.into();
    }
    Ok(doc)
}

/// `/users/{id}/{*rest}` → (`/users/{id}/{rest}`, [id, rest]).
fn openapi_path(template: &str) -> (String, Vec<String>) {
    let mut captures = Vec::new();
    let path = template
        .split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(c) => {
                    let c = c.trim_start_matches('*');
                    captures.push(c.to_string());
                    format!("{{{c}}}")
                }
                None => seg.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/");
    (path, captures)
}

fn policy_filters(r: &Resources, name: &str) -> Vec<Value> {
    r.policies
        .get(name)
        .and_then(|p| p["spec"]["filters"].as_array())
        .cloned()
        .unwrap_or_default()
}

fn operation(
    api: &Value,
    name: &str,
    method: &str,
    captures: &[String],
    filters: &[Value],
) -> Value {
    let spec = &api["spec"];
    let request = &spec["request"];
    let mut params: Vec<Value> = Vec::new();
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut add = |p: Value| {
        let k = (
            p["name"].as_str().unwrap_or("").to_ascii_lowercase(),
            p["in"].as_str().unwrap_or("").to_string(),
        );
        if !seen.contains(&k) {
            seen.push(k);
            params.push(p);
        }
    };
    for p in request["params"].as_array().into_iter().flatten() {
        let loc = p["in"].as_str().unwrap_or("query");
        let mut schema = Map::new();
        schema.insert(
            "type".into(),
            p.get("type").cloned().unwrap_or("string".into()),
        );
        for k in [
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "pattern",
            "enum",
        ] {
            if let Some(v) = p.get(k) {
                schema.insert(k.into(), v.clone());
            }
        }
        let required = p["required"].as_bool().unwrap_or(loc == "path");
        add(
            json!({"name": p["name"], "in": loc, "required": required || loc == "path", "schema": schema}),
        );
    }
    for c in captures {
        add(json!({"name": c, "in": "path", "required": true, "schema": {"type": "string"}}));
    }
    for (h, re) in request["headers"].as_object().into_iter().flatten() {
        add(json!({"name": h, "in": "header", "required": true,
                   "schema": {"type": "string", "pattern": re}}));
    }
    let mut op = json!({
        "summary": name,
        "x-meshgate-api": name,
        "responses": responses(spec, filters),
    });
    if !params.is_empty() {
        op["parameters"] = params.into();
    }
    if let Some(schema) = request["body"].get("schema") {
        op["requestBody"] = json!({
            "required": matches!(method, "post" | "put" | "patch"),
            "content": {"application/json": {"schema": schema}},
        });
    }
    if let Some(team) = api["metadata"]["labels"]["team"].as_str() {
        op["tags"] = json!([team]);
    }
    if spec["lifecycle"]["stage"] == "deprecated" {
        op["deprecated"] = true.into();
    }
    op
}

fn responses(spec: &Value, filters: &[Value]) -> Value {
    let mut out = Map::new();
    let mock = &spec["invoke"]["mock"];
    if mock.is_object() {
        let status = mock["status"].as_u64().unwrap_or(200);
        let mut r = json!({"description": "Answered by the gateway (invoke.mock)"});
        match &mock["body"] {
            Value::Null => {}
            Value::String(s) => {
                let ct = mock["headers"]
                    .as_object()
                    .and_then(|h| {
                        h.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    })
                    .and_then(|(_, v)| v.as_str())
                    .unwrap_or("text/plain");
                r["content"] = json!({ct: {"example": s}});
            }
            body => r["content"] = json!({"application/json": {"example": body}}),
        }
        out.insert(status.to_string(), r);
    } else {
        out.insert(
            "default".into(),
            json!({"description": "The upstream service's answer"}),
        );
    }
    let error = |d: &str| {
        json!({"description": d,
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    };
    let names: Vec<&str> = filters.iter().filter_map(|f| f["name"].as_str()).collect();
    let has = |n: &[&str]| names.iter().any(|x| n.contains(x));
    if !spec["request"]["params"].is_null() || !spec["request"]["body"]["schema"].is_null() {
        out.insert(
            "400".into(),
            error("The request does not match its parameters or body schema"),
        );
    }
    if has(&["key-auth", "jwt", "hmac-auth", "oauth2-introspection"]) {
        out.insert("401".into(), error("No valid credential"));
    }
    if has(&["acl", "oauth2-introspection"]) {
        out.insert("403".into(), error("The caller is not allowed"));
    }
    if has(&["rate-limit", "quota"]) {
        out.insert(
            "429".into(),
            error("Too many requests (rate limit or quota)"),
        );
    }
    Value::Object(out)
}

/// The security requirements of an Api's auth filters (all of them must pass:
/// one requirement naming each; key-auth's query alternative makes a second), and
/// their schemes added to `schemes`.
fn security(filters: &[Value], schemes: &mut Map<String, Value>) -> Vec<Value> {
    let mut all: Vec<Map<String, Value>> = vec![Map::new()];
    for f in filters {
        let cfg = &f["config"];
        let mut options: Vec<(String, Value)> = Vec::new();
        match f["name"].as_str().unwrap_or("") {
            "key-auth" => {
                let header = cfg["header"].as_str().unwrap_or("x-api-key");
                options.push((
                    format!("keyAuth.{header}"),
                    json!({"type": "apiKey", "in": "header", "name": header}),
                ));
                if let Some(q) = cfg["query"].as_str() {
                    options.push((
                        format!("keyAuthQuery.{q}"),
                        json!({"type": "apiKey", "in": "query", "name": q}),
                    ));
                }
            }
            name @ ("jwt" | "oauth2-introspection") => {
                let header = cfg["header"].as_str().unwrap_or("authorization");
                let (key, scheme) = if header.eq_ignore_ascii_case("authorization") {
                    let mut s = json!({"type": "http", "scheme": "bearer"});
                    if name == "jwt" {
                        s["bearerFormat"] = "JWT".into();
                    }
                    (name.to_string(), s)
                } else {
                    (
                        format!("{name}.{header}"),
                        json!({"type": "apiKey", "in": "header", "name": header}),
                    )
                };
                options.push((key, scheme));
            }
            "hmac-auth" => options.push((
                "hmacSignature".into(),
                json!({"type": "apiKey", "in": "header", "name": "Signature",
                       "description": "RFC 9421 HTTP Message Signature (hmac-sha256) with Signature-Input; the keyid names a Consumer's hmac credential"}),
            )),
            _ => continue,
        }
        let mut next = Vec::new();
        for req in &all {
            for (key, scheme) in &options {
                schemes.insert(key.clone(), scheme.clone());
                let mut r = req.clone();
                r.insert(key.clone(), json!([]));
                next.push(r);
            }
        }
        all = next;
    }
    all.into_iter()
        .filter(|r| !r.is_empty())
        .map(Value::Object)
        .collect()
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "requestId": {"type": "string"},
            },
        }},
    })
}

/// What an import made: draft Apis, and the operations it left out and why.
#[derive(Debug, Default)]
pub struct Imported {
    /// (name, YAML document).
    pub apis: Vec<(String, String)>,
    pub skipped: Vec<String>,
}

/// Draft Apis from an OpenAPI 3.x document (JSON or YAML): one per operation, at
/// the first server's base path, with its path, query and header parameters and
/// its JSON body schema (`$ref`s to components inlined). They call `service` when
/// given; otherwise they answer with a mock of the first 2xx response and its
/// example, so they can be tried before the backend exists.
pub fn import(text: &str, service: Option<&str>) -> Result<Imported, String> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| format!("not JSON or YAML: {e}"))?;
    let version = doc["openapi"].as_str().unwrap_or("");
    if !version.starts_with("3.") {
        return Err(if doc["swagger"].is_null() {
            "not an OpenAPI document: it has no \"openapi: 3.x\" field".into()
        } else {
            "Swagger 2.0 is not supported: convert it to OpenAPI 3 first".into()
        });
    }
    let base = base_path(&doc);
    let mut out = Imported::default();
    let mut names: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let full = format!("{}{}", base, path);
        if let Some(bad) = full
            .split('/')
            .find(|s| s.contains(['{', '}']) && !(s.starts_with('{') && s.ends_with('}')))
        {
            for m in METHODS.iter().filter(|m| item.get(**m).is_some()) {
                out.skipped.push(format!(
                    "{} {path}: segment {bad:?} mixes a parameter with text; meshgate captures whole segments",
                    m.to_uppercase()
                ));
            }
            continue;
        }
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let mut name = match op["operationId"].as_str() {
                Some(id) => kebab(id),
                None => kebab(&format!("{method}-{path}")),
            };
            if name.is_empty() {
                name = format!("{method}-root");
            }
            let mut unique = name.clone();
            let mut n = 2;
            while names.contains(&unique) {
                unique = format!("{name}-{n}");
                n += 1;
            }
            names.push(unique.clone());
            let params = parameters(&doc, item, op);
            let mut request = json!({"path": full, "methods": [method.to_uppercase()]});
            if !params.is_empty() {
                request["params"] = params.into();
            }
            let body = op["requestBody"]
                .get("$ref")
                .and_then(Value::as_str)
                .map_or(&op["requestBody"], |r| lookup(&doc, r));
            if let Some(schema) = body["content"]["application/json"].get("schema") {
                request["body"] = json!({"schema": inline(&doc, schema, 0)});
            }
            let invoke = match service {
                Some(s) => json!({"service": s}),
                None => json!({"mock": mock(op)}),
            };
            let api = json!({
                "apiVersion": "meshgate.io/v1",
                "kind": "Api",
                "metadata": {"name": unique, "labels": {"source": "openapi"}},
                "spec": {
                    "request": request,
                    "invoke": invoke,
                    "lifecycle": {"stage": "draft"},
                },
            });
            let yaml = serde_saphyr::to_string(&api).map_err(|e| e.to_string())?;
            out.apis.push((unique, yaml));
        }
    }
    if out.apis.is_empty() && out.skipped.is_empty() {
        return Err("the document has no operations under paths".into());
    }
    Ok(out)
}

/// The path of the first server's URL, without a trailing slash ("" when none, or
/// when it has variables).
fn base_path(doc: &Value) -> String {
    let url = doc["servers"][0]["url"].as_str().unwrap_or("");
    if url.contains('{') {
        return String::new();
    }
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => url,
    };
    path.trim_end_matches('/').to_string()
}

fn kebab(s: &str) -> String {
    let mut out = String::new();
    let mut prev_lower = false;
    for c in s.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('-');
        }
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
            prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        } else {
            if !out.ends_with('-') {
                out.push('-');
            }
            prev_lower = false;
        }
    }
    let t = out.trim_matches('-');
    t.chars()
        .take(200)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// Path-item and operation parameters (the operation's win), as `request.params`.
fn parameters(doc: &Value, item: &Value, op: &Value) -> Vec<Value> {
    let mut by_key: BTreeMap<(String, String), Value> = BTreeMap::new();
    for p in item["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(op["parameters"].as_array().into_iter().flatten())
    {
        let p = p
            .get("$ref")
            .and_then(Value::as_str)
            .map_or(p, |r| lookup(doc, r));
        let (Some(name), Some(loc)) = (p["name"].as_str(), p["in"].as_str()) else {
            continue;
        };
        if !matches!(loc, "path" | "query" | "header") {
            continue;
        }
        let schema = inline(doc, &p["schema"], 0);
        let ty = schema["type"].as_str().unwrap_or("string");
        if !matches!(ty, "string" | "integer" | "number" | "boolean") {
            continue;
        }
        let mut out = json!({"name": name, "in": loc, "type": ty});
        if p["required"].as_bool() == Some(true) || loc == "path" {
            out["required"] = true.into();
        }
        for k in ["minimum", "maximum", "minLength", "maxLength", "pattern"] {
            if let Some(v) = schema.get(k) {
                out[k] = v.clone();
            }
        }
        if let Some(e) = schema["enum"].as_array() {
            let strings: Vec<String> = e
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
                .collect();
            out["enum"] = strings.into();
        }
        by_key.insert((loc.to_string(), name.to_string()), out);
    }
    by_key.into_values().collect()
}

/// A mock of the operation's first 2xx answer, with its JSON example when it has one.
fn mock(op: &Value) -> Value {
    let responses = op["responses"].as_object();
    let first = responses.and_then(|r| {
        r.iter()
            .filter(|(code, _)| code.starts_with('2'))
            .min_by(|a, b| a.0.cmp(b.0))
    });
    let status: u16 = first.and_then(|(c, _)| c.parse().ok()).unwrap_or(200);
    let mut m = json!({"status": status});
    if let Some((_, r)) = first {
        let media = &r["content"]["application/json"];
        let example = media.get("example").cloned().or_else(|| {
            media["examples"]
                .as_object()
                .and_then(|e| e.values().next())
                .and_then(|e| e.get("value").cloned())
        });
        if let Some(e) = example {
            m["body"] = e;
        }
    }
    m
}

/// A `#/...` JSON pointer into the document (`null` when it points nowhere).
fn lookup<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    reference
        .strip_prefix('#')
        .and_then(|p| doc.pointer(p))
        .unwrap_or(&Value::Null)
}

/// `schema` with local `$ref`s replaced by what they point at, to a depth of 16
/// (recursive schemas end there as `{}`, which accepts anything).
fn inline(doc: &Value, schema: &Value, depth: usize) -> Value {
    if depth > 16 {
        return json!({});
    }
    match schema {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str)
                && r.starts_with('#')
            {
                return inline(doc, lookup(doc, r), depth + 1);
            }
            Value::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), inline(doc, v, depth + 1)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| inline(doc, v, depth + 1)).collect()),
        v => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(kebab("getUserById"), "get-user-by-id");
        assert_eq!(kebab("get-/users/{id}"), "get-users-id");
        assert_eq!(kebab("List_Orders v2"), "list-orders-v2");
        assert_eq!(
            openapi_path("/files/{*rest}"),
            ("/files/{rest}".to_string(), vec!["rest".to_string()])
        );
        assert_eq!(
            base_path(&json!({"servers": [{"url": "https://api.example.com/v1/"}]})),
            "/v1"
        );
        assert_eq!(base_path(&json!({"servers": [{"url": "/api"}]})), "/api");
        assert_eq!(
            base_path(&json!({"servers": [{"url": "https://{env}.example.com/v1"}]})),
            ""
        );
    }

    #[test]
    fn key_auth_with_a_query_alternative_and_jwt_are_both_required() {
        let mut schemes = Map::new();
        let filters = vec![
            json!({"name": "key-auth", "config": {"query": "api_key"}}),
            json!({"name": "jwt", "config": {}}),
        ];
        let reqs = security(&filters, &mut schemes);
        assert_eq!(
            reqs,
            vec![
                json!({"keyAuth.x-api-key": [], "jwt": []}),
                json!({"keyAuthQuery.api_key": [], "jwt": []}),
            ]
        );
        assert_eq!(schemes["jwt"]["bearerFormat"], "JWT");
    }

    #[test]
    fn refs_are_inlined_and_recursion_stops() {
        let doc = json!({"components": {"schemas": {
            "Node": {"type": "object", "properties": {"next": {"$ref": "#/components/schemas/Node"}}},
        }}});
        let s = inline(&doc, &json!({"$ref": "#/components/schemas/Node"}), 0);
        assert_eq!(s["type"], "object");
        assert_eq!(s["properties"]["next"]["type"], "object");
    }
}
