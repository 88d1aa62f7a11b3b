"""Routing, normalisation, forwarding headers and mocks, over HTTP/1.1 and h2c."""

import json

import pytest

from harness import Gateway, api, curl, service


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = service("users", backend) + api(
        "get-user", "/users/{id}", "{service: users, path: \"/internal/users/{id}\"}", methods=["GET", "DELETE"]
    ) + api("me", "/users/me", "{mock: {status: 200, body: me}}", methods=["GET"]) + api(
        "admin", "/admin/{*rest}", "{service: users}"
    ) + api(
        "hello", "/hello", '{mock: {status: 201, headers: {x-mock: "1"}, body: {greeting: hi}}}'
    ) + """---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: by-host}
spec:
  request: {path: /host, hosts: [api.example.com]}
  invoke: {mock: {body: exact}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: by-wildcard}
spec:
  request: {path: /host, hosts: ["*.example.org"]}
  invoke: {mock: {body: wildcard}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: by-any}
spec:
  request: {path: /host}
  invoke: {mock: {body: any}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: ios}
spec:
  request: {path: /client, headers: {x-client: "^ios"}}
  invoke: {mock: {body: ios}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: other-client}
spec:
  request: {path: /client}
  invoke: {mock: {body: other}}
"""
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


@pytest.mark.parametrize("proto", [[], ["--http2-prior-knowledge"]])
def test_rewrite_and_forwarding_headers(gw, backend, proto):
    status, headers, body, _ = curl(*proto, gw.url + "/users/42?x=1", "-H", "x-request-id: rid-1",
                                   "-H", "Connection: x-secret", "-H", "x-secret: 1", "-H", "Keep-Alive: 5")
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/internal/users/42"
    assert seen["query"] == "x=1"
    h = seen["headers"]
    assert h["x-request-id"] == "rid-1"
    assert headers["x-request-id"] == "rid-1"
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
    if not proto:
        # HTTP/1.1: hop-by-hop headers, and those named in Connection, stop here.
        # (HTTP/2 has no Connection header: curl does not send it.)
        assert "x-secret" not in h and "keep-alive" not in h


def test_request_id_generated_and_appended_xff(gw, backend):
    status, headers, body, _ = curl(gw.url + "/users/1", "-H", "X-Forwarded-For: 10.0.0.1")
    seen = json.loads(body)
    rid = headers["x-request-id"]
    assert len(rid) == 32 and seen["headers"]["x-request-id"] == rid
    assert seen["headers"]["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


def test_specificity_and_errors(gw):
    assert curl(gw.url + "/users/me")[2] == b"me"
    # the literal route lacks DELETE: the capture route serves it
    status, _, body, _ = curl(gw.url + "/users/me", "-X", "DELETE")
    assert status == 200 and json.loads(body)["path"] == "/internal/users/me"
    status, headers, body, _ = curl(gw.url + "/users/42", "-X", "PUT")
    assert status == 405
    assert headers["allow"] == "GET, DELETE"
    err = json.loads(body)["error"]
    assert err["code"] == "method_not_allowed" and err["requestId"] == headers["x-request-id"]
    status, headers, body, _ = curl(gw.url + "/nothing/here")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "no_route"


def test_hosts_and_headers(gw):
    assert curl(gw.url + "/host", "-H", "Host: api.example.com")[2] == b"exact"
    assert curl(gw.url + "/host", "-H", "Host: API.example.com:8080")[2] == b"exact"
    assert curl(gw.url + "/host", "-H", "Host: a.b.example.org")[2] == b"wildcard"
    assert curl(gw.url + "/host", "-H", "Host: example.org")[2] == b"any"
    assert curl(gw.url + "/client", "-H", "x-client: ios-17")[2] == b"ios"
    assert curl(gw.url + "/client", "-H", "x-client: android")[2] == b"other"


def test_mock(gw):
    for proto in ([], ["--http2-prior-knowledge"]):
        status, headers, body, _ = curl(*proto, gw.url + "/hello")
        assert status == 201
        assert headers["x-mock"] == "1" and headers["content-type"] == "application/json"
        assert json.loads(body) == {"greeting": "hi"}


@pytest.mark.parametrize("proto", [[], ["--http2-prior-knowledge"]])
@pytest.mark.parametrize(
    "path,upstream",
    [
        ("/admin/x", "/admin/x"),
        ("//admin/x", "/admin/x"),
        ("/admin/./x", "/admin/x"),
        ("/public/../admin/x", "/admin/x"),
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("/admin/%78", "/admin/x"),
        ("/admin/a%2fb", "/admin/a%2Fb"),
        ("/admin/x;param", "/admin/x;param"),
    ],
)
def test_path_normalised_once_and_forwarded(gw, backend, proto, path, upstream):
    status, _, body, _ = curl(*proto, "--path-as-is", gw.url + path)
    assert status == 200, body
    assert json.loads(body)["path"] == upstream


def test_case_sensitive_paths_and_bad_escapes(gw):
    assert curl(gw.url + "/ADMIN/x")[0] == 404
    status, _, body, _ = curl("--path-as-is", gw.url + "/admin/%zz")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request"
