"""ip-restriction and cors, end to end: curl through the gateway to a real backend."""

import json

import pytest

from harness import Gateway, api, curl, filters, service


IP_APIS = [
    ("ip-allow", "/ip/allow", "{name: ip-restriction, config: {allow: [127.0.0.1]}}"),
    ("ip-deny", "/ip/deny", "{name: ip-restriction, config: {deny: [127.0.0.0/8, '::1']}}"),
    ("ip-proxied", "/ip/proxied",
     "{name: ip-restriction, config: {allow: [203.0.113.0/24], trustedProxies: [127.0.0.1/32, 10.1.0.0/16]}}"),
    ("ip-untrusted", "/ip/untrusted", "{name: ip-restriction, config: {allow: [203.0.113.0/24]}}"),
]

CORS = ("{name: cors, config: {origins: ['https://app.example.com', 'https://*.partner.test'], "
        "methods: [GET, POST, PUT], headers: [content-type, x-trace], exposeHeaders: [x-backend], "
        "credentials: true, maxAge: 600s}}")


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = service("up", backend)
    for name, path, f in IP_APIS:
        res += api(name, path, "{service: up}", extra=filters(f))
    res += api("cors", "/cors/{*rest}", "{service: up}", extra=filters(CORS))
    res += api("cors-any", "/any", "{service: up}",
               extra=filters("{name: cors, config: {origins: ['*']}}"))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def code_of(body):
    return json.loads(body)["error"]["code"]


def test_ip_allow_and_deny(gw, backend):
    assert curl(gw.url + "/ip/allow")[0] == 200
    status, headers, body, _ = curl(gw.url + "/ip/deny")
    assert status == 403 and code_of(body) == "forbidden" and headers["x-request-id"]
    assert [r["path"] for r in backend.requests] == ["/ip/allow"]


@pytest.mark.parametrize("xff,want", [
    ("203.0.113.5", 200),                   # the client, one trusted hop away
    ("203.0.113.5, 10.1.4.4", 200),         # two trusted hops (gateway peer, then 10.1.x)
    ("198.51.100.1", 403),                  # outside the allow list
    ("203.0.113.5, 198.51.100.1", 403),     # a forged left part is not believed
    (None, 403),                            # the peer itself, 127.0.0.1, is not allowed
    ("not-an-ip", 403),
])
def test_forwarded_for_only_through_trusted_proxies(gw, backend, xff, want):
    args = ["-H", f"x-forwarded-for: {xff}"] if xff else []
    status, _, body, _ = curl(*args, gw.url + "/ip/proxied")
    assert status == want, body
    assert backend.count() == (1 if want == 200 else 0)


def test_forwarded_for_ignored_without_trusted_proxies(gw, backend):
    status, _, _, _ = curl("-H", "x-forwarded-for: 203.0.113.5", gw.url + "/ip/untrusted")
    assert status == 403
    assert backend.count() == 0


def preflight(gw, origin, method="PUT", req_headers="content-type, x-trace", path="/cors/items"):
    args = ["-X", "OPTIONS", "-H", f"origin: {origin}", "-H", f"access-control-request-method: {method}"]
    if req_headers:
        args += ["-H", f"access-control-request-headers: {req_headers}"]
    return curl(*args, gw.url + path)


def test_preflight_is_answered_by_the_gateway(gw, backend):
    status, h, body, _ = preflight(gw, "https://app.example.com")
    assert status == 204, body
    assert h["access-control-allow-origin"] == "https://app.example.com"
    assert h["access-control-allow-methods"] == "GET, POST, PUT"
    assert h["access-control-allow-headers"] == "content-type, x-trace"
    assert h["access-control-allow-credentials"] == "true"
    assert h["access-control-max-age"] == "600"
    assert "origin" in h["vary"].lower()
    status, h, _, _ = preflight(gw, "https://eu.partner.test", method="GET", req_headers=None)
    assert status == 204 and h["access-control-allow-origin"] == "https://eu.partner.test"
    assert backend.count() == 0


@pytest.mark.parametrize("origin,method,hdrs", [
    ("https://evil.example", "PUT", None),                  # origin not listed
    ("https://partner.test", "GET", None),                  # pattern needs a subdomain
    ("https://a.partner.test.evil.example", "GET", None),   # suffix trick
    ("https://app.example.com", "DELETE", None),            # method not allowed
    ("https://app.example.com", "GET", "authorization"),    # header not allowed
])
def test_bad_preflights_are_403(gw, backend, origin, method, hdrs):
    status, h, body, _ = preflight(gw, origin, method=method, req_headers=hdrs)
    assert status == 403, body
    assert code_of(body) == "forbidden"
    assert "access-control-allow-origin" not in h
    assert backend.count() == 0


def test_cross_origin_requests_are_marked_or_refused(gw, backend):
    status, h, body, _ = curl("-H", "origin: https://app.example.com", gw.url + "/cors/items")
    assert status == 200, body
    assert h["access-control-allow-origin"] == "https://app.example.com"
    assert h["access-control-allow-credentials"] == "true"
    assert h["access-control-expose-headers"] == "x-backend"
    assert "origin" in h["vary"].lower()
    status, h, body, _ = curl("-X", "POST", "-d", "x=1", "-H", "origin: https://evil.example",
                              gw.url + "/cors/items")
    assert status == 403 and code_of(body) == "forbidden"
    assert backend.count() == 1
    # Same-site tools and servers send no Origin: untouched.
    status, h, _, _ = curl(gw.url + "/cors/items")
    assert status == 200 and "access-control-allow-origin" not in h


def test_any_origin_without_credentials(gw):
    status, h, _, _ = curl("-H", "origin: https://whoever.example", gw.url + "/any")
    assert status == 200
    assert h["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in h
