"""TLS with SNI and ALPN; admin endpoints; graceful shutdown on SIGTERM."""

import json
import socket
import ssl
import subprocess
import threading
import time

import pytest

from harness import Gateway, api, assert_metrics_valid, curl, free_port, service


def make_cert(dir, name):
    key, crt = dir / f"{name}.key", dir / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )
    return key, crt


@pytest.fixture
def tls_gw(tmp_path, backend, gateways):
    a_key, a_crt = make_cert(tmp_path, "a.test")
    b_key, b_crt = make_cert(tmp_path, "b.test")
    port = free_port()
    extra = f"""
    - name: secure
      address: "127.0.0.1:{port}"
      protocol: https
      tls:
        certificates:
          - {{certFile: "{a_crt}", keyFile: "{a_key}", hosts: [a.test]}}
          - {{certFile: "{b_crt}", keyFile: "{b_key}", hosts: ["*.b.test", b.test]}}"""
    g = Gateway(tmp_path, service("up", backend) + api("x", "/x", "{service: up}"), extra_listener=extra)
    g.tls_port = port
    gateways.append(g)
    return g


def peer_cn(port, sni):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port)) as s, ctx.wrap_socket(s, server_hostname=sni) as t:
        der = t.getpeercert(binary_form=True)
        alpn = t.selected_alpn_protocol()
    pem = ssl.DER_cert_to_PEM_cert(der)
    out = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem.encode(), capture_output=True).stdout
    return out.decode().strip(), alpn


def test_sni_picks_the_certificate(tls_gw):
    assert peer_cn(tls_gw.tls_port, "a.test") == ("subject=CN = a.test", "h2")
    assert peer_cn(tls_gw.tls_port, "x.b.test")[0] == "subject=CN = b.test"
    assert peer_cn(tls_gw.tls_port, "b.test")[0] == "subject=CN = b.test"


@pytest.mark.parametrize("proto,version", [("--http1.1", "1.1"), ("--http2", "2")])
def test_https_alpn_h1_and_h2(tls_gw, proto, version):
    p = subprocess.run(
        ["curl", "-sS", "-k", proto, "--resolve", f"a.test:{tls_gw.tls_port}:127.0.0.1",
         "-o", "/dev/null", "-w", "%{http_code} %{http_version}", f"https://a.test:{tls_gw.tls_port}/x"],
        capture_output=True, timeout=10,
    )
    assert p.stdout.decode() == f"200 {version}"


def test_https_forwards_proto(tls_gw, backend):
    p = subprocess.run(
        ["curl", "-sS", "-k", "--resolve", f"a.test:{tls_gw.tls_port}:127.0.0.1", f"https://a.test:{tls_gw.tls_port}/x"],
        capture_output=True, timeout=10,
    )
    assert json.loads(p.stdout)["headers"]["x-forwarded-proto"] == "https"


def test_admin_endpoints(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("x", "/x", "{service: up}"))
    gateways.append(g)
    for _ in range(3):
        curl(g.url + "/x")
    curl(g.url + "/missing")
    assert g.admin("GET", "/ready") == (200, "ready\n")
    status, metrics = g.admin("GET", "/metrics")
    assert status == 200
    assert_metrics_valid(metrics)
    assert 'meshgate_requests_total{gateway="public",api="x",service="up",status_class="2xx"} 3' in metrics
    assert 'meshgate_requests_total{gateway="public",api="",service="",status_class="4xx"} 1' in metrics
    assert "meshgate_request_duration_seconds_bucket" in metrics
    assert "meshgate_upstream_duration_seconds_bucket" in metrics
    assert 'meshgate_upstream_connections{service="up"} 1' in metrics
    cfg = json.loads(g.admin("GET", "/config")[1])
    assert len(cfg["revision"]) == 16
    kinds = sorted(r["kind"] for r in cfg["resources"])
    assert kinds == ["Api", "Gateway", "Service"]
    ups = json.loads(g.admin("GET", "/upstreams")[1])
    assert ups["services"][0]["endpoints"][0]["address"] == backend.addr
    assert g.admin("GET", "/nothing")[0] == 404
    # access log: one JSON line per request with the SPEC's fields
    time.sleep(0.3)
    log = g.access_log()
    assert len(log) == 4
    e = log[0]
    for field in ["time", "requestId", "api", "consumer", "upstream", "status", "bytesSent", "durationMs"]:
        assert field in e
    assert e["api"] == "x" and e["upstream"] == backend.addr and e["status"] == 200


def test_sigterm_drains_in_flight_and_exits_zero(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("slow", "/slow", "{service: up}"))
    gateways.append(g)
    result = {}

    def slow_request():
        result["r"] = curl(g.url + "/slow?ms=1000")

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.3)
    g.proc.send_signal(15)
    time.sleep(0.2)
    assert g.admin("GET", "/ready") == (503, "draining\n")
    # new connections are refused once draining started
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", g.port), timeout=1).close()
    t.join()
    status, headers, body, rc = result["r"]
    assert status == 200 and rc == 0
    assert headers.get("connection") == "close"
    assert g.proc.wait(10) == 0


def test_sigterm_drains_http2_with_goaway(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("slow", "/slow", "{service: up}"))
    gateways.append(g)
    result = {}

    def slow_request():
        result["r"] = curl("--http2-prior-knowledge", g.url + "/slow?ms=1000")

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.3)
    g.proc.send_signal(15)
    t.join()
    status, _, body, rc = result["r"]
    assert status == 200 and rc == 0, "the in-flight h2 stream completes after GOAWAY"
    assert json.loads(body)["path"] == "/slow"
    assert g.proc.wait(10) == 0
