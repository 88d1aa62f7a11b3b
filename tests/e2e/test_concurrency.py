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
