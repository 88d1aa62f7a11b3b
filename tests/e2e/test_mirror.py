"""mirror, end to end: a real gateway copies a share of requests to a second real
backend; copies carry the request (host marked -shadow), their answers are ignored,
and a slow or failing mirror never slows or fails the main request."""

import json
import threading
import time

import pytest

from harness import Addr, Backend, Gateway, api, curl, filters, service, validate_bad, wait_for


@pytest.fixture
def shadow():
    b = Backend("shadow")
    yield b
    b.stop()


def start(tmp_path, gateways, backend, shadow, mirror):
    g = Gateway(tmp_path, service("up", backend) + service("shadow", shadow)
                + api("orders", "/orders/{*rest}", "{service: up}", extra=filters(mirror))
                + api("plain", "/plain", "{service: up}"))
    gateways.append(g)
    return g


def metric(gw, result):
    _, text = gw.admin("GET", "/metrics")
    needle = f'meshgate_mirror_requests_total{{mirror="Api/orders spec.filters.0",result="{result}"}} '
    line = next((l for l in text.splitlines() if l.startswith(needle)), None)
    return float(line.split()[-1]) if line else 0.0


def test_every_request_is_copied_to_the_mirror_with_its_body(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow, "{name: mirror, config: {service: shadow}}")
    status, headers, body, _ = curl(g.url + "/orders/7?x=1", "-X", "POST", "-d", "item=book",
                                    "-H", "x-request-id: mirror-test-1")
    assert status == 200 and headers["x-backend"] == "b1"
    wait_for(lambda: shadow.count() == 1, "the copy did not arrive")
    main, copy = backend.requests[0], shadow.requests[0]
    assert (copy["method"], copy["path"], copy["query"], copy["body"]) == ("POST", "/orders/7", "x=1", "item=book")
    assert copy["headers"]["host"] == main["headers"]["host"].replace("127.0.0.1", "127.0.0.1-shadow")
    assert copy["headers"]["x-request-id"] == "mirror-test-1"
    assert copy["headers"]["x-forwarded-for"] == main["headers"]["x-forwarded-for"]
    # Only the Api with the filter is mirrored.
    curl(g.url + "/plain")
    time.sleep(0.2)
    assert shadow.count() == 1
    wait_for(lambda: metric(g, "answered") == 1, "the answered copy was not counted")


def test_a_share_of_requests_is_copied(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow, "{name: mirror, config: {service: shadow, percent: 30}}")
    for _ in range(200):
        assert curl(g.url + "/orders/1")[0] == 200
    time.sleep(0.3)
    # Binomial(200, 0.3): mean 60, sd 6.5; this window is over 4 sd wide each side.
    assert 32 <= shadow.count() <= 88, shadow.count()
    assert backend.count() == 200


def test_a_hanging_mirror_neither_slows_nor_fails_the_main_request(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow,
              "{name: mirror, config: {service: shadow, timeout: 1s, maxInFlight: 3}}")
    shadow.mode = "hang"
    try:
        started = time.time()
        for _ in range(10):
            status, _, _, _ = curl(g.url + "/orders/1")
            assert status == 200
        assert time.time() - started < 2.5, "the main requests waited for the mirror"
        # Three copies hang; the other seven found no slot and were dropped.
        assert metric(g, "dropped") == 7
        # Their timeout (1 s) ends them as failed and frees the slots.
        wait_for(lambda: metric(g, "failed") == 3, "hung copies were not timed out", timeout=5)
    finally:
        shadow.mode = "ok"
    curl(g.url + "/orders/2")
    wait_for(lambda: metric(g, "answered") == 1, "a freed slot was not used again")


def test_a_failing_mirror_is_counted_and_the_main_answer_is_kept(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow, "{name: mirror, config: {service: shadow}}")
    shadow.mode = "fail"
    status, _, body, _ = curl(g.url + "/orders/1")
    assert status == 200 and json.loads(body)["backend"] == "b1"
    wait_for(lambda: metric(g, "failed") == 1, "the failed copy was not counted")
    shadow.refuse()
    assert curl(g.url + "/orders/1")[0] == 200
    wait_for(lambda: metric(g, "failed") == 2, "the refused copy was not counted")


def test_bodies_that_cannot_be_copied_are_skipped_not_truncated(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow,
              "{name: mirror, config: {service: shadow, maxBodyBytes: 8}}")
    # Larger than maxBodyBytes, and a chunked body of unknown length.
    assert curl(g.url + "/orders/1", "-X", "POST", "-d", "0123456789")[0] == 200
    assert curl(g.url + "/orders/1", "-X", "POST", "-H", "transfer-encoding: chunked", "-d", "abc")[0] == 200
    assert [r["body"] for r in backend.requests] == ["0123456789", "abc"]
    assert metric(g, "skipped") == 2
    # Within the limit, the copy carries the whole body.
    assert curl(g.url + "/orders/1", "-X", "POST", "-d", "small")[0] == 200
    wait_for(lambda: shadow.count() == 1, "the small body was not copied")
    assert shadow.requests[0]["body"] == "small"


def test_concurrent_requests_keep_their_own_answers(tmp_path, gateways, backend, shadow):
    g = start(tmp_path, gateways, backend, shadow, "{name: mirror, config: {service: shadow}}")
    bad = []

    def client(i):
        for j in range(10):
            status, _, body, _ = curl(g.url + f"/orders/{i}-{j}")
            if status != 200 or json.loads(body)["path"] != f"/orders/{i}-{j}":
                bad.append((i, j, status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
    wait_for(lambda: shadow.count() == 50, f"copies missing: {shadow.count()}")
    assert sorted(r["path"] for r in shadow.requests) == sorted(r["path"] for r in backend.requests)


def test_a_mirror_to_an_unknown_service_is_a_config_error(tmp_path):
    out = validate_bad(tmp_path, service("up", Addr("127.0.0.1:9"))
                       + api("orders", "/orders", "{service: up}",
                             extra=filters("{name: mirror, config: {service: nowhere}}")))
    assert 'Api/orders: spec.filters.0.config.service: unknown Service "nowhere"' in out, out
