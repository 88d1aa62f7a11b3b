"""Active health checks and passive outlier detection, end to end: real backends that
fail, hang, reset and refuse on command drive endpoints out of the balancer and back;
`/upstreams` says which state each endpoint is in and why, and metrics count it."""

import json
from pathlib import Path
import subprocess
import time

import pytest

from harness import BIN, Addr, Backend, Gateway, api, assert_metrics_valid, curl, free_port, service, validate_service, wait_port

CHECKED = """
  healthCheck:
    path: /healthz
    interval: 200ms
    timeout: 150ms
    unhealthyThreshold: 2
    healthyThreshold: 2"""

TCP = """
  healthCheck: {type: tcp, interval: 200ms, timeout: 150ms, unhealthyThreshold: 1, healthyThreshold: 1}"""

OUTLIER = """
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 2s, maxEjectionPercent: 50}"""


@pytest.fixture
def pair():
    a, b = Backend("a"), Backend("b")
    yield a, b
    a.stop()
    b.stop()


def start(tmp_path, gateways, pair, extra):
    a, b = pair
    g = Gateway(tmp_path, service("svc", a, b, extra=extra) + api("all", "/{*rest}", "{service: svc}"))
    gateways.append(g)
    return g


def endpoints(gw):
    _, body = gw.admin("GET", "/upstreams")
    svc = next(s for s in json.loads(body)["services"] if s["service"] == "svc")
    return {e["address"]: e for e in svc["endpoints"]}, svc


def wait_state(gw, backend, state, timeout=5.0, checks=0):
    """Waits until `backend` is in `state` and, when `checks` is set, has been probed
    at least that many times (probes of one round finish in any order)."""
    deadline = time.time() + timeout
    while True:
        e = endpoints(gw)[0][backend.addr]
        if e["health"] == state and (not checks or e["healthCheck"]["checks"] >= checks):
            return e
        assert time.time() < deadline, f"{backend.name} stayed {e['health']}: {e['reason']} ({e.get('healthCheck')})"
        time.sleep(0.05)


def served_by(gw, n=20, path="/x"):
    seen = {}
    for _ in range(n):
        status, headers, _, _ = curl(gw.url + path)
        key = headers.get("x-backend", str(status))
        seen[key] = seen.get(key, 0) + 1
    return seen


def metric(gw, needle):
    _, text = gw.admin("GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(needle + " "):
            return float(line.split()[-1])
    return None


def test_a_failing_health_check_takes_the_endpoint_out_until_it_passes_again(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, CHECKED)
    wait_state(g, b, "healthy")
    assert endpoints(g)[0][b.addr]["reason"] == "passing its health checks"
    assert any(r["path"] == "/healthz" and r["headers"]["user-agent"] == "meshgate-health-check" for r in b.requests)
    assert served_by(g) == {"a": 10, "b": 10}

    b.mode = "fail"
    e = wait_state(g, b, "unhealthy")
    assert "/healthz answered 500" in e["reason"] and e["healthCheck"]["failedInRow"] >= 2, e
    assert served_by(g) == {"a": 20}, "an unhealthy endpoint takes no traffic"
    assert metric(g, 'meshgate_upstream_endpoints{service="svc",state="unhealthy"}') == 1
    assert metric(g, 'meshgate_health_checks_total{service="svc",result="failed"}') >= 2
    _, text = g.admin("GET", "/metrics")
    assert_metrics_valid(text)

    b.heal()
    wait_state(g, b, "healthy")
    assert served_by(g) == {"a": 10, "b": 10}
    assert metric(g, 'meshgate_upstream_endpoints{service="svc",state="healthy"}') == 2


def test_hanging_and_refusing_endpoints_fail_their_checks_with_the_reason(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, CHECKED)
    b.mode = "hang"
    e = wait_state(g, b, "unhealthy")
    assert "no answer within 150ms" in e["reason"], e
    b.heal()
    wait_state(g, b, "healthy")

    b.refuse()
    e = wait_state(g, b, "unhealthy")
    assert "connect" in e["reason"] and "refused" in e["reason"].lower(), e
    b.heal()
    wait_state(g, b, "healthy")


def test_tcp_check(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, TCP)
    wait_state(g, a, "healthy")
    a.refuse()
    wait_state(g, a, "unhealthy")
    # A TCP check cares only that the port accepts: a 500 on every path passes.
    b.mode = "fail"
    time.sleep(0.5)
    assert endpoints(g)[0][b.addr]["health"] == "healthy"
    a.heal()
    wait_state(g, a, "healthy")


def test_both_endpoints_failing_is_panic_mode_and_both_still_take_traffic(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, CHECKED)
    a.mode = b.mode = "fail"
    wait_state(g, a, "unhealthy")
    wait_state(g, b, "unhealthy")
    _, svc = endpoints(g)
    assert svc["panic"] is True
    # Requests are spread over both (they answer 500: the gateway does not hide it).
    a.mode = b.mode = "ok"
    before = (a.count(), b.count())
    for _ in range(10):
        curl(g.url + "/x")
    assert a.count() > before[0] and b.count() > before[1]


def test_consecutive_errors_eject_an_endpoint_for_a_growing_time(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, OUTLIER)
    e = endpoints(g)[0][b.addr]
    assert e["health"] == "healthy" and e["outlier"]["ejected"] is False
    b.mode = "fail"
    statuses = [curl(g.url + "/x")[0] for _ in range(6)]
    assert statuses.count(500) == 3, statuses
    e = endpoints(g)[0][b.addr]
    assert e["health"] == "ejected" and e["outlier"]["ejections"] == 1, e
    assert "3 consecutive 5xx" in e["reason"], e
    assert 0 < e["outlier"]["ejectedForMs"] <= 2000
    assert served_by(g) == {"a": 20}
    assert metric(g, 'meshgate_outlier_ejections_total{service="svc"}') == 1
    assert metric(g, 'meshgate_upstream_endpoints{service="svc",state="ejected"}') == 1

    # Its time is up: it returns, still failing, and is ejected again for twice as long.
    wait_state(g, b, "healthy", timeout=4)
    for _ in range(8):
        curl(g.url + "/x")
    e = endpoints(g)[0][b.addr]
    assert e["health"] == "ejected" and e["outlier"]["ejections"] == 2, e
    assert e["outlier"]["ejectedForMs"] > 2000, e

    b.heal()
    wait_state(g, b, "healthy", timeout=6)
    assert served_by(g) == {"a": 10, "b": 10}


def test_resets_eject_and_max_ejection_percent_keeps_one_endpoint(tmp_path, gateways, pair):
    a, b = pair
    g = start(tmp_path, gateways, pair, OUTLIER)
    a.mode = "reset"
    b.mode = "reset"
    statuses = [curl(g.url + "/x")[0] for _ in range(12)]
    assert set(statuses) == {502}, statuses
    eps, _ = endpoints(g)
    states = sorted(e["health"] for e in eps.values())
    assert states == ["ejected", "healthy"], "50% of two endpoints: only one may be out"
    ejected = next(e for e in eps.values() if e["health"] == "ejected")
    assert "consecutive 5xx answers or connection errors" in ejected["reason"]


@pytest.mark.parametrize("extra, message", [
    ("\n  healthCheck: {interval: 1s}", "spec.healthCheck.path: an http check needs a path"),
    ("\n  healthCheck:\n    path: /h\n    timeout: 2s\n    interval: 1s", "spec.healthCheck.timeout: must be above zero"),
    ("\n  outlierDetection: {maxEjectionPercent: 150}", "spec.outlierDetection.maxEjectionPercent: a percentage"),
])
def test_bad_health_config_is_reported_with_file_and_line(tmp_path, extra, message):
    out = validate_service(tmp_path, "svc", extra)
    assert message in out, out


def test_http2_services_are_checked_over_h2c(tmp_path, gateways):
    """An `http2` Service is probed with HTTP/2 prior knowledge: the h2c-only path of
    bench-backend passes; a closed port fails with its reason."""
    port, dead = free_port(), free_port()
    proc = subprocess.Popen([str(Path(BIN).parent / "bench-backend"), f"127.0.0.1:{port}"])
    try:
        wait_port(port)
        live, gone = Addr(f"127.0.0.1:{port}", "h2"), Addr(f"127.0.0.1:{dead}", "dead")
        g = Gateway(tmp_path, service("svc", live, gone, extra="\n  protocol: http2" + CHECKED)
                    + api("all", "/{*rest}", "{service: svc}"))
        gateways.append(g)
        e = wait_state(g, gone, "unhealthy")
        assert "connect" in e["reason"], e
        e = wait_state(g, live, "healthy", checks=2)
        assert e["healthCheck"]["failedInRow"] == 0 and e["reason"] == "passing its health checks", e
        # Only the live endpoint takes traffic.
        assert {curl(g.url + "/x")[0] for _ in range(6)} == {200}
    finally:
        proc.kill()
        proc.wait()
