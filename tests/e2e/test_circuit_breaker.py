"""Circuit breakers per Service, end to end: a real backend answering 500 on command
trips the breaker; the fallback or 503 circuit_open is answered without calling it; a
half-open probe closes it again. State shows in /upstreams and in metrics."""

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


@pytest.mark.parametrize("extra,message", [
    ("\n  circuitBreaker: {maxConnections: 10}", "maxConnections is not built yet"),
    ("\n  circuitBreaker: {failureRateThreshold: 0}", "a percentage from 1 to 100"),
    ("\n  circuitBreaker: {openFor: soon}", "spec.circuitBreaker.openFor"),
    ("\n  circuitBreaker: {fallback: {headers: {'bad header': x}}}", "fallback.headers.bad header"),
])
def test_bad_breaker_configs_are_errors(tmp_path, extra, message):
    out = validate_service(tmp_path, "up", extra)
    assert "Service/up: spec.circuitBreaker" in out and message in out, out
