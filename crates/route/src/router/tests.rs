use super::*;

fn route(
    hosts: &[&str],
    path: &str,
    methods: &[&str],
    headers: &[(&str, &str)],
    v: &'static str,
) -> Route<&'static str> {
    Route {
        hosts: hosts.iter().map(|s| s.to_string()).collect(),
        pattern: PathPattern::parse(path).unwrap_or_else(|e| panic!("{path}: {e}")),
        methods: methods
            .iter()
            .map(|m| m.parse().unwrap_or(Method::GET))
            .collect(),
        headers: headers
            .iter()
            .map(|(n, r)| HeaderMatch {
                name: HeaderName::from_bytes(n.as_bytes()).unwrap_or(http::header::HOST),
                regex: Regex::new(r).unwrap_or_else(|e| panic!("{e}")),
            })
            .collect(),
        value: v,
    }
}

fn table() -> Router<&'static str> {
    let mut b = Router::builder();
    let routes = [
        route(&[], "/", &[], &[], "root"),
        route(&[], "/users/{id}", &["GET"], &[], "get-user"),
        route(&[], "/users/{id}", &["DELETE"], &[], "delete-user"),
        route(&[], "/users/me", &["GET"], &[], "me"),
        route(&[], "/users/{id}/files/{*path}", &[], &[], "files"),
        route(&[], "/public/{*rest}", &[], &[], "public"),
        route(&[], "/admin/{*rest}", &[], &[], "admin"),
        route(&[], "/dir/", &[], &[], "dir-slash"),
        route(&[], "/dir", &[], &[], "dir"),
        route(&[], "/ios", &[], &[("x-client", "^ios")], "ios"),
        route(&[], "/ios", &[], &[], "ios-any"),
        route(
            &["api.example.com"],
            "/users/{id}",
            &["GET"],
            &[],
            "exact-host",
        ),
        route(
            &["*.example.org"],
            "/users/{id}",
            &["GET"],
            &[],
            "wild-host",
        ),
        route(
            &["*.b.example.org"],
            "/users/{id}",
            &["GET"],
            &[],
            "wild-host-longer",
        ),
        route(&[], "/only-post", &["POST"], &[], "only-post"),
    ];
    for r in routes {
        if let Err(e) = b.insert(r) {
            panic!("{e}");
        }
    }
    b.build()
}

fn run(
    r: &Router<&'static str>,
    host: &str,
    method: &str,
    path: &str,
    hdrs: &[(&'static str, &'static str)],
) -> String {
    let mut h = HeaderMap::new();
    for (n, v) in hdrs {
        h.insert(*n, http::HeaderValue::from_static(v));
    }
    let m: Method = method.parse().unwrap_or(Method::GET);
    match r.route(host, &m, path, &h) {
        Outcome::Matched(m) => {
            let caps: Vec<String> = m
                .captures()
                .map(|(n, s)| format!("{n}={}", &path[s]))
                .collect();
            if caps.is_empty() {
                m.value.to_string()
            } else {
                format!("{} {}", m.value, caps.join(","))
            }
        }
        Outcome::MethodNotAllowed(a) => format!("405 {a:?}"),
        Outcome::NotFound => "404".to_string(),
    }
}

#[test]
fn specificity_table() {
    let r = table();
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("x", "GET", "/", &[], "root"),
        ("x", "GET", "/users/42", &[], "get-user id=42"),
        ("x", "DELETE", "/users/42", &[], "delete-user id=42"),
        ("x", "GET", "/users/me", &[], "me"),
        // the literal lacks DELETE, so the capture route serves it
        ("x", "DELETE", "/users/me", &[], "delete-user id=me"),
        ("x", "PUT", "/users/42", &[], "405 [GET, DELETE]"),
        (
            "x",
            "GET",
            "/users/42/files/a/b.txt",
            &[],
            "files id=42,path=a/b.txt",
        ),
        ("x", "GET", "/users/42/files/", &[], "files id=42,path="),
        ("x", "GET", "/users/42/files", &[], "404"),
        ("x", "GET", "/users", &[], "404"),
        ("x", "GET", "/users/", &[], "404"),
        ("x", "GET", "/public/a/b", &[], "public rest=a/b"),
        ("x", "GET", "/dir/", &[], "dir-slash"),
        ("x", "GET", "/dir", &[], "dir"),
        ("x", "GET", "/ios", &[("x-client", "ios-17")], "ios"),
        ("x", "GET", "/ios", &[("x-client", "android")], "ios-any"),
        ("api.example.com", "GET", "/users/1", &[], "exact-host id=1"),
        ("API.Example.com", "GET", "/users/1", &[], "exact-host id=1"),
        ("a.example.org", "GET", "/users/1", &[], "wild-host id=1"),
        (
            "a.b.example.org",
            "GET",
            "/users/1",
            &[],
            "wild-host-longer id=1",
        ),
        ("example.org", "GET", "/users/1", &[], "get-user id=1"),
        // exact host has no DELETE route: falls through to the any-host table
        (
            "api.example.com",
            "DELETE",
            "/users/1",
            &[],
            "delete-user id=1",
        ),
        ("x", "GET", "/only-post", &[], "405 [POST]"),
        ("x", "GET", "/nothing", &[], "404"),
        ("x", "GET", "/ADMIN/x", &[], "404"),
    ];
    for (host, method, path, hdrs, want) in cases {
        assert_eq!(
            run(&r, host, method, path, hdrs),
            *want,
            "{method} {host}{path}"
        );
    }
}

#[test]
fn ties_are_errors() {
    let mut b = Router::builder();
    assert!(b.insert(route(&[], "/u/{id}", &["GET"], &[], "a")).is_ok());
    let e = b.insert(route(&[], "/u/{uid}", &["GET", "POST"], &[], "b"));
    assert_eq!(e.map_err(|e| e.existing), Err(0));
    // no method list overlaps every method
    assert!(b.insert(route(&[], "/u/{x}", &[], &[], "c")).is_err());
    // different methods or headers are not ties
    assert!(b.insert(route(&[], "/u/{x}", &["POST"], &[], "d")).is_ok());
    assert!(
        b.insert(route(&[], "/u/{x}", &["GET"], &[("x-a", "1")], "e"))
            .is_ok()
    );
    // same host twice in one wildcard class
    assert!(b.insert(route(&["*.a.com"], "/u", &[], &[], "f")).is_ok());
    assert!(b.insert(route(&["*.A.com"], "/u", &[], &[], "g")).is_err());
}

#[test]
fn cost_does_not_grow_with_route_count() {
    let mut b = Router::builder();
    for i in 0..10_000 {
        let path = format!("/svc{i}/items/{{id}}");
        let leaked: &'static str = "x";
        if b.insert(route(&[], &path, &["GET"], &[], leaked)).is_err() {
            panic!("tie at {i}");
        }
    }
    let r = b.build();
    assert_eq!(run(&r, "h", "GET", "/svc9999/items/7", &[]), "x id=7");
    assert_eq!(run(&r, "h", "GET", "/svc10000/items/7", &[]), "404");
}
