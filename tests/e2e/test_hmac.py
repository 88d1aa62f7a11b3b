"""hmac-auth end to end: requests signed by the `http-message-signatures` library
(RFC 9421, hmac-sha256, RFC 9530 Content-Digest), checked by the real gateway in front
of a real backend. Rejections are JSON 401s the upstream never sees."""

import json
import time
import uuid

import pytest
import requests
from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

from harness import Gateway, api, curl, service

SECRETS = {
    "partner-1": b"partner-one-shared-secret-0123456789",
    "partner-2": b"partner-two-shared-secret-9876543210",
}

CONSUMERS = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: partner-one}
spec:
  groups: [partners]
  credentials:
    - {type: hmac, keyId: partner-1, secret: partner-one-shared-secret-0123456789}
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: partner-two}
spec:
  credentials:
    - {type: hmac, keyId: partner-2, secret: {env: MESHGATE_TEST_HMAC_2}}
"""


class Keys(HTTPSignatureKeyResolver):
    def resolve_private_key(self, key_id):
        return SECRETS[key_id]

    def resolve_public_key(self, key_id):
        return SECRETS[key_id]


SIGNER = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=Keys())
BASIC = ("@method", "@authority", "@path")


@pytest.fixture
def gw(tmp_path, backend, gateways, monkeypatch):
    monkeypatch.setenv("MESHGATE_TEST_HMAC_2", SECRETS["partner-2"].decode())
    res = (service("up", backend) + CONSUMERS
           + api("signed", "/hmac/{*rest}", "{service: up}",
                 extra="\n  filters:\n    - {name: hmac-auth, config: {clockSkew: 60s}}")
           + api("nonce", "/nonce", "{service: up}",
                 extra="\n  filters:\n    - {name: hmac-auth, config: {nonce: {required: true},"
                       " requiredComponents: ['@method', '@path', '@authority', '@query']}}"))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def signed(method, url, key_id="partner-1", body=None, components=BASIC, tamper=None, headers=None, **kw):
    req = requests.Request(method, url, data=body, headers=headers or {}).prepare()
    if body is not None:
        kw["body"] = body
    SIGNER.sign(req, key_id=key_id, covered_component_ids=components, **kw)
    if tamper:
        tamper(req)
    return req


def send(req):
    with requests.Session() as s:
        return s.send(req, timeout=10)


def refused(backend, req, why=None):
    before = backend.count()
    r = send(req)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "unauthorized" and r.headers["x-request-id"]
    if why:
        assert why in err["message"], err["message"]
    assert backend.count() == before, "a rejected request reached the upstream"
    return err["message"]


def test_signed_get_names_the_consumer(gw):
    r = send(signed("GET", gw.url + "/hmac/orders?x=1"))
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["x-consumer-name"] == "partner-one" and seen["x-consumer-groups"] == "partners"
    assert "signature" not in seen and "signature-input" not in seen


def test_secret_from_env(gw):
    r = send(signed("GET", gw.url + "/hmac/x", key_id="partner-2"))
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["x-consumer-name"] == "partner-two"


def test_body_with_content_digest(gw, backend):
    body = json.dumps({"order": 42, "items": ["a" * 5000]}).encode()
    r = send(signed("POST", gw.url + "/hmac/orders", body=body,
                    components=BASIC + ("content-digest", "content-type"),
                    headers={"content-type": "application/json"}))
    assert r.status_code == 200, r.text
    assert backend.requests[-1]["body"].encode("latin-1") == body


def test_tampered_body_is_refused(gw, backend):
    def swap(req):
        req.body = b'{"order": 666}'
        req.headers["content-length"] = str(len(req.body))
    refused(backend, signed("POST", gw.url + "/hmac/orders", body=b'{"order": 42}',
                            components=BASIC + ("content-digest",), tamper=swap), "Content-Digest")


def test_body_without_covered_digest_is_refused(gw, backend):
    req = requests.Request("POST", gw.url + "/hmac/orders", data=b"payload").prepare()
    SIGNER.sign(req, key_id="partner-1", covered_component_ids=BASIC)
    refused(backend, req, "content-digest")


@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "other path", "other method",
                                  "missing component", "old", "future", "no headers", "mangled"])
def test_bad_signatures(gw, backend, case):
    url = gw.url + "/hmac/orders"
    if case == "wrong secret":
        req = signed("GET", url)
        bad = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256,
                                key_resolver=type("K", (Keys,), {"resolve_private_key": lambda s, k: b"x" * 40})())
        bad.sign(req, key_id="partner-1", covered_component_ids=BASIC)
        refused(backend, req, "invalid signature")
    elif case == "unknown key":
        SECRETS["nobody"] = b"n" * 40
        refused(backend, signed("GET", url, key_id="nobody"), "key id")
    elif case == "other path":
        req = signed("GET", url)
        req.url = gw.url + "/hmac/admin"
        refused(backend, req, "invalid signature")
    elif case == "other method":
        req = signed("GET", url)
        req.method = "DELETE"
        refused(backend, req, "invalid signature")
    elif case == "missing component":
        refused(backend, signed("GET", url, components=("@method", "@path")), "@authority")
    elif case == "old":
        from datetime import datetime, timedelta
        refused(backend, signed("GET", url, created=datetime.now() - timedelta(seconds=300)), "clock skew")
    elif case == "future":
        from datetime import datetime, timedelta
        refused(backend, signed("GET", url, created=datetime.now() + timedelta(seconds=300)), "clock skew")
    elif case == "no headers":
        refused(backend, requests.Request("GET", url).prepare(), "Signature-Input")
    elif case == "mangled":
        req = signed("GET", url)
        req.headers["signature-input"] = req.headers["signature-input"].replace("(", "((")
        refused(backend, req, "malformed")


def test_nonce_replay_and_requirement(gw, backend):
    nonce = uuid.uuid4().hex
    req = signed("GET", gw.url + "/nonce?a=1", nonce=nonce, components=BASIC + ("@query",))
    assert send(req).status_code == 200
    replay = requests.Request("GET", gw.url + "/nonce?a=1").prepare()
    replay.headers.update({k: req.headers[k] for k in ("signature", "signature-input")})
    refused(backend, replay, "nonce")
    refused(backend, signed("GET", gw.url + "/nonce?a=1", components=BASIC + ("@query",)), "nonce")
    # The query is covered: changing it breaks the signature.
    req = signed("GET", gw.url + "/nonce?a=1", nonce=uuid.uuid4().hex, components=BASIC + ("@query",))
    req.url = gw.url + "/nonce?a=2"
    refused(backend, req, "invalid signature")


def test_signed_request_over_http2(gw):
    req = signed("POST", gw.url + "/hmac/h2", body=b"hello", components=BASIC + ("content-digest",))
    args = ["--http2-prior-knowledge", "-X", "POST", "--data-binary", "hello"]
    for k in ("signature", "signature-input", "content-digest"):
        args += ["-H", f"{k}: {req.headers[k]}"]
    status, _, body, _ = curl(*args, gw.url + "/hmac/h2")
    assert status == 200, body
    assert json.loads(body)["headers"]["x-consumer-name"] == "partner-one"


def test_hmac_secrets_never_shown(gw):
    send(signed("GET", gw.url + "/hmac/x"))
    _, cfg = gw.admin("GET", "/config")
    assert "partner-one-shared-secret" not in cfg and "partner-two-shared-secret" not in cfg
    assert "MESHGATE_TEST_HMAC_2" in cfg and "<redacted>" in cfg
    _, metrics = gw.admin("GET", "/metrics")
    assert "shared-secret" not in metrics
    assert "shared-secret" not in gw.log_path.read_text()
