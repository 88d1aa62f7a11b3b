"""The fault filter, end to end: aborts and delays by percentage, only for matching
headers, never reaching the backend when aborted; gRPC callers get a grpc-status."""

import json
import time

import pytest

from harness import Gateway, api, assert_metrics_valid, curl, filters, service, validate_bad


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = (service("up", backend)
           + api("abort", "/abort", "{service: up}", extra=filters(
               '{name: fault, config: {abort: {percent: 100, status: 418}, match: {headers: {x-chaos: "^on$"}}}}'))
           + api("delay", "/delay", "{service: up}", extra=filters(
               "{name: fault, config: {delay: {percent: 100, duration: 300ms}}}"))
           + api("half", "/half", "{service: up}", extra=filters(
               "{name: fault, config: {abort: {percent: 50}}}")))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def test_abort_only_for_matching_headers_and_never_upstream(gw, backend):
    status, headers, body, _ = curl("-H", "x-chaos: on", gw.url + "/abort")
    assert status == 418 and json.loads(body)["error"]["code"] == "fault_injected", body
    assert headers["x-request-id"]
    assert backend.count() == 0
    assert curl("-H", "x-chaos: off", gw.url + "/abort")[0] == 200
    assert curl(gw.url + "/abort")[0] == 200
    assert backend.count() == 2
    # A gRPC caller gets the mapped grpc-status (418 has none: UNKNOWN).
    status, headers, _, _ = curl("-H", "x-chaos: on", "-H", "content-type: application/grpc", gw.url + "/abort")
    assert status == 200 and headers["grpc-status"] == "2"


def test_delay_then_pass(gw, backend):
    t = time.time()
    status, _, _, _ = curl(gw.url + "/delay")
    assert status == 200 and time.time() - t >= 0.3
    assert backend.count() == 1


def test_abort_percentage_and_metrics(gw, backend):
    statuses = [curl(gw.url + "/half")[0] for _ in range(200)]
    aborted = statuses.count(503)
    assert 60 <= aborted <= 140 and aborted + statuses.count(200) == 200, aborted
    assert backend.count() == 200 - aborted
    _, text = gw.admin("GET", "/metrics")
    assert f'meshgate_fault_injections_total{{fault="Api/half spec.filters.0",result="aborted"}} {aborted}' in text
    assert_metrics_valid(text)


@pytest.mark.parametrize("config, message", [
    ("{abort: {percent: 150}}", "spec.filters.0.config.abort.percent: a percentage from 0 to 100"),
    ("{}", "spec.filters.0.config: give a delay, an abort, or both"),
    ("{delay: {percent: 1, duration: soon}}", "spec.filters.0.config.delay.duration"),
])
def test_bad_fault_config(tmp_path, backend, config, message):
    out = validate_bad(tmp_path, service("up", backend) + api(
        "a", "/a", "{service: up}", extra=filters(f"{{name: fault, config: {config}}}")))
    assert message in out, out
