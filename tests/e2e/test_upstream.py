"""Upstream behaviour: failures, timeouts, retries, balancing, subsets and splits."""

import collections
import json
import time

import pytest

from harness import Addr, Backend, Gateway, api, curl, free_port, service, validate_bad, validate_service


def test_refused_is_502_fast(tmp_path, gateways):
    dead = f"127.0.0.1:{free_port()}"
    res = f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: dead}}
spec:
  endpoints: [{{address: "{dead}"}}]
""" + api("x", "/x", "{service: dead}")
    g = Gateway(tmp_path, res)
    gateways.append(g)
    t = time.time()
    status, headers, body, _ = curl(g.url + "/x")
    assert time.time() - t < 1.0
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unavailable"
    assert headers["x-request-id"]
    _, metrics = g.admin("GET", "/metrics")
    assert 'meshgate_upstream_connect_errors_total{service="dead"} 1' in metrics


def test_slow_is_504_at_timeout(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("slow", "/slow", "{service: up, timeout: 300ms}"))
    gateways.append(g)
    t = time.time()
    status, _, body, _ = curl(g.url + "/slow?ms=2000")
    took = time.time() - t
    assert status == 504
    assert json.loads(body)["error"]["code"] == "upstream_timeout"
    assert 0.25 < took < 1.0


def test_reset_mid_response_is_never_a_complete_body(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("reset", "/reset", "{service: up}"))
    gateways.append(g)
    for proto in ([], ["--http2-prior-knowledge"]):
        status, headers, body, rc = curl(*proto, g.url + "/reset")
        assert status == 200
        assert rc != 0, "curl must see a failed transfer, not a complete body"
        assert len(body) < 100000
    # the access log says the response did not complete
    time.sleep(0.3)
    entries = [e for e in g.access_log() if e["path"] == "/reset"]
    assert entries and all(e["complete"] is False for e in entries)


def test_retry_on_503_for_get_but_not_post(tmp_path, backend, gateways):
    g = Gateway(
        tmp_path,
        service("up", backend) + api("flaky", "/flaky", '{service: up, retry: {attempts: 2, on: ["503"]}}'),
    )
    gateways.append(g)
    status, _, _, _ = curl(g.url + "/flaky", "-H", "x-key: a")
    assert status == 200
    assert backend.count() == 2
    status, _, _, _ = curl(g.url + "/flaky", "-X", "POST", "-H", "x-key: b", "--data", "x")
    assert status == 503, "POST is not idempotent: never replayed"
    assert backend.count() == 3


def test_retry_replays_small_bodies_when_allowed(tmp_path, backend, gateways):
    g = Gateway(
        tmp_path,
        service("up", backend)
        + api("flaky", "/flaky", '{service: up, retry: {attempts: 1, on: ["503"], nonIdempotent: true}}'),
    )
    gateways.append(g)
    status, _, body, _ = curl(g.url + "/flaky", "-X", "POST", "-H", "x-key: c", "--data", "payload")
    assert status == 200
    assert json.loads(body)["body"] == "payload"
    assert [r["body"] for r in backend.requests] == ["payload", "payload"]


def test_retry_moves_off_a_dead_endpoint(tmp_path, backend, gateways):
    dead = f"127.0.0.1:{free_port()}"
    res = f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: up}}
spec:
  endpoints: [{{address: "{dead}"}}, {{address: "{backend.addr}"}}]
""" + api("x", "/x", "{service: up, retry: {attempts: 1, on: [connect-failure]}}")
    g = Gateway(tmp_path, res)
    gateways.append(g)
    for _ in range(10):
        assert curl(g.url + "/x")[0] == 200


def backends(n):
    return [Backend(f"b{i}") for i in range(n)]


def lb_service(name, bs, policy, weights=None, labels=None, hash_on=None):
    eps = []
    for i, b in enumerate(bs):
        w = f", weight: {weights[i]}" if weights else ""
        l = f", labels: {{version: {labels[i]}}}" if labels else ""
        eps.append(f'    - {{address: "{b.addr}"{w}{l}}}')
    h = f", hashOn: \"{hash_on}\"" if hash_on else ""
    return f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: {name}}}
spec:
  loadBalancer: {{policy: {policy}{h}}}
  endpoints:
""" + "\n".join(eps) + "\n"


def hits(g, n, path="/x", *extra):
    c = collections.Counter()
    for _ in range(n):
        status, headers, _, _ = curl(g.url + path, *extra)
        assert status == 200
        c[headers["x-backend"]] += 1
    return c


@pytest.fixture
def three():
    bs = backends(3)
    yield bs
    for b in bs:
        b.stop()


def test_weighted_round_robin(tmp_path, three, gateways):
    g = Gateway(tmp_path, lb_service("up", three, "round-robin", weights=[1, 2, 1]) + api("x", "/x", "{service: up}"))
    gateways.append(g)
    assert hits(g, 40) == {"b0": 10, "b1": 20, "b2": 10}


@pytest.mark.parametrize("policy", ["random", "least-request"])
def test_random_and_least_request_use_every_endpoint(tmp_path, three, gateways, policy):
    g = Gateway(tmp_path, lb_service("up", three, policy) + api("x", "/x", "{service: up}"))
    gateways.append(g)
    c = hits(g, 60)
    assert set(c) == {"b0", "b1", "b2"}


def test_ring_hash_is_sticky_per_key(tmp_path, three, gateways):
    g = Gateway(tmp_path, lb_service("up", three, "ring-hash", hash_on="header:x-user") + api("x", "/x", "{service: up}"))
    gateways.append(g)
    owners = set()
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"]:
        c = hits(g, 5, "/x", "-H", f"x-user: {user}")
        assert len(c) == 1, f"{user} moved between endpoints: {c}"
        owners |= set(c)
    assert len(owners) >= 2


def test_split_by_header_and_weight(tmp_path, three, gateways):
    res = lb_service("up", three, "round-robin", labels=["v1", "v1", "v2"]) + """---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: x}
spec:
  request: {path: /x}
  invoke:
    service: up
    split:
      - {subset: {version: v2}, match: {header: {x-canary: "true"}}}
      - {subset: {version: v2}, weight: 20}
"""
    g = Gateway(tmp_path, res)
    gateways.append(g)
    assert hits(g, 10, "/x", "-H", "x-canary: true") == {"b2": 10}
    c = hits(g, 200)
    # 20% to v2 (b2); the rest to the baseline (v1 only)
    assert 20 <= c["b2"] <= 65, c
    assert c["b0"] + c["b1"] == 200 - c["b2"]


def test_dns_discovery(tmp_path, backend, gateways):
    res = f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: named}}
spec:
  discovery: {{dns: "localhost:{backend.port}", refresh: 1s}}
""" + api("x", "/x", "{service: named, retry: {attempts: 1, on: [connect-failure]}}")
    g = Gateway(tmp_path, res)
    gateways.append(g)
    deadline = time.time() + 5
    while time.time() < deadline and curl(g.url + "/x")[0] != 200:
        time.sleep(0.1)
    assert curl(g.url + "/x")[0] == 200
    _, ups = g.admin("GET", "/upstreams")
    named = [s for s in json.loads(ups)["services"] if s["service"] == "named"][0]
    assert any(e["address"].endswith(f":{backend.port}") for e in named["endpoints"])


@pytest.mark.parametrize("proto", [[], ["--http2-prior-knowledge"]])
def test_response_bodies_stream(tmp_path, backend, gateways, proto):
    """The first chunk reaches the client long before the upstream finishes."""
    g = Gateway(tmp_path, service("up", backend) + api("s", "/stream", "{service: up}"))
    gateways.append(g)
    import subprocess
    t0 = time.time()
    p = subprocess.Popen(["curl", "-sN", *proto, g.url + "/stream?n=4&ms=400"], stdout=subprocess.PIPE)
    first = p.stdout.readline()
    t_first = time.time() - t0
    rest = p.stdout.read()
    p.wait()
    total = time.time() - t0
    assert first == b"chunk0\n"
    assert rest == b"chunk1\nchunk2\nchunk3\n"
    assert t_first < 0.5 and total > 1.2, (t_first, total)


def test_per_try_timeout_then_retry(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api(
        "slow", "/slow", '{service: up, timeout: 2s, retry: {attempts: 1, on: [timeout], perTryTimeout: 200ms}}'))
    gateways.append(g)
    t = time.time()
    status, _, body, _ = curl(g.url + "/slow?ms=700")
    took = time.time() - t
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert 0.38 < took < 0.9, took
    time.sleep(0.8)  # let the backend's slow handlers finish recording
    assert backend.count() == 2, "one retry after the first per-try timeout"
    _, metrics = g.admin("GET", "/metrics")
    assert 'meshgate_upstream_timeouts_total{service="up"} 2' in metrics
    assert 'meshgate_upstream_retries_total{service="up"} 1' in metrics


def test_retry_budget_caps_retries_to_a_share_of_traffic(tmp_path, backend, gateways):
    """A Service failing every request: without a budget each request would be tried
    three times. The budget (0% of requests plus 1 a second over 3 s) lets only 3
    retries out; the rest answer the first try's 503 at once."""
    g = Gateway(tmp_path, service("up", backend, extra="\n  retryBudget: {percent: 0, minRetriesPerSecond: 1, window: 3s}")
                + api("fail", "/status/{*rest}", '{service: up, retry: {attempts: 2, on: ["503"], backoff: {base: 1ms}}}'))
    gateways.append(g)
    statuses = [curl(g.url + "/status/503")[0] for _ in range(10)]
    assert statuses == [503] * 10
    assert backend.count() == 13, "10 first tries and the 3 retries the budget allows"
    _, metrics = g.admin("GET", "/metrics")
    assert 'meshgate_upstream_retries_total{service="up"} 3' in metrics
    # The second request's second retry and the first retry of the eight after it.
    assert 'meshgate_retry_budget_exhausted_total{service="up"} 9' in metrics
    _, body = g.admin("GET", "/upstreams")
    budget = next(s for s in json.loads(body)["services"] if s["service"] == "up")["retryBudget"]
    assert budget == {"percent": 0, "minRetriesPerSecond": 1, "windowMs": 3000, "exhausted": 9}


def test_the_default_budget_lets_ordinary_retries_through(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend)
                + api("fail", "/status/{*rest}", '{service: up, retry: {attempts: 2, on: ["503"]}}'))
    gateways.append(g)
    assert [curl(g.url + "/status/503")[0] for _ in range(5)] == [503] * 5
    assert backend.count() == 15, "3 a second over 10 s: 30 retries before the share matters"


def test_bad_retry_settings_are_reported(tmp_path):
    out = validate_service(tmp_path, "up", "\n  retryBudget: {percent: 5000, window: 10ms}")
    assert "spec.retryBudget.percent: at most 1000" in out and "spec.retryBudget.window: must be at least 1s" in out
    out = validate_bad(tmp_path, service("up", Addr("127.0.0.1:9"))
                       + api("a", "/a", "{service: up, retry: {attempts: 1, backoff: {base: 1s, max: 10ms}}}"))
    assert "spec.invoke.retry.backoff.max: must be at least base" in out, out
