use super::*;
use meshgate_core::RequestId;
use serde_json::json;

const SECRET: &[u8] = b"an-hmac-secret-of-thirty-two-byte";

fn k() -> String {
    URL_SAFE_NO_PAD.encode(SECRET)
}

fn filter(extra: serde_json::Value) -> Jwt {
    let mut provider = json!({
        "issuer": "https://idp.test",
        "audiences": ["orders"],
        "jwks": {"inline": {"keys": [{"kty": "oct", "kid": "k1", "k": k()}]}},
        "claimsToHeaders": {"sub": "x-user-id", "scope": "x-scopes"},
        "requiredClaims": ["sub"],
    });
    if let (Some(p), Some(e)) = (provider.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
    Jwt::from_config(
        &json!({"providers": [provider], "leeway": "5s"}),
        &Arc::new(ConsumerSet::default()),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn sign(header: serde_json::Value, claims: serde_json::Value) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{h}.{c}");
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET);
    let sig = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256)
        .unwrap_or_else(|e| panic!("{e}"));
    format!("{signed}.{sig}")
}

fn good_claims() -> serde_json::Value {
    json!({"iss": "https://idp.test", "aud": "orders", "sub": "u-1", "scope": ["a", "b"], "exp": now_unix() + 300})
}

fn hs() -> serde_json::Value {
    json!({"alg": "HS256", "kid": "k1"})
}

fn run(f: &Jwt, auth: &[&str]) -> (Result<Flow, GatewayError>, http::request::Parts) {
    let mut b = http::Request::builder()
        .uri("/x")
        .header("x-user-id", "forged");
    for a in auth {
        b = b.header("authorization", *a);
    }
    let (mut parts, ()) = b.body(()).unwrap_or_else(|e| panic!("{e}")).into_parts();
    let mut ctx = RequestCtx::new(RequestId::generate(), ([127, 0, 0, 1], 1).into(), "http");
    let out = match f.on_request(&mut ctx, &mut parts) {
        Step::Done(r) => r,
        Step::Pending(_) => panic!("static keys never wait"),
    };
    (out, parts)
}

fn refused(f: &Jwt, token: &str) -> String {
    match run(f, &[&format!("Bearer {token}")]).0 {
        Err(e) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            e.message.to_string()
        }
        Ok(flow) => panic!("accepted: {flow:?}"),
    }
}

#[test]
fn a_good_token_sets_claim_headers_and_is_not_forwarded() {
    let f = filter(json!({}));
    let token = sign(hs(), good_claims());
    for _ in 0..2 {
        // The second pass is answered from the cache, with the same effects.
        let (out, parts) = run(&f, &[&format!("Bearer {token}")]);
        assert!(matches!(out, Ok(Flow::Continue)), "{out:?}");
        assert_eq!(parts.headers["x-user-id"], "u-1");
        assert_eq!(parts.headers["x-scopes"], "a,b");
        assert!(parts.headers.get("authorization").is_none());
    }
}

#[test]
fn header_tricks_are_refused() {
    let f = filter(json!({}));
    let c = good_claims();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(c.to_string())
    );
    assert!(refused(&f, &none).contains("alg none"));
    for (extra, want) in [
        (json!({"jku": "http://evil/keys"}), "jku"),
        (json!({"x5u": "http://evil/cert"}), "x5u"),
        (json!({"jwk": {"kty": "oct", "k": "AA"}}), "jwk"),
        (json!({"crit": ["exp"]}), "crit"),
        (json!({"b64": false}), "b64"),
    ] {
        let mut h = hs();
        if let (Some(h), Some(e)) = (h.as_object_mut(), extra.as_object()) {
            h.extend(e.clone());
        }
        let msg = refused(&f, &sign(h, c.clone()));
        assert!(msg.contains(want), "{want}: {msg}");
    }
}

#[test]
fn claims_are_checked_with_leeway() {
    let f = filter(json!({}));
    let now = now_unix();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good_claims();
        if let Some(o) = c.as_object_mut() {
            if v.is_null() {
                o.remove(k);
            } else {
                o.insert(k.into(), v);
            }
        }
        sign(hs(), c)
    };
    assert!(refused(&f, &with("exp", json!(now - 10))).contains("expired"));
    assert!(
        run(&f, &[&format!("Bearer {}", with("exp", json!(now - 2)))])
            .0
            .is_ok()
    );
    assert!(refused(&f, &with("exp", serde_json::Value::Null)).contains("exp"));
    assert!(refused(&f, &with("nbf", json!(now + 60))).contains("nbf"));
    assert!(refused(&f, &with("aud", json!("billing"))).contains("audience"));
    let many = with("aud", json!(["x", "orders"]));
    assert!(run(&f, &[&format!("Bearer {many}")]).0.is_ok());
    assert!(refused(&f, &with("sub", serde_json::Value::Null)).contains("sub"));
    assert!(refused(&f, &with("iss", json!("https://other.test"))).contains("issuer"));
}

#[test]
fn signature_and_shape_failures() {
    let f = filter(json!({}));
    let token = sign(hs(), good_claims());
    let mut bad_sig = token.clone();
    bad_sig.pop();
    bad_sig.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert!(refused(&f, &bad_sig).contains("signature"));
    assert!(refused(&f, &format!("{token}.x")).contains("malformed"));
    assert!(refused(&f, "not-a-token").contains("malformed"));
    // A kid the set lacks finds no key.
    let other = sign(json!({"alg": "HS256", "kid": "k9"}), good_claims());
    assert!(refused(&f, &other).contains("no key"));
}

#[test]
fn an_rsa_key_never_verifies_an_hmac_token() {
    // The classic confusion: HS256 "signed" with the RSA public key as the secret.
    let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
    let f = Jwt::from_config(
        &json!({"providers": [{"jwks": {"inline": {"keys": [{"kty": "RSA", "kid": "k1", "n": n, "e": "AQAB"}]}}}]}),
        &Arc::new(ConsumerSet::default()),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(refused(&f, &sign(hs(), good_claims())).contains("no key"));
}

#[test]
fn two_different_tokens_are_ambiguous_and_none_is_missing() {
    let f = filter(json!({}));
    let a = sign(hs(), good_claims());
    let mut c = good_claims();
    c["sub"] = json!("u-2");
    let b = sign(hs(), c);
    let (out, _) = run(&f, &[&format!("Bearer {a}"), &format!("Bearer {b}")]);
    assert!(matches!(out, Err(e) if e.message.contains("ambiguous")));
    let (out, _) = run(&f, &[]);
    assert!(matches!(out, Err(e) if e.message.contains("missing")));
}

#[test]
fn bad_configs_name_the_field() {
    let err = |v: serde_json::Value| {
        Jwt::from_config(&v, &Arc::new(ConsumerSet::default()), None)
            .err()
            .unwrap_or_else(|| panic!("accepted {v}"))
    };
    let jwks = json!({"inline": {"keys": [{"kty": "oct", "k": k()}]}});
    let e = err(json!({"providers": [{"jwks": jwks, "algorithms": ["RS256", "none"]}]}));
    assert_eq!(e.path, "config.providers.0.algorithms.1");
    let e = err(
        json!({"providers": [{"jwks": {"inline": {"keys": [{"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"}]}}}]}),
    );
    assert_eq!(e.path, "config.providers.0.jwks.inline");
    let e = err(json!({"providers": [{"jwks": {"uri": "ftp://x"}}]}));
    assert_eq!(e.path, "config.providers.0.jwks.uri");
    let e = err(json!({"providers": [{"jwks": {"file": "a", "uri": "http://x"}}]}));
    assert_eq!(e.path, "config.providers.0.jwks");
}

#[test]
fn keys_without_a_kid_are_tried_for_any_kid() {
    let f = Jwt::from_config(
        &json!({"providers": [{"issuer": "https://idp.test", "audiences": ["orders"],
            "jwks": {"inline": {"keys": [{"kty": "oct", "k": k()}]}}}]}),
        &Arc::new(ConsumerSet::default()),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let token = sign(json!({"alg": "HS256", "kid": "anything"}), good_claims());
    assert!(run(&f, &[&format!("Bearer {token}")]).0.is_ok());
}
