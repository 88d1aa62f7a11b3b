"""Malformed, ambiguous and oversized requests: a clear 4xx, the connection closed,
and nothing reaches the upstream."""

import json
import socket
import time

import pytest

from harness import Gateway, api, curl, h2_frames_until_closed, metric_sum, raw, service, wait_for

LIMITS = """
  limits: {maxHeaderBytes: 4096, maxHeaders: 20, maxRequestLine: 1024, maxBodyBytes: 1000, headerReadTimeout: 1s}"""


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"), limits=LIMITS)
    gateways.append(g)
    return g


def status_of(resp):
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else None


def body_of(resp):
    return json.loads(resp.partition(b"\r\n\r\n")[2])


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\rX-B: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A : 1\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("req", SMUGGLING, ids=range(len(SMUGGLING)))
def test_ambiguous_framing_is_refused(gw, backend, req):
    resp = raw(gw.port, req)
    assert status_of(resp) == 400, resp
    assert b"connection: close" in resp.lower()
    assert body_of(resp)["error"]["code"] == "invalid_request"
    assert backend.count() == 0, "nothing may reach the upstream"


@pytest.mark.parametrize(
    "chunk",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffff\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"-1\r\n"],
)
def test_bad_chunk_sizes_never_complete_upstream(gw, backend, chunk):
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    resp = raw(gw.port, head + chunk)
    # Sent in one packet the whole message is checked before hyper sees it: 400.
    assert status_of(resp) == 400, resp
    assert backend.count() == 0


def test_oversized_headers_431(gw, backend):
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    resp = raw(gw.port, big)
    assert status_of(resp) == 431
    assert body_of(resp)["error"]["code"] == "headers_too_large"
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n"
    assert status_of(raw(gw.port, many)) == 431
    assert backend.count() == 0


@pytest.mark.parametrize("max_headers", [None, 150])
def test_exactly_max_headers_pass_and_one_more_is_431(tmp_path, gateways, max_headers):
    """The header-count limit is exact, at the default (100) and above it. A mock
    answers: the Python test backend itself refuses more than 100 fields."""
    limits = "" if max_headers is None else f"\n  limits: {{maxHeaders: {max_headers}}}"
    g = Gateway(tmp_path, api("all", "/{*rest}", '{mock: {status: 200, body: "fine"}}'), limits=limits)
    gateways.append(g)
    n = max_headers or 100

    def head(fields):  # Host is one of the fields
        return b"GET /n HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(fields - 1)) + b"\r\n"

    resp = raw(g.port, head(n))
    assert status_of(resp) == 200 and b"\r\n\r\nfine" in resp, resp
    resp = raw(g.port, head(n + 1))
    assert status_of(resp) == 431
    assert body_of(resp)["error"]["code"] == "headers_too_large"


def test_long_request_line_414(gw, backend):
    resp = raw(gw.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(resp) == 414
    assert backend.count() == 0


def test_body_too_large_413_before_body_is_read(gw, backend):
    # Only the head is sent: the gateway must answer without waiting for the body.
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=3)
    s.sendall(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n")
    resp = s.recv(65536)
    s.close()
    assert status_of(resp) == 413, resp
    assert body_of(resp)["error"]["code"] == "payload_too_large"
    assert backend.count() == 0


def test_chunked_body_over_limit_413(gw, backend):
    status, _, body, _ = curl(gw.url + "/x", "-H", "Transfer-Encoding: chunked", "--data-binary", "a" * 5000)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"


def test_h2_body_over_limit_413(gw, backend):
    status, _, body, _ = curl("--http2-prior-knowledge", gw.url + "/x", "--data-binary", "a" * 5000)
    assert status == 413


def test_slow_headers_are_cut_off(gw, backend):
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
    s.settimeout(4)
    data = s.recv(100)
    s.close()
    assert data == b"", "connection closed after headerReadTimeout"
    assert backend.count() == 0


def test_good_requests_still_pass_after_limits(gw, backend):
    status, _, body, _ = curl(gw.url + "/x", "--data-binary", "a" * 900)
    assert status == 200 and json.loads(body)["body"] == "a" * 900
    status, _, body, _ = curl(gw.url + "/x", "-H", "Transfer-Encoding: chunked", "--data-binary", "b" * 900)
    assert status == 200 and json.loads(body)["body"] == "b" * 900
    # pipelined requests on one connection
    resp = raw(gw.port, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert resp.count(b"HTTP/1.1 200") == 2


def test_idle_connections_are_closed(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"),
                limits="\n  limits: {idleTimeout: 1s}")
    gateways.append(g)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)

    def response():
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(body) < length:
            body += s.recv(65536)
        return head

    s.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response().startswith(b"HTTP/1.1 200")
    # keep-alive: the connection stays usable for a moment...
    time.sleep(0.3)
    s.sendall(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response().startswith(b"HTTP/1.1 200")
    # ...and is closed by the gateway once idle for longer than idleTimeout
    t = time.time()
    assert s.recv(100) == b""
    assert 0.8 < time.time() - t < 3.5
    s.close()


def test_a_reset_http2_stream_does_not_keep_its_connection_open(tmp_path, backend, gateways):
    """A request the client cancels mid-flight (RST_STREAM) is over for the
    connection too: it closes once idle for longer than idleTimeout, as it would
    had the request been answered."""
    import h2.config
    import h2.connection
    import h2.errors
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"),
                limits="\n  limits: {idleTimeout: 1s}")
    gateways.append(g)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=8)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    headers = [(":method", "GET"), (":path", "/slow?ms=5000"), (":scheme", "http"), (":authority", "a")]
    c.send_headers(1, headers, end_stream=True)
    s.sendall(c.data_to_send())
    time.sleep(0.3)  # the request is with the upstream
    c.reset_stream(1, error_code=h2.errors.ErrorCodes.CANCEL)
    s.sendall(c.data_to_send())
    t = time.time()
    # A timeout here: the connection was kept open.
    kinds = [kind for kind, _, _, _ in h2_frames_until_closed(s)]
    s.close()
    assert 0.8 < time.time() - t < 3.5
    assert 0x7 in kinds, kinds  # GOAWAY
    assert 0x1 not in kinds, kinds  # no HEADERS: the cancelled request got no response
    line = abandoned_line(g, "/slow?ms=5000")
    assert line["protocol"] == "HTTP/2.0"


def abandoned_line(g, path):
    """The access-log line of the request to `path` the client gave up on: 499
    (nginx's "client closed request"), nothing sent; and it is counted as a 4xx."""
    wait_for(lambda: any(e.get("path") == path.split("?")[0] for e in g.access_log()),
             "an abandoned request gets its access-log line")
    [line] = [e for e in g.access_log() if e.get("path") == path.split("?")[0]]
    assert line["status"] == 499 and line["bytesSent"] == 0 and line["complete"] is False, line
    assert line["api"] == "all" and line["service"] == "up", line
    assert 0.2 < line["durationMs"] / 1e3 < 3, line  # from the request to the client's leaving
    _, metrics = g.admin("GET", "/metrics")
    assert metric_sum(metrics, "meshgate_requests_total", api="all", status_class="4xx") == 1, metrics
    assert metric_sum(metrics, "meshgate_requests_total", api="all", status_class="2xx") == 0, metrics
    return line


def test_a_request_the_client_abandons_is_logged_as_499(tmp_path, backend, gateways):
    """The HTTP/1 client closes its connection while the upstream is still working."""
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"))
    gateways.append(g)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: a\r\nX-Request-Id: gave-up-1\r\n\r\n")
    time.sleep(0.3)  # the request is with the upstream
    s.close()
    line = abandoned_line(g, "/slow?ms=3000")
    assert line["requestId"] == "gave-up-1" and line["protocol"] == "HTTP/1.1", line


def test_http2_max_concurrent_streams_is_advertised(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"),
                limits="\n  limits: {maxConcurrentStreams: 7}")
    gateways.append(g)
    import subprocess
    out = subprocess.run(["nghttp", "-nv", g.url + "/x"], capture_output=True, text=True, timeout=10).stdout
    assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7" in out, out


def test_refused_requests_are_access_logged(gw, backend):
    resp = raw(gw.port, SMUGGLING[0])
    rid = [l.split(b":", 1)[1].strip().decode() for l in resp.split(b"\r\n") if l.lower().startswith(b"x-request-id")][0]
    assert body_of(resp)["error"]["requestId"] == rid
    deadline = time.time() + 3
    while time.time() < deadline:
        lines = [e for e in gw.access_log() if e.get("requestId") == rid]
        if lines:
            break
        time.sleep(0.05)
    assert lines, "a refused request still gets its access-log line"
    assert lines[0]["status"] == 400 and lines[0]["error"] == "invalid_request"
    assert lines[0]["message"] == "both Content-Length and Transfer-Encoding"


@pytest.mark.parametrize("mode", ["length", "chunked", "h2"])
def test_large_uploads_arrive_intact(tmp_path, backend, gateways, mode):
    """8 MiB streams through the gateway, byte for byte, however it is framed."""
    import hashlib
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"))
    gateways.append(g)
    data = bytes(range(256)) * (8 * 4096)
    f = tmp_path / "upload.bin"
    f.write_bytes(data)
    args = {"length": [], "chunked": ["-H", "Transfer-Encoding: chunked"], "h2": ["--http2-prior-knowledge"]}[mode]
    status, _, body, rc = curl(*args, g.url + "/up", "--data-binary", f"@{f}", timeout=30)
    assert status == 200 and rc == 0
    seen = json.loads(body)["body"].encode("latin-1")
    assert hashlib.sha256(seen).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("first, passed_on", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "websocket"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", None),
])
def test_upgrade_requests_do_not_switch_off_the_guard(gw, backend, first, passed_on):
    # The backend does not switch protocols (a WebSocket handshake is passed on, h2c
    # is not served): the connection stays HTTP/1.1, and the next pipelined request
    # must still be checked.
    smuggle = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    resp = raw(gw.port, first + smuggle)
    assert resp.count(b"HTTP/1.1 200") == 1
    assert b"HTTP/1.1 400" in resp and b"both Content-Length and Transfer-Encoding" in resp
    assert backend.count() == 1
    assert backend.requests[0]["headers"].get("upgrade") == passed_on
