"""gRPC end to end through the gateway with grpcio: unary, server streaming,
status codes, trailers, deadlines, and gateway errors as grpc-status."""

import time
from concurrent import futures

import grpc
import pytest

from harness import Gateway, api, free_port, grpc_service

IDENTITY = dict(request_serializer=None, response_deserializer=None)


FORWARDING = ("x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def _unary(request, context):
    # The forwarding fields the gateway set, echoed back as trailers.
    seen = tuple((f"seen-{k}", v) for k, v in context.invocation_metadata() if k in FORWARDING)
    context.set_trailing_metadata((("x-trailer", "t1"),) + seen)
    return b"echo:" + request


def _stream(request, context):
    for i in range(int(request.decode() or "3")):
        yield f"msg{i}".encode()
    context.set_trailing_metadata((("x-done", "yes"),))


def _fail(request, context):
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nope")


def _slow(request, context):
    time.sleep(2)
    return b"late"


@pytest.fixture
def grpc_server():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture
def gw(tmp_path, grpc_server, gateways):
    res = grpc_service("echo", grpc_server) + grpc_service("dead", free_port()) + api("echo", "/test.Echo/{method}", "{service: echo, timeout: 5s}", methods=["POST"]) + api(
        "dead", "/test.Dead/{method}", "{service: dead}", methods=["POST"]
    )
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


@pytest.fixture
def channel(gw):
    ch = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    yield ch
    ch.close()


def test_unary_with_trailers(channel):
    call = channel.unary_unary("/test.Echo/Unary", **IDENTITY)
    resp, info = call.with_call(b"hi", timeout=5)
    assert resp == b"echo:hi"
    assert ("x-trailer", "t1") in info.trailing_metadata()
    assert info.code() == grpc.StatusCode.OK
    # An HTTP/2 upstream gets the forwarding fields too, each once.
    seen = [(k, v) for k, v in info.trailing_metadata() if k.startswith("seen-")]
    assert sorted(k for k, _ in seen) == sorted(f"seen-{k}" for k in FORWARDING)
    seen = dict(seen)
    assert seen["seen-x-forwarded-for"] == "127.0.0.1"
    assert seen["seen-x-forwarded-proto"] == "http"
    assert len(seen["seen-x-request-id"]) == 32


def test_server_streaming(channel):
    call = channel.unary_stream("/test.Echo/Stream", **IDENTITY)
    stream = call(b"5", timeout=5)
    assert list(stream) == [f"msg{i}".encode() for i in range(5)]
    assert ("x-done", "yes") in stream.trailing_metadata()


def test_status_codes_pass_through(channel):
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/test.Echo/Fail", **IDENTITY)(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == "nope"


def test_deadline_is_honoured(channel):
    t = time.time()
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/test.Echo/Slow", **IDENTITY)(b"", timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.time() - t < 1.5


def test_gateway_deadline_from_grpc_timeout_header(gw):
    # The client's deadline reaches the gateway as grpc-timeout: the gateway itself
    # answers DEADLINE_EXCEEDED when the upstream is slower than it.
    ch = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    with pytest.raises(grpc.RpcError) as e:
        ch.unary_unary("/test.Echo/Slow", **IDENTITY)(b"", timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ch.close()


def test_gateway_errors_are_grpc_status(channel):
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/test.Dead/Unary", **IDENTITY)(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not connect" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/test.Nothing/Unary", **IDENTITY)(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_over_tls_with_alpn_h2(tmp_path, grpc_server, gateways):
    import subprocess
    from harness import free_port
    key, crt = tmp_path / "gw.key", tmp_path / "gw.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=gw.test", "-addext", "subjectAltName=DNS:gw.test",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    tls_port = free_port()
    extra = f"""
    - name: secure
      address: "127.0.0.1:{tls_port}"
      protocol: https
      tls: {{certificates: [{{certFile: "{crt}", keyFile: "{key}", hosts: [gw.test]}}]}}"""
    res = grpc_service("echo", grpc_server) + api("echo", "/test.Echo/{method}", "{service: echo}", methods=["POST"])
    g = Gateway(tmp_path, res, extra_listener=extra)
    gateways.append(g)
    creds = grpc.ssl_channel_credentials(root_certificates=crt.read_bytes())
    ch = grpc.secure_channel(f"127.0.0.1:{tls_port}", creds, options=(("grpc.ssl_target_name_override", "gw.test"),))
    resp, info = ch.unary_unary("/test.Echo/Unary", **IDENTITY).with_call(b"tls", timeout=5)
    assert resp == b"echo:tls"
    assert ("x-trailer", "t1") in info.trailing_metadata()
    assert list(ch.unary_stream("/test.Echo/Stream", **IDENTITY)(b"3", timeout=5)) == [b"msg0", b"msg1", b"msg2"]
    ch.close()
