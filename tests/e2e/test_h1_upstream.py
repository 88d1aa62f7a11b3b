"""The inline HTTP/1.1 upstream client against real servers: request bodies in every
framing, bodiless responses, and keep-alive reuse against nginx closing connections."""

import json
import os
import time

import pytest

from harness import Gateway, Nginx, api, curl, service


@pytest.fixture
def echo(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"))
    gateways.append(g)
    return g


@pytest.mark.parametrize("proto", [[], ["--http2-prior-knowledge"]])
def test_request_bodies_arrive_whole(echo, backend, tmp_path, proto):
    big = os.urandom(300_000).hex().encode()[:300_000]
    f = tmp_path / "body"
    f.write_bytes(big)
    # Declared length: streamed as it comes.
    status, _, body, _ = curl(*proto, "--data-binary", f"@{f}", echo.url + "/upload")
    assert status == 200
    seen = json.loads(body)
    assert seen["body"].encode() == big
    assert seen["headers"]["content-length"] == str(len(big))
    # No declared length: sent on chunked.
    status, _, body, _ = curl(*proto, "-H", "Transfer-Encoding: chunked", "-H", "content-length:",
                              "--data-binary", f"@{f}", echo.url + "/upload")
    assert status == 200
    seen = json.loads(body)
    assert seen["body"].encode() == big
    if not proto:
        assert seen["headers"]["transfer-encoding"] == "chunked"


def test_expect_continue_is_answered_and_not_forwarded(echo):
    status, _, body, _ = curl("-H", "Expect: 100-continue", "--data-binary", "x" * 2000, echo.url + "/e")
    assert status == 200
    seen = json.loads(body)
    assert seen["body"] == "x" * 2000
    assert "expect" not in seen["headers"]


def test_bodiless_responses(tmp_path, gateways):
    ng = Nginx(tmp_path, """
  server {
    listen 127.0.0.1:{port};
    location /nc { return 204; }
    location /nm { add_header etag '"v1"'; return 304; }
    location / { return 200 "hello\\n"; }
  }""")
    try:
        g = Gateway(tmp_path, service("ng", ng) + api("all", "/{*rest}", "{service: ng}"))
        gateways.append(g)
        for _ in range(3):  # and the connection stays usable after each
            status, headers, body, rc = curl("-I", g.url + "/x")
            assert (status, rc) == (200, 0)
            assert headers["content-length"] == "6"
            assert curl(g.url + "/nc")[0] == 204
            assert curl(g.url + "/nm")[0] == 304
            status, _, body, _ = curl(g.url + "/x")
            assert (status, body) == (200, b"hello\n")
    finally:
        ng.stop()


def test_keepalive_reuse_and_upstream_closes(tmp_path, gateways):
    """nginx closes idle connections after 1 s and every connection after 3 requests;
    no request may fail for it, and connections must be reused. The first request
    after each idle close is a POST, which is never sent twice: it passes only if
    the closed pooled connection was seen as closed before it was used."""
    ng = Nginx(tmp_path, f"""
  keepalive_timeout 1s;
  keepalive_requests 3;
  log_format conn '$connection $connection_requests';
  server {{
    listen 127.0.0.1:{{port}};
    access_log {tmp_path}/conn.log conn;
    location / {{ return 200 "ok\\n"; }}
  }}""")
    try:
        g = Gateway(tmp_path, service("ng", ng) + api("all", "/{*rest}", "{service: ng}"))
        gateways.append(g)
        for i in range(12):
            post = ("-X", "POST", "-d", "x") if i in (5, 9) else ()
            status, _, body, _ = curl(*post, g.url + f"/r{i}")
            assert (status, body) == (200, b"ok\n"), i
            if i in (4, 8):
                time.sleep(1.3)  # nginx closes the idle pooled connection meanwhile
        lines = (tmp_path / "conn.log").read_text().split()
        counts = [int(n) for n in lines[1::2]]
        assert len(counts) == 12
        assert max(counts) == 3, "connections are reused up to nginx's limit"
        _, metrics = g.admin("GET", "/metrics")
        open_conns = [l for l in metrics.splitlines() if l.startswith('meshgate_upstream_connections{service="ng"}')]
        assert open_conns and float(open_conns[0].split()[-1]) <= 1
    finally:
        ng.stop()
