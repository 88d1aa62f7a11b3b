use super::*;
use meshgate_core::RequestId;

fn ctx() -> RequestCtx {
    let mut c = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
    c.captures.push(("id".into(), "42".into()));
    c
}

fn req(uri: &str) -> http::request::Parts {
    let (parts, ()) = http::Request::builder()
        .uri(uri)
        .header("x-drop", "1")
        .header("x-keep", "1")
        .body(())
        .map(|r| r.into_parts())
        .unwrap_or_else(|e| panic!("{e}"));
    parts
}

#[test]
fn edits_headers_query_and_path() {
    let cfg = serde_json::json!({
        "request": {
            "headers": {"set": {"x-set": "a"}, "add": {"x-keep": "2"}, "remove": ["x-drop"]},
            "query": {"set": {"v": "a b"}, "remove": ["secret"]},
            "path": "/internal/{id}"
        },
        "response": {"headers": {"set": {"x-out": "1"}}}
    });
    let t = Transform::from_config(&cfg, &["id".into()]).unwrap_or_else(|e| panic!("{e}"));
    let mut c = ctx();
    let mut r = req("/users/42?secret=1&keep=2&v=old");
    assert!(matches!(
        t.on_request(&mut c, &mut r),
        Step::Done(Ok(Flow::Continue))
    ));
    assert_eq!(r.uri.to_string(), "/internal/42?keep=2&v=a%20b");
    assert!(r.headers.get("x-drop").is_none());
    assert_eq!(r.headers.get_all("x-keep").iter().count(), 2);
    assert_eq!(
        r.headers.get("x-set").map(|v| v.as_bytes()),
        Some(&b"a"[..])
    );
    let (mut resp, ()) = http::Response::new(()).into_parts();
    t.on_response(&c, &mut resp);
    assert!(resp.headers.contains_key("x-out"));
}

#[test]
fn rejects_bad_config() {
    let bad = serde_json::json!({"request": {"headers": {"set": {"bad header": "x"}}}});
    let e = Transform::from_config(&bad, &[]).err().map(|e| e.path);
    assert_eq!(e.as_deref(), Some("config.request.headers.set"));
    let unknown = serde_json::json!({"requests": {}});
    assert!(Transform::from_config(&unknown, &[]).is_err());
}

#[test]
fn path_template_must_use_known_captures() {
    let cfg = serde_json::json!({"request": {"path": "/x/{nope}"}});
    let e = Transform::from_config(&cfg, &["id".into()])
        .err()
        .map(|e| e.path);
    assert_eq!(e.as_deref(), Some("config.request.path"));
}
