"""Tracing: W3C trace context through three services' sidecars, one span per
request per proxy side, exported by OTLP/HTTP (protobuf) or OTLP/gRPC to a real
receiver in the test (`http.server`, or a `grpcio` server) that decodes with the
`opentelemetry-proto` package."""

import ssl
import subprocess
from concurrent import futures
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from harness import BIN, free_port, metric_sum
from test_control_tls import pki  # noqa: F401 (a fixture)
from test_mesh import Mesh


class Receiver:
    """An OTLP/HTTP traces endpoint: every span received, with its resource's
    service.name, as (service, span)."""

    def __init__(self, tls=None):
        """With `tls=(cert, key)` (PEM files) it speaks HTTPS only."""
        self.tls = tls
        self.spans, self.requests = [], []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.take(ExportTraceServiceRequest.FromString(body),
                           (self.path, self.headers["content-type"]))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, request, seen):
        """File an export request's spans, and `seen` (what the test checks of the
        request itself)."""
        with self.lock:
            self.requests.append(seen)
            for rs in request.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)

    @property
    def url(self):
        scheme = "https" if self.tls else "http"
        return f"{scheme}://localhost:{self.port}/v1/traces"

    def of(self, trace_id, n, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{len(got)} spans of {trace_id}, not {n}")

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver(Receiver):
    """An OTLP/gRPC traces endpoint (`TraceService/Export` on a grpcio server);
    with `refuse`, every export is answered with that status code."""

    def __init__(self, refuse=None, tls=None):
        """With `tls=(cert, key)` (PEM files) it speaks TLS only."""
        self.tls = tls
        self.spans, self.requests = [], []
        self.lock = threading.Lock()
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                if refuse:
                    context.abort(refuse, "not today")
                outer.take(request, dict(context.invocation_metadata()))
                return ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        if tls:
            cert, key = (p.read_bytes() for p in tls)
            credentials = grpc.ssl_server_credentials([(key, cert)])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self):
        return f"https://localhost:{self.port}" if self.tls else f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def traced(tmp_path):
    receiver = Receiver()
    mesh = Mesh(tmp_path)
    args = ("--otlp-endpoint", receiver.url)
    _, front = mesh.instance("front", "front-1", args=args)
    orders_app, _ = mesh.instance("orders", "orders-1", args=args)
    users_app, _ = mesh.instance("users", "users-1", args=args)
    yield front, orders_app, users_app, receiver
    mesh.stop()
    receiver.stop()


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT = "00f067aa0ba902b7"


def test_spans_of_three_hops_form_one_trace_with_parent_links(traced):
    front, orders_app, users_app, receiver = traced
    status, _, body = front.call("front", "/call/orders/call/users/end",
                                 {"traceparent": f"00-{TRACE}-{ROOT}-01"})
    assert status == 200, body
    # The apps received the trace, each with the calling proxy's span as parent.
    got = orders_app.requests[-1]["headers"]["traceparent"]
    assert got.startswith(f"00-{TRACE}-") and got.endswith("-01") and ROOT not in got, got
    spans = receiver.of(TRACE, 5)
    assert len(spans) == 5, [(svc, s.name) for svc, s in spans]
    by_id = {s.span_id.hex(): (svc, s) for svc, s in spans}
    # From the last hop back to the caller's span, through every proxy side.
    (svc, users_in), = [(svc, s) for svc, s in spans if svc == "users"]
    walk = []
    span = users_in
    while span.parent_span_id.hex() in by_id:
        walk.append((svc, span.name, span.kind))
        svc, span = by_id[span.parent_span_id.hex()]
    walk.append((svc, span.name, span.kind))
    assert span.parent_span_id.hex() == ROOT, "the first span's parent is the caller's"
    SERVER, CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT
    assert walk == [
        ("users", "meshgate.inbound", SERVER),
        ("orders", "meshgate.outbound.users", CLIENT),
        ("orders", "meshgate.inbound", SERVER),
        ("front", "meshgate.outbound.orders", CLIENT),
        ("front", "meshgate.outbound.front", CLIENT),
    ], walk
    # What the users app was told is its inbound proxy's span.
    assert users_app.requests[-1]["headers"]["traceparent"] == \
        f"00-{TRACE}-{users_in.span_id.hex()}-01"
    attrs = {a.key: (a.value.string_value or a.value.int_value) for a in users_in.attributes}
    assert attrs["meshgate.service"] == "users"
    assert attrs["meshgate.api"] == "meshgate.inbound"
    assert attrs["http.response.status_code"] == 200
    for _, s in spans:
        assert s.end_time_unix_nano > s.start_time_unix_nano
        # Every span lies within its parent's time (same clock on one machine).
        parent = by_id.get(s.parent_span_id.hex())
        if parent:
            assert parent[1].start_time_unix_nano <= s.start_time_unix_nano
            assert s.end_time_unix_nano <= parent[1].end_time_unix_nano
    assert {r for r in receiver.requests} == {("/v1/traces", "application/x-protobuf")}
    # Counted as exported by front's sidecar (its two spans), none dropped.
    deadline = time.time() + 3
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{front.admin_port}/metrics") as r:
            text = r.read().decode()
        exported = metric_sum(text, "meshgate_trace_spans_exported_total")
        if exported >= 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert exported == 2 and metric_sum(text, "meshgate_trace_spans_dropped_total") == 0, text


def test_b3_is_accepted_and_unsampled_traces_are_passed_on_but_not_exported(traced):
    front, orders_app, _, receiver = traced
    b3_trace = "a" * 32
    status, _, body = front.call("front", "/call/orders/x", {"b3": f"{b3_trace}-{ROOT}-1"})
    assert status == 200, body
    assert len(receiver.of(b3_trace, 3)) == 3
    seen = orders_app.requests[-1]["headers"]
    assert seen["traceparent"].startswith(f"00-{b3_trace}-")
    quiet = "b" * 32
    status, _, body = front.call("front", "/call/orders/x", {"traceparent": f"00-{quiet}-{ROOT}-00"})
    assert status == 200, body
    assert orders_app.requests[-1]["headers"]["traceparent"].startswith(f"00-{quiet}-")
    assert orders_app.requests[-1]["headers"]["traceparent"].endswith("-00")
    # Batches go every second: two seconds later, still nothing of it.
    time.sleep(2.2)
    assert [s for _, s in receiver.spans if s.trace_id.hex() == quiet] == []


def test_a_collector_that_is_down_never_fails_a_request(tmp_path):
    mesh = Mesh(tmp_path)
    try:
        _, front = mesh.instance("front", "front-1",
                                 args=("--otlp-endpoint", f"http://127.0.0.1:{free_port()}/v1/traces"))
        for _ in range(20):
            status, _, body = front.call("front", "/x")
            assert status == 200, body
        time.sleep(1.5)
        assert "span export failed" in front.logs()
        assert front.call("front", "/x")[0] == 200
        # Counted: the spans of the first 20 requests (front's outbound side: its
        # own service is the app next door) were dropped, none exported; the last
        # one's batch may not have gone yet.
        with urllib.request.urlopen(f"http://127.0.0.1:{front.admin_port}/metrics") as r:
            text = r.read().decode()
        dropped = metric_sum(text, "meshgate_trace_spans_dropped_total")
        assert 20 <= dropped <= 21, dropped
        assert metric_sum(text, "meshgate_trace_spans_exported_total") == 0
    finally:
        mesh.stop()


@pytest.mark.parametrize("protocol, refusal", [("http", "certificate"), ("grpc", "UnknownIssuer")])
def test_an_https_collector_verified_against_the_given_ca(tmp_path, pki, protocol, refusal):
    tls = (pki / "control.pem", pki / "control.key")
    receiver = GrpcReceiver(tls=tls) if protocol == "grpc" else Receiver(tls=tls)
    mesh = Mesh(tmp_path)
    try:
        otlp = ("--otlp-protocol", protocol, "--otlp-endpoint", receiver.url, "--otlp-ca")
        _, front = mesh.instance("front", "front-1", args=(*otlp, str(pki / "ca.pem")))
        trace = "c" * 32
        status, _, body = front.call("front", "/x", {"traceparent": f"00-{trace}-{ROOT}-01"})
        assert status == 200, body
        (svc, span), = receiver.of(trace, 1)
        assert svc == "front" and span.parent_span_id.hex() == ROOT
        # A proxy that trusts another CA does not send its spans to this collector.
        _, users = mesh.instance("users", "users-1", args=(*otlp, str(pki / "other-ca.pem")))
        stranger = "d" * 32
        status, _, body = users.call("users", "/x", {"traceparent": f"00-{stranger}-{ROOT}-01"})
        assert status == 200, body
        time.sleep(1.5)
        assert "span export failed" in users.logs() and refusal in users.logs(), users.logs()
        assert [s for _, s in receiver.spans if s.trace_id.hex() == stranger] == []
    finally:
        mesh.stop()
        receiver.stop()


def test_a_ca_file_that_is_not_one_is_a_usage_error(tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("hello")
    p = subprocess.run([BIN, "run", "-c", str(tmp_path), "--otlp-endpoint", "https://localhost:1/v1/traces",
                        "--otlp-ca", str(bad)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--otlp-ca" in p.stderr, p.stderr


def test_spans_go_to_an_otlp_grpc_collector(tmp_path):
    receiver = GrpcReceiver()
    refusing = GrpcReceiver(refuse=grpc.StatusCode.PERMISSION_DENIED)
    mesh = Mesh(tmp_path)
    try:
        grpc_args = ("--otlp-protocol", "grpc", "--otlp-endpoint")
        _, front = mesh.instance("front", "front-1", args=(*grpc_args, receiver.url))
        orders_app, _ = mesh.instance("orders", "orders-1", args=(*grpc_args, receiver.url))
        status, _, body = front.call("orders", "/x", {"traceparent": f"00-{TRACE}-{ROOT}-01"})
        assert status == 200, body
        # front's outbound (client) span, then orders' inbound (server) span under it.
        spans = dict(receiver.of(TRACE, 2))
        assert spans["front"].parent_span_id.hex() == ROOT
        assert spans["front"].kind == Span.SPAN_KIND_CLIENT
        assert spans["orders"].parent_span_id == spans["front"].span_id
        assert spans["orders"].kind == Span.SPAN_KIND_SERVER
        sent = orders_app.requests[-1]["headers"]["traceparent"]
        assert sent.split("-")[2] == spans["orders"].span_id.hex()
        assert receiver.requests, "exported through the gRPC service"
        with urllib.request.urlopen(f"http://127.0.0.1:{front.admin_port}/metrics") as r:
            assert metric_sum(r.read().decode(), "meshgate_trace_spans_exported_total") >= 1

        # A collector that answers with an error status: said in the log (once),
        # the spans counted as dropped, the request unharmed.
        _, users = mesh.instance("users", "users-1", args=(*grpc_args, refusing.url))
        for _ in range(3):
            assert users.call("users", "/x")[0] == 200
        time.sleep(1.5)
        assert "span export failed" in users.logs() and "PermissionDenied" in users.logs(), users.logs()
        assert users.logs().count("span export failed") == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{users.admin_port}/metrics") as r:
            text = r.read().decode()
        assert metric_sum(text, "meshgate_trace_spans_dropped_total") >= 3
        assert metric_sum(text, "meshgate_trace_spans_exported_total") == 0
    finally:
        mesh.stop()
        receiver.stop()
        refusing.stop()
    # An OTLP/gRPC endpoint has no path: a traces URL given by mistake is a usage error.
    p = subprocess.run([BIN, "run", "-c", str(tmp_path), "--otlp-protocol", "grpc",
                        "--otlp-endpoint", "http://127.0.0.1:4317/v1/traces"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "without a path" in p.stderr, p.stderr

