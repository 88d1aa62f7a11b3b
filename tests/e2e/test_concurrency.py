"""concurrency-limit (the bulkhead), end to end: concurrent curl clients through a real
gateway to a real backend that is slow or streams on command."""

import json
import threading
import time

import pytest

from harness import Gateway, api, assert_metrics_valid, curl, filters, service


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = (service("up", backend)
           + api("bulkhead", "/slow", "{service: up}",
                 extra=filters("{name: concurrency-limit, config: {max: 2}}"))
           + api("queued", "/slowq", "{service: up}",
                 extra=filters("{name: concurrency-limit, config: {max: 1, queue: {size: 1, timeout: 3s}}}"))
           + api("streamed", "/stream", "{service: up}",
                 extra=filters("{name: concurrency-limit, config: {max: 1}}"))
           + api("other", "/other", "{service: up}"))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def parallel(urls):
    """Start one curl per URL at once; return [(status, body, seconds)] in order."""
    out = [None] * len(urls)

    def one(i, url):
        t0 = time.monotonic()
        status, _, body, _ = curl(url)
        out[i] = (status, body, time.monotonic() - t0)
    ts = [threading.Thread(target=one, args=(i, u)) for i, u in enumerate(urls)]
    for t in ts:
        t.start()
        time.sleep(0.05)  # in this order
    for t in ts:
        t.join()
    return out


def test_full_bulkhead_answers_503_at_once_and_spares_other_apis(gw):
    results = {}

    def load():
        results["load"] = parallel([gw.url + "/slow?ms=1500"] * 4)
    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.6)
    # While /slow is full, another Api is unaffected.
    assert curl(gw.url + "/other")[0] == 200
    _, text = gw.admin("GET", "/metrics")
    assert 'meshgate_concurrency_limit_in_flight{limiter="Api/bulkhead spec.filters.0"} 2' in text, text
    t.join()
    statuses = sorted(s for s, _, _ in results["load"])
    assert statuses == [200, 200, 503, 503]
    for status, body, secs in results["load"]:
        if status == 503:
            assert json.loads(body)["error"]["code"] == "concurrency_limited"
            assert secs < 1.0, "a full bulkhead refuses at once"
    _, text = gw.admin("GET", "/metrics")
    assert 'concurrency_limit_decisions_total{limiter="Api/bulkhead spec.filters.0",result="rejected"} 2' in text
    assert 'meshgate_concurrency_limit_in_flight{limiter="Api/bulkhead spec.filters.0"} 0' in text
    assert_metrics_valid(text)


def test_queue_waits_for_a_slot(gw):
    out = parallel([gw.url + "/slowq?ms=700"] * 3)
    assert [s for s, _, _ in out] == [200, 200, 503]
    # The second waited in the queue for the first to finish.
    assert out[1][2] >= 1.2, out
    _, text = gw.admin("GET", "/metrics")
    assert 'limiter="Api/queued spec.filters.0",result="queued"} 1' in text


def test_slot_is_held_until_the_response_body_is_sent(gw):
    done = {}

    def stream():
        done["stream"] = curl(gw.url + "/stream?n=4&ms=300")
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)  # the head has been sent, the body is still streaming
    assert curl(gw.url + "/stream?n=1&ms=1")[0] == 503
    t.join()
    assert done["stream"][0] == 200 and done["stream"][2].count(b"chunk") == 4
    assert curl(gw.url + "/stream?n=1&ms=1")[0] == 200


# ------------------------------------------------------------------ slow-API isolation

def bulkhead(isolation):
    iso = ", isolation: {slowdown: 5, minLatency: 50ms, maxShare: 20}" if isolation else ""
    return f"""---
apiVersion: meshgate.io/v1
kind: Policy
metadata: {{name: bulkhead}}
spec:
  filters:
    - {{name: concurrency-limit, config: {{max: 20{iso}}}}}
"""


def p99_of_fast(gw, n=300):
    """Sequential GETs of the fast Api over one keep-alive connection: (p99 in
    seconds, statuses that were not 200)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    times, bad = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/fast")
        r = conn.getresponse()
        r.read()
        times.append(time.perf_counter() - t0)
        if r.status != 200:
            bad.append(r.status)
    conn.close()
    times.sort()
    return times[int(n * 0.99) - 1], bad


@pytest.mark.parametrize("isolation", [True, False], ids=["isolated", "shared-without-isolation"])
def test_a_slow_api_cannot_starve_a_fast_one_on_a_shared_limit(tmp_path, backend, gateways, isolation):
    g = Gateway(tmp_path, service("up", backend) + bulkhead(isolation)
                + api("reports", "/slow", "{service: up}", extra=filters("{policy: bulkhead}"))
                + api("fast", "/fast", "{service: up}", extra=filters("{policy: bulkhead}")))
    gateways.append(g)
    base_p99, bad = p99_of_fast(g)
    assert not bad
    for _ in range(30):  # the slow Api's normal latency: a few ms
        assert curl(g.url + "/slow?ms=5")[0] == 200
    stop = threading.Event()
    # An exception ends a thread silently, and its load with it: kept, and checked.
    errors, slow_statuses = [], []

    def slow_client():
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        try:
            while not stop.is_set():
                conn.request("GET", "/slow?ms=500")
                r = conn.getresponse()
                r.read()
                slow_statuses.append(r.status)
                if r.status != 200:
                    time.sleep(0.2)
        except Exception as e:
            errors.append(repr(e))
        finally:
            conn.close()

    clients = [threading.Thread(target=slow_client) for _ in range(30)]
    for c in clients:
        c.start()
    try:
        time.sleep(2.0)  # the slow Api's first answers arrive after 0.5 s
        loaded_p99, bad = p99_of_fast(g)
        _, text = g.admin("GET", "/metrics")
    finally:
        stop.set()
        for c in clients:
            c.join()
    assert not errors, errors
    if isolation:
        assert not bad, f"the fast Api was refused {len(bad)} times"
        # Within 2x of its unloaded p99 (with a 5 ms floor for timer noise).
        assert loaded_p99 <= 2 * max(base_p99, 0.005), (base_p99, loaded_p99)
        assert_metrics_valid(text)
        assert ('meshgate_concurrency_limit_isolated{limiter="Policy/bulkhead spec.filters.0",api="reports"} 1'
                in text), text
        isolated = [l for l in text.splitlines() if 'result="isolated"' in l]
        assert isolated and float(isolated[0].split()[-1]) > 0, isolated
    else:
        # The same load without isolation: the slow Api holds every slot.
        slow = {s: slow_statuses.count(s) for s in set(slow_statuses)}
        assert len(bad) > 30 and set(bad) == {503}, (len(bad), set(bad), slow)
