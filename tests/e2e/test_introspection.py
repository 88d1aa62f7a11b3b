"""oauth2-introspection end to end against a real RFC 7662 endpoint on loopback:
active and inactive tokens, client authentication, scopes, caching until the sooner
of exp and cacheTtl, endpoint outage (503, or fail-open)."""

import json
import time

import pytest

from harness import Gateway, Idp, api, curl, service

CONSUMER = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: billing-app}
spec:
  groups: [internal]
"""


def intro(idp, extra=""):
    return ("\n  filters:\n    - name: oauth2-introspection\n      config:"
            f"\n        endpoint: {idp.url}/introspect\n        clientId: gw"
            "\n        clientSecret: {env: MESHGATE_TEST_INTROSPECT_SECRET}"
            f"\n        cacheTtl: 2s\n        timeout: 500ms{extra}")


@pytest.fixture
def idp():
    i = Idp()
    yield i
    i.stop()


@pytest.fixture
def gw(tmp_path, backend, gateways, idp, monkeypatch):
    monkeypatch.setenv("MESHGATE_TEST_INTROSPECT_SECRET", "gw-secret")
    res = (service("up", backend) + CONSUMER
           + api("plain", "/intro/{*rest}", "{service: up}", extra=intro(
               idp, "\n        claimsToHeaders: {sub: x-user-id}\n        consumerClaim: client_id"))
           + api("scoped", "/scoped", "{service: up}", extra=intro(idp, "\n        scopes: [orders:write]"))
           + api("open", "/failopen", "{service: up}", extra=intro(idp, "\n        failOpen: true")))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def bearer(token):
    return ["-H", f"authorization: Bearer {token}"]


def introspections(idp):
    return idp.count("/introspect")


def test_active_token_passes_with_claims_and_consumer(gw, idp, backend):
    idp.tokens["tok-1"] = {"active": True, "sub": "user-9", "client_id": "billing-app",
                           "scope": "orders:read", "exp": int(time.time()) + 600}
    st, _, body, _ = curl(*bearer("tok-1"), "-H", "x-user-id: forged", gw.url + "/intro/a")
    assert st == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-user-id"] == "user-9" and seen["x-consumer-name"] == "billing-app"
    assert "authorization" not in seen
    # The endpoint saw the gateway's client credentials (it answers 401 otherwise).
    method, path, headers, form = idp.hits[-1]
    assert method == "POST" and b"token=tok-1" in form


@pytest.mark.parametrize("answer", [{"active": False}, {"active": True, "exp": 1000}, None])
def test_inactive_expired_and_unknown_tokens_are_401(gw, idp, backend, answer):
    if answer is not None:
        idp.tokens["tok-x"] = answer
    st, h, body, _ = curl(*bearer("tok-x"), gw.url + "/intro/a")
    assert st == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert h["www-authenticate"].startswith("Bearer")
    assert backend.count() == 0


def test_missing_token_is_401_without_a_call(gw, idp, backend):
    st, _, _, _ = curl(gw.url + "/intro/a")
    assert st == 401 and introspections(idp) == 0 and backend.count() == 0


def test_answers_are_cached_until_ttl(gw, idp):
    idp.tokens["tok-c"] = {"active": True, "exp": int(time.time()) + 600}
    for _ in range(5):
        assert curl(*bearer("tok-c"), gw.url + "/intro/a")[0] == 200
    assert introspections(idp) == 1
    # Revoked at the server: still accepted until the 2 s TTL runs out, then refused.
    idp.tokens["tok-c"] = {"active": False}
    time.sleep(2.2)
    assert curl(*bearer("tok-c"), gw.url + "/intro/a")[0] == 401
    assert introspections(idp) == 2


def test_cache_ends_at_exp_when_sooner(gw, idp):
    idp.tokens["tok-e"] = {"active": True, "exp": int(time.time()) + 1}
    assert curl(*bearer("tok-e"), gw.url + "/intro/a")[0] == 200
    time.sleep(1.6)
    assert curl(*bearer("tok-e"), gw.url + "/intro/a")[0] == 401


def test_missing_scope_is_403(gw, idp, backend):
    idp.tokens["tok-r"] = {"active": True, "scope": "orders:read"}
    idp.tokens["tok-w"] = {"active": True, "scope": "orders:read orders:write"}
    st, _, body, _ = curl(*bearer("tok-r"), gw.url + "/scoped")
    assert st == 403 and json.loads(body)["error"]["code"] == "forbidden"
    assert backend.count() == 0
    assert curl(*bearer("tok-w"), gw.url + "/scoped")[0] == 200


def test_endpoint_failure_is_503_or_fail_open(gw, idp, backend):
    idp.status = 500
    st, _, body, _ = curl(*bearer("tok-z"), gw.url + "/intro/a")
    assert st == 503, body
    assert json.loads(body)["error"]["code"] == "no_healthy_upstream"
    assert backend.count() == 0
    assert curl(*bearer("tok-z"), gw.url + "/failopen")[0] == 200
    idp.status, idp.delay = 200, 1.0
    st, _, body, _ = curl(*bearer("tok-slow"), gw.url + "/intro/a")
    assert st == 503, body


def test_wrong_client_secret_is_an_endpoint_failure(gw, idp, backend):
    idp.client = ("gw", "another-secret")
    idp.tokens["tok-1"] = {"active": True}
    st, _, _, _ = curl(*bearer("tok-1"), gw.url + "/intro/a")
    assert st == 503
    assert backend.count() == 0
