"""Circuit breakers per Service, end to end: a real backend answering 500 on command
trips the breaker; the fallback or 503 circuit_open is answered without calling it; a
half-open probe closes it again. State shows in /upstreams and in metrics."""

import http.client
import json
import threading
import time

import pytest

from harness import Gateway, api, assert_metrics_valid, curl, service, validate_service

FALLBACK = """
  circuitBreaker:
    failureRateThreshold: 50
    minimumRequests: 4
    window: 10s
    openFor: 1s
    fallback: {status: 200, headers: {x-degraded: "yes"}, body: {degraded: true}}"""

STRICT = "\n  circuitBreaker: {minimumRequests: 2, openFor: 1s, halfOpenRequests: 1}"
NARROW = "\n  circuitBreaker: {maxRequests: 1}"


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = (service("up", backend, extra=FALLBACK)
           + service("strict", backend, extra=STRICT)
           + service("narrow", backend, extra=NARROW)
           + api("fail", "/status/{*rest}", "{service: up}")
           + api("ok", "/ok", "{service: up}")
           + api("strict-fail", "/strict/fail", "{service: strict, path: /status/500}")
           + api("strict-ok", "/strict/ok", "{service: strict, path: /ok}")
           + api("narrow", "/narrow/slow", "{service: narrow, path: /slow}"))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def breaker(gw, name):
    _, body = gw.admin("GET", "/upstreams")
    return next(s for s in json.loads(body)["services"] if s["service"] == name)["circuitBreaker"]


def test_failures_open_the_breaker_and_the_fallback_answers(gw, backend):
    assert breaker(gw, "up")["state"] == "closed"
    assert [curl(gw.url + "/status/500")[0] for _ in range(4)] == [500] * 4
    assert breaker(gw, "up")["state"] == "open"
    seen = len(backend.requests)
    status, headers, body, _ = curl(gw.url + "/ok")
    assert status == 200 and json.loads(body) == {"degraded": True} and headers["x-degraded"] == "yes"
    assert len(backend.requests) == seen, "an open breaker does not call the Service"
    _, text = gw.admin("GET", "/metrics")
    assert 'meshgate_circuit_breaker_opened_total{service="up"} 1' in text
    assert 'meshgate_circuit_breaker_refused_total{service="up"} 1' in text
    assert_metrics_valid(text)
    # After openFor, one probe goes through; it succeeds and the breaker closes.
    time.sleep(1.1)
    assert breaker(gw, "up")["state"] == "half-open"
    status, _, body, _ = curl(gw.url + "/ok")
    assert status == 200 and json.loads(body)["path"] == "/ok"
    assert breaker(gw, "up")["state"] == "closed"


def test_without_fallback_503_circuit_open_and_a_failed_probe_reopens(gw, backend):
    assert [curl(gw.url + "/strict/fail")[0] for _ in range(2)] == [500, 500]
    status, headers, body, _ = curl(gw.url + "/strict/ok")
    assert status == 503 and json.loads(body)["error"]["code"] == "circuit_open" and headers["x-request-id"]
    time.sleep(1.1)
    assert curl(gw.url + "/strict/fail")[0] == 500  # the probe, and it fails
    assert breaker(gw, "strict")["state"] == "open"
    assert curl(gw.url + "/strict/ok")[0] == 503
    time.sleep(1.1)
    assert curl(gw.url + "/strict/ok")[0] == 200
    assert breaker(gw, "strict")["state"] == "closed"
    assert breaker(gw, "strict")["opened"] == 2


def test_max_requests_caps_what_is_in_flight(gw):
    out = {}

    def slow(i):
        out[i] = curl(gw.url + "/narrow/slow?ms=800")[0]
    t = threading.Thread(target=slow, args=(0,))
    t.start()
    time.sleep(0.3)
    assert breaker(gw, "narrow")["inFlight"] == 1
    status, _, body, _ = curl(gw.url + "/narrow/slow?ms=1")
    assert status == 503 and json.loads(body)["error"]["code"] == "circuit_open"
    t.join()
    assert out[0] == 200
    assert curl(gw.url + "/narrow/slow?ms=1")[0] == 200


POOLED = "\n  circuitBreaker: {maxConnections: 2, maxPendingRequests: 3}"


def get_status(url, out, i):
    c = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
    c.request("GET", f"/pooled/slow?ms=1000&i={i}")
    r = c.getresponse()
    body = r.read()
    out[i] = (r.status, json.loads(body).get("error", {}).get("code") if r.status != 200 else None)
    c.close()


def test_max_connections_and_pending_requests_bound_the_pool(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("pooled", backend, extra=POOLED)
                + api("pooled", "/pooled/{*rest}", "{service: pooled, path: '/{rest}'}"))
    gateways.append(g)
    out = {}
    threads = [threading.Thread(target=get_status, args=(g.url, out, i)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    mid = breaker(g, "pooled")
    for t in threads:
        t.join()
    # Two on the connections, three waiting; the other five refused at once.
    assert (mid["connections"], mid["pending"]) == (2, 3), mid
    statuses = sorted(out.values(), key=str)
    assert statuses == [(200, None)] * 5 + [(503, "circuit_open")] * 5, statuses
    peers = {r["peer"] for r in backend.requests}
    assert len(peers) == 2, f"the backend saw {len(peers)} connections"
    after = breaker(g, "pooled")
    assert (after["pending"], after["pendingOverflow"], after["connections"]) == (0, 5, 2), after
    _, text = g.admin("GET", "/metrics")
    assert 'meshgate_circuit_breaker_refused_total{service="pooled"} 5' in text
    assert 'meshgate_upstream_connections{service="pooled"} 2' in text


def test_waiting_too_long_for_a_connection_is_504_and_ejects_no_endpoint(tmp_path, backend, gateways):
    extra = ("\n  circuitBreaker: {maxConnections: 1, fallback: {status: 299}}"
             "\n  outlierDetection: {consecutiveGatewayErrors: 1}")
    g = Gateway(tmp_path, service("single", backend, extra=extra)
                + api("long", "/long", "{service: single, path: /slow, timeout: 5s}")
                + api("short", "/short", "{service: single, path: /ok, timeout: 300ms}"))
    gateways.append(g)
    out = {}
    t = threading.Thread(target=lambda: out.update(long=curl(g.url + "/long?ms=1200")[0]))
    t.start()
    time.sleep(0.3)
    status, _, body, _ = curl(g.url + "/short")
    assert status == 504, body
    assert "no connection to service \"single\" came free in time" in json.loads(body)["error"]["message"]
    t.join()
    assert out["long"] == 200
    _, body = g.admin("GET", "/upstreams")
    svc = next(s for s in json.loads(body)["services"] if s["service"] == "single")
    assert [e["health"] for e in svc["endpoints"]] == ["healthy"], svc["endpoints"]
    # The connection is free again: the short Api is answered on it.
    assert curl(g.url + "/short")[0] == 200
    assert len({r["peer"] for r in backend.requests}) == 1


def test_pending_overflow_answers_the_fallback(tmp_path, backend, gateways):
    extra = ("\n  circuitBreaker: {maxConnections: 1, maxPendingRequests: 1,"
             " fallback: {status: 200, headers: {x-degraded: pool}, body: {cached: true}}}")
    g = Gateway(tmp_path, service("pooled", backend, extra=extra)
                + api("pooled", "/pooled/{*rest}", "{service: pooled, path: '/{rest}'}"))
    gateways.append(g)
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.update({i: curl(g.url + "/pooled/slow?ms=800")}))
               for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.15)
    status, headers, body, _ = curl(g.url + "/pooled/ok")
    assert (status, headers.get("x-degraded"), json.loads(body)) == (200, "pool", {"cached": True})
    for t in threads:
        t.join()
    assert [out[i][0] for i in range(2)] == [200, 200]
    assert json.loads(out[1][2])["path"] == "/slow", "the waiting request was answered by the backend"


@pytest.mark.parametrize("extra,message", [
    ("\n  circuitBreaker: {maxConnections: 0}", "spec.circuitBreaker.maxConnections: must be at least 1"),
    ("\n  protocol: http2\n  circuitBreaker: {maxPendingRequests: 5}",
     "spec.circuitBreaker.maxPendingRequests: only applies to HTTP/1.1 Services"),
    ("\n  circuitBreaker: {failureRateThreshold: 0}", "a percentage from 1 to 100"),
    ("\n  circuitBreaker: {openFor: soon}", "spec.circuitBreaker.openFor"),
    ("\n  circuitBreaker: {fallback: {headers: {'bad header': x}}}", "fallback.headers.bad header"),
])
def test_bad_breaker_configs_are_errors(tmp_path, extra, message):
    out = validate_service(tmp_path, "up", extra)
    assert "Service/up: spec.circuitBreaker" in out and message in out, out
