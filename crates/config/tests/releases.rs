//! Grey releases keyed on the Consumer: where the side is chosen, and that the
//! filters both revisions share are one set of instances.

use meshgate_config::{GreyKey, Snapshot, Source, compile};
use std::sync::Arc;

const BASE: &str = r#"
apiVersion: meshgate.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  listeners: [{name: main, address: "127.0.0.1:8080"}]
  policies: [POLICIES]
---
apiVersion: meshgate.io/v1
kind: Policy
metadata: {name: keys}
spec:
  filters: [{name: key-auth, config: {header: x-api-key}}]
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {name: users}
spec:
  endpoints: [{address: "127.0.0.1:9"}]
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: acme}
spec:
  labels: {tier: beta}
  credentials: [{type: key, key: acme-key}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: get-user}
spec:
  request: {path: "/users/{id}", methods: [GET]}
  filters: [CURRENT]
  invoke: {service: users}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: get-user-canary}
spec:
  release: {of: get-user, consumers: {tier: beta}}
  request: {path: "/users/{id}", methods: [GET]}
  filters: [RELEASE]
  response: {headers: {set: {x-revision: v2}}}
  invoke: {service: users}
"#;

const KEY_AUTH: &str = "{name: key-auth, config: {header: x-api-key}}";
const TRANSFORM: &str = "{name: transform, config: {request: {headers: {set: {x-v: two}}}}}";
const FAULT: &str = "{name: fault, config: {abort: {status: 503, percent: 0}}}";

fn compiled(policies: &str, current: &str, release: &str) -> Result<Snapshot, String> {
    let text = BASE
        .replace("POLICIES", policies)
        .replace("CURRENT", current)
        .replace("RELEASE", release);
    let (snapshot, diags) = compile(&[Source {
        file: "c.yaml".into(),
        text,
    }]);
    snapshot.ok_or_else(|| {
        diags
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

#[test]
fn the_release_goes_on_after_the_authentication_both_revisions_share() {
    let s = compiled(
        "",
        &format!("{KEY_AUTH}, {FAULT}"),
        &format!("{KEY_AUTH}, {TRANSFORM}"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (current, release) = (&s.apis[0], &s.apis[1]);
    let grey = current
        .grey
        .as_ref()
        .unwrap_or_else(|| panic!("no release linked"));
    assert!(matches!(grey.by, GreyKey::Request(_)));
    assert_eq!(grey.to, 1);
    // current: [key-auth, fault]; release: [response headers, key-auth, transform].
    assert_eq!(current.chain.names(), ["key-auth", "fault"]);
    assert_eq!(
        release.chain.names(),
        ["transform", "key-auth", "transform"]
    );
    assert_eq!(grey.identified_at, (1, 2));
    // The shared key-auth is one instance: whatever it counts, it counts once.
    assert!(Arc::ptr_eq(
        &current.chain.filters()[0],
        &release.chain.filters()[1]
    ));
}

#[test]
fn without_a_shared_authentication_a_consumer_key_is_refused() {
    let err = compiled("", KEY_AUTH, &format!("{TRANSFORM}, {KEY_AUTH}"))
        .err()
        .unwrap_or_else(|| panic!("compiled"));
    assert!(
        err.contains("Api/get-user-canary: spec.release.consumers: a release keyed on the Consumer is chosen once the caller is identified"),
        "{err}"
    );
    assert!(err.starts_with("c.yaml:"), "{err}");
}

#[test]
fn authentication_in_the_gateway_policies_is_enough() {
    let s = compiled("keys", TRANSFORM, FAULT).unwrap_or_else(|e| panic!("{e}"));
    let grey = s.apis[0]
        .grey
        .as_ref()
        .unwrap_or_else(|| panic!("no release linked"));
    // Nothing shared: the side is chosen right after the global policies.
    assert_eq!(grey.identified_at, (0, 1));
}
