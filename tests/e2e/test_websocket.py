"""WebSocket through the gateway: the handshake is routed, filtered and passed
upstream as one; after the upstream's 101 the connection relays frames both ways.
Real peers: the `websockets` library as server and client."""

import json
import os
import signal
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

from harness import Addr, Gateway, Sidecar, api, curl, filters, service, wait_for

CONSUMER = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: alice}
spec:
  credentials:
    - {type: key, key: alice-ws-key}
"""


class WsBackend:
    """A WebSocket server on a loopback port. The first message on a connection may
    be "hello?", answered with what the handshake carried (path and headers);
    everything else is echoed. `closed` counts connections that ended."""

    def __init__(self):
        self.closed = 0
        self.server = serve(self.handle, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.name = "ws"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, ws):
        try:
            for message in ws:
                if message == "hello?":
                    ws.send(json.dumps({"path": ws.request.path,
                                        "headers": {k.lower(): v for k, v in ws.request.headers.raw_items()}}))
                else:
                    ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed += 1

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def ws_backend():
    b = WsBackend()
    yield b
    b.stop()


def ws_gateway(tmp_path, gateways, ws, plain, limits=""):
    res = (service("ws", ws) + service("plain", plain) + CONSUMER
           + api("chat", "/chat/{*rest}", "{service: ws}")
           + api("keyed", "/keyed/{*rest}", "{service: ws}",
                 extra=filters("{name: key-auth, config: {header: x-api-key}}"))
           + api("plain", "/plain/{*rest}", "{service: plain}"))
    g = Gateway(tmp_path, res, limits=limits)
    gateways.append(g)
    return g


def ws_url(g, path):
    return f"ws://127.0.0.1:{g.port}{path}"


def test_messages_go_both_ways_and_the_handshake_is_proxied(tmp_path, gateways, ws_backend, backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, backend)
    with connect(ws_url(g, "/chat/room/../room1?x=1"), additional_headers={"x-request-id": "ws-req-1"}) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["x-request-id"] == "ws-req-1"
        ws.send("hello?")
        seen = json.loads(ws.recv(timeout=5))
        # Routed and normalised like any request, with the gateway's forwarding fields.
        assert seen["path"] == "/chat/room1?x=1"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["x-request-id"] == "ws-req-1"
        assert seen["headers"]["upgrade"].lower() == "websocket"
        for text in ("one", "two", "ü" * 1000):
            ws.send(text)
            assert ws.recv(timeout=5) == text
        big = os.urandom(600_000)
        ws.send(big)
        assert ws.recv(timeout=10) == big
    wait_for(lambda: ws_backend.closed == 1, "the backend to see the close")
    line = next(l for l in g.access_log() if l.get("requestId") == "ws-req-1")
    assert line["status"] == 101 and line["api"] == "chat", line


def test_filters_judge_the_handshake(tmp_path, gateways, ws_backend, backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, backend)
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(g, "/keyed/feed"))
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "unauthorized"
    with connect(ws_url(g, "/keyed/feed"), additional_headers={"x-api-key": "alice-ws-key"}) as ws:
        ws.send("hello?")
        seen = json.loads(ws.recv(timeout=5))
        assert seen["headers"]["x-consumer-name"] == "alice"
        assert "x-api-key" not in seen["headers"]


def test_an_upstream_that_does_not_switch_answers_as_http(tmp_path, gateways, ws_backend, backend):
    """The plain echo backend answers the handshake with 200: the client gets that
    answer, and the connection stays HTTP/1.1 under the guard."""
    g = ws_gateway(tmp_path, gateways, ws_backend, backend)
    with pytest.raises(InvalidStatus) as answered:
        connect(ws_url(g, "/plain/x"))
    assert answered.value.response.status_code == 200
    seen = json.loads(answered.value.response.body)
    assert seen["headers"]["upgrade"] == "websocket"
    assert "upgrade" in seen["headers"]["connection"].lower()
    # One connection: the handshake answered 200, then a plain request on it.
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    try:
        s.sendall((f"GET /plain/a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                   "GET /plain/b HTTP/1.1\r\nHost: x\r\n\r\n").encode())
        got = b""
        deadline = time.time() + 5
        while got.count(b"HTTP/1.1 200") < 2 and time.time() < deadline:
            got += s.recv(65536)
        assert got.count(b"HTTP/1.1 200") == 2, got
        assert b"101" not in got.split(b"\r\n", 1)[0]
    finally:
        s.close()


def test_other_upgrades_and_posts_are_not_switched(tmp_path, gateways, ws_backend, backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, backend)
    # h2c is not served over an upgrade: a plain HTTP/1.1 request upstream.
    status, _, body, _ = curl("-H", "Connection: Upgrade, HTTP2-Settings", "-H", "Upgrade: h2c",
                              "-H", "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA", g.url + "/plain/h")
    assert status == 200
    assert "upgrade" not in json.loads(body)["headers"]
    # A handshake must be a GET without a body.
    status, _, body, _ = curl("-X", "POST", "--data", "x", "-H", "Connection: Upgrade",
                              "-H", "Upgrade: websocket", g.url + "/plain/p")
    assert status == 200
    assert "upgrade" not in json.loads(body)["headers"]


def test_an_idle_websocket_is_closed_after_tcp_idle_timeout(tmp_path, gateways, ws_backend, backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, backend, limits="\n  limits: {tcpIdleTimeout: 1s}")
    with connect(ws_url(g, "/chat/idle"), ping_interval=None) as ws:
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"
        time.sleep(0.6)  # activity within the timeout keeps it
        ws.send("again")
        assert ws.recv(timeout=5) == "again"
        began = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
        assert time.monotonic() - began < 3
    wait_for(lambda: ws_backend.closed == 1, "the backend's side to close too")


def test_a_refused_upstream_is_a_502_for_the_handshake(tmp_path, gateways, ws_backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, Addr("127.0.0.1:1", "closed"))
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(g, "/plain/x"))
    assert refused.value.response.status_code == 502
    assert json.loads(refused.value.response.body)["error"]["code"] == "upstream_unavailable"


def test_a_websocket_crosses_the_mesh_over_mtls(tmp_path, ws_backend):
    """The app of `front` opens a WebSocket to `orders` by name through its sidecar;
    the two sidecars speak mesh mTLS, and `orders`' authz admits `front` only."""
    from test_mesh_tls import TD, TlsMesh

    mesh = TlsMesh(tmp_path)
    try:
        _, front = mesh.instance("front", "front-1")
        orders = Sidecar(tmp_path, mesh.control.url, "orders-ws", "orders", ws_backend.addr).start()
        mesh.sidecars.append(orders)
        mesh.wait_registered("orders", [orders.address])
        sock = socket.create_connection(("127.0.0.1", front.outbound), timeout=5)
        with connect("ws://orders/stream", sock=sock) as ws:
            ws.send("hello?")
            seen = json.loads(ws.recv(timeout=5))
            assert seen["headers"]["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/svc/front"
            for text in ("a", "b" * 70_000):
                ws.send(text)
                assert ws.recv(timeout=5) == text
        # A caller authz does not admit is refused at the handshake.
        _, users = mesh.instance("users", "users-1")
        sock = socket.create_connection(("127.0.0.1", users.outbound), timeout=5)
        with pytest.raises(InvalidStatus) as denied:
            connect("ws://orders/stream", sock=sock)
        assert denied.value.response.status_code == 403
    finally:
        mesh.stop()


def test_on_sigterm_an_open_websocket_relays_until_the_drain_timeout(tmp_path, gateways, ws_backend, backend):
    g = ws_gateway(tmp_path, gateways, ws_backend, backend)  # drainTimeout: 5s
    with connect(ws_url(g, "/chat/drain"), ping_interval=None) as ws:
        ws.send("before")
        assert ws.recv(timeout=5) == "before"
        began = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        ws.send("while draining")
        assert ws.recv(timeout=5) == "while draining"
        assert g.proc.wait(15) == 0
        assert 4 < time.monotonic() - began < 10
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
