"""HTTP/2 abuse, frame by frame: a rapid-reset flood (CVE-2023-44487), an endless
CONTINUATION sequence (CVE-2024-27316 and kin) and an oversized header block. Each
gets a clear answer (a GOAWAY or a 431), costs the upstream almost nothing, and the
gateway goes on serving everybody else."""

import socket
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest

from harness import Gateway, api, curl, service

GET = [(":method", "GET"), (":scheme", "http"), (":authority", "a")]


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"),
                limits="\n  limits: {maxHeaderBytes: 8192}")
    gateways.append(g)
    return g


def frames_until_closed(s, deadline=8.0):
    """The server's frames as (type, flags, stream, payload) until it closes the
    connection, answering its SETTINGS and PINGs as a client does."""
    s.settimeout(deadline)
    buf, out = b"", []
    try:
        while data := s.recv(65536):
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + n], buf[9 + n:]
                out.append((kind, flags, stream, payload))
                if kind == 0x4 and not flags & 1:
                    s.sendall(b"\0\0\0\x04\x01\0\0\0\0")
    except (ConnectionResetError, BrokenPipeError):
        pass
    return out


def goaway_code(frames):
    codes = [int.from_bytes(p[4:8], "big") for k, _, _, p in frames if k == 0x7]
    assert codes, f"no GOAWAY in {[(k, st) for k, _, st, _ in frames]}"
    return codes[-1]


def client():
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def still_serves(g):
    status, _, body, _ = curl("--http2-prior-knowledge", g.url + "/after")
    assert status == 200, body


def send_until_refused(s, chunks):
    """Send each chunk until the server stops reading; how many went out."""
    sent = 0
    try:
        for chunk in chunks:
            s.sendall(chunk)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_a_rapid_reset_flood_closes_the_connection(gw, backend):
    """HEADERS then RST_STREAM, a thousand times: the connection is closed (with
    GOAWAY when it can still be read), instead of the gateway opening and
    cancelling upstream work for every stream; other clients are served."""
    s = socket.create_connection(("127.0.0.1", gw.port))
    c = client()

    def pairs():
        for stream in range(1, 2001, 2):
            c.send_headers(stream, GET + [(":path", "/slow?ms=2000")], end_stream=True)
            c.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
            yield c.data_to_send()

    sent = send_until_refused(s, pairs())
    frames = frames_until_closed(s)  # a timeout here: the connection was kept open
    s.close()
    if any(k == 0x7 for k, _, _, _ in frames):
        assert goaway_code(frames) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert not any(k == 0x1 for k, _, _, _ in frames), "no stream was answered"
    time.sleep(0.5)
    assert backend.count() < 50, f"{backend.count()} of {sent} reset streams reached the upstream"
    still_serves(gw)


def test_an_endless_continuation_sequence_closes_the_connection(gw, backend):
    """A header block that never ends (HEADERS without END_HEADERS, then
    CONTINUATION frames of 1 KB each, 20 MB in all): the gateway stops reading it
    once the block passes its header limit, and closes the connection."""
    import hpack
    s = socket.create_connection(("127.0.0.1", gw.port))
    c = client()
    s.sendall(c.data_to_send())
    enc = hpack.Encoder()
    first = enc.encode(GET + [(":path", "/never")])
    s.sendall(len(first).to_bytes(3, "big") + b"\x01\x01" + (1).to_bytes(4, "big") + first)
    piece = enc.encode([("x-filler", "a" * 1000)])
    frame = len(piece).to_bytes(3, "big") + b"\x09\x00" + (1).to_bytes(4, "big") + piece
    sent = send_until_refused(s, (frame for _ in range(20_000)))
    frames = frames_until_closed(s)  # a timeout here: the connection was kept open
    s.close()
    assert sent < 20_000, "the gateway read 20 MB of one header block"
    assert not any(k == 0x1 for k, _, _, _ in frames)
    assert backend.count() == 0
    still_serves(gw)


def test_an_oversized_header_block_gets_431_and_the_connection_goes_on(gw, backend):
    """Past maxHeaderBytes an HTTP/2 request is answered 431 on its stream; the
    connection stays up and its next request is served."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    c = client()
    c.send_headers(1, GET + [(":path", "/big"), ("x-big", "b" * 10_000)], end_stream=True)
    s.sendall(c.data_to_send())
    statuses, ended = {}, set()
    sent_second = False
    while len(ended) < (2 if sent_second else 1) or not sent_second:
        for e in c.receive_data(s.recv(65536)):
            if isinstance(e, h2.events.ResponseReceived):
                statuses[e.stream_id] = dict(e.headers)[":status"]
            elif isinstance(e, h2.events.StreamEnded):
                ended.add(e.stream_id)
        if 1 in ended and not sent_second:
            c.send_headers(3, GET + [(":path", "/small")], end_stream=True)
            sent_second = True
        s.sendall(c.data_to_send())
    s.close()
    assert statuses == {1: "431", 3: "200"}, statuses
    assert backend.count() == 1
