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

from harness import Gateway, api, curl, h2_frames_until_closed, service

GET = [(":method", "GET"), (":scheme", "http"), (":authority", "a")]


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("all", "/{*rest}", "{service: up}"),
                limits="\n  limits: {maxHeaderBytes: 8192}")
    gateways.append(g)
    return g


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
    frames = h2_frames_until_closed(s)  # a timeout here: the connection was kept open
    s.close()
    goaways = [int.from_bytes(p[4:8], "big") for k, _, _, p in frames if k == 0x7]
    if goaways:
        assert goaways[-1] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
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
    frames = h2_frames_until_closed(s)  # a timeout here: the connection was kept open
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
    while ended != {1, 3}:
        for e in c.receive_data(s.recv(65536)):
            if isinstance(e, h2.events.ResponseReceived):
                statuses[e.stream_id] = dict(e.headers)[":status"]
            elif isinstance(e, h2.events.StreamEnded):
                ended.add(e.stream_id)
                if e.stream_id == 1:  # the next request, once the first is answered
                    c.send_headers(3, GET + [(":path", "/small")], end_stream=True)
        s.sendall(c.data_to_send())
    s.close()
    assert statuses == {1: "431", 3: "200"}, statuses
    assert backend.count() == 1
