//! Property tests: normalisation is idempotent and leaves no dot segments or empty
//! segments; matching never panics and agrees with normalisation.

use http::{HeaderMap, Method};
use meshgate_route::{Outcome, PathPattern, Route, Router, normalize_path};
use proptest::prelude::*;

fn norm(p: &str) -> Option<String> {
    match normalize_path(p) {
        Ok(Some(s)) => Some(s),
        Ok(None) => Some(p.to_string()),
        Err(_) => None,
    }
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(".".to_string()),
        Just("..".to_string()),
        Just(String::new()),
        Just("%2e%2e".to_string()),
        Just("%2F".to_string()),
        Just("%41".to_string()),
        "[a-zA-Z0-9_~;=-]{1,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
}

proptest! {
    #[test]
    fn normalisation_is_idempotent_and_clean(p in path()) {
        let Some(once) = norm(&p) else { return Ok(()) };
        prop_assert_eq!(norm(&once), Some(once.clone()));
        prop_assert!(once.starts_with('/'));
        let body = once.trim_start_matches('/').trim_end_matches('/');
        for seg in body.split('/').filter(|_| !body.is_empty()) {
            prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{} -> {}", p, once);
        }
        // An encoded slash is never decoded into a separator (a `..` may drop the
        // segment holding it, so the count can only fall).
        prop_assert!(once.matches("%2F").count() <= p.matches("%2F").count() + p.matches("%2f").count());
        prop_assert!(!once.contains("%2f"));
    }

    #[test]
    fn arbitrary_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = normalize_path(&s);
        let _ = PathPattern::parse(&s);
    }

    #[test]
    fn rest_routes_see_exactly_the_normalised_remainder(p in path()) {
        let Some(n) = norm(&format!("/files{p}")) else { return Ok(()) };
        let mut b = Router::builder();
        let pattern = PathPattern::parse("/files/{*rest}").map_err(|e| TestCaseError::fail(e.to_string()))?;
        b.insert(Route { hosts: vec![], pattern, methods: vec![], headers: vec![], value: () })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = b.build();
        match r.route("h", &Method::GET, &n, &HeaderMap::new()) {
            Outcome::Matched(m) => {
                let span = m.spans.first().cloned().unwrap_or_default();
                prop_assert_eq!(&n[span], n.strip_prefix("/files/").unwrap_or(""));
            }
            _ => prop_assert!(!n.starts_with("/files/"), "{} should match", n),
        }
    }
}
