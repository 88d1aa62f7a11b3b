"""The response cache, end to end against a real backend: hits, Cache-Control on both
sides, key parts, and a burst of concurrent misses coalesced into one upstream request."""

import threading
import time
import urllib.request

import pytest

from harness import Gateway, api, assert_metrics_valid, curl, filters, service, validate_bad


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = (service("up", backend)
           + api("plain", "/c/{*rest}", "{service: up}", extra=filters("{name: cache, config: {ttl: 30s}}"))
           + api("keyed", "/k/{*rest}", "{service: up}",
                 extra=filters('{name: cache, config: {key: [method, path, "query:id", "header:x-tenant"]}}'))
           + api("small", "/s/{*rest}", "{service: up}", extra=filters("{name: cache, config: {maxBodyBytes: 100}}"))
           + api("status", "/st/{code}", '{service: up, path: "/status/{code}"}', extra=filters("{name: cache}"))
           + api("nocache", "/n/{*rest}", "{service: up}"))
    g = Gateway(tmp_path, res)
    gateways.append(g)
    return g


def hits(backend, path):
    return sum(1 for r in backend.requests if r["path"] == path)


def test_a_second_get_is_a_hit_with_the_same_answer(gw, backend):
    s1, h1, b1, _ = curl(gw.url + "/c/a?x=1")
    s2, h2, b2, _ = curl(gw.url + "/c/a?x=1")
    assert (s1, h1["x-cache"]) == (200, "MISS")
    assert (s2, h2["x-cache"]) == (200, "HIT") and b2 == b1
    assert h2["content-type"] == "application/json" and "age" in h2
    assert h2["x-request-id"] != h1["x-request-id"], "a hit gets its own request id"
    assert hits(backend, "/c/a") == 1
    # Another query string is another key; POST passes by.
    assert curl(gw.url + "/c/a?x=2")[1]["x-cache"] == "MISS"
    status, headers, _, _ = curl("-X", "POST", gw.url + "/c/a?x=1")
    assert status == 200 and headers["x-cache"] == "BYPASS"
    assert hits(backend, "/c/a") == 3
    # Apis without the filter say nothing.
    assert "x-cache" not in curl(gw.url + "/n/a")[1]
    _, text = gw.admin("GET", "/metrics")
    assert 'meshgate_cache_lookups_total{cache="Api/plain spec.filters.0",result="hit"} 1' in text
    assert 'meshgate_cache_lookups_total{cache="Api/plain spec.filters.0",result="miss"} 2' in text
    assert_metrics_valid(text)


@pytest.mark.parametrize("query", [
    "h-cache-control=no-store",
    "h-cache-control=private",
    "h-cache-control=no-cache",
    "h-set-cookie=sid%3D1",
    "h-vary=*",
])
def test_responses_that_must_not_be_stored_are_not(gw, backend, query):
    for _ in range(2):
        status, headers, _, _ = curl(gw.url + f"/c/never?{query}")
        assert status == 200 and headers["x-cache"] == "MISS"
    assert hits(backend, "/c/never") == 2


def test_request_no_store_bypasses_and_no_cache_refreshes(gw, backend):
    curl(gw.url + "/c/r")
    assert curl("-H", "cache-control: no-store", gw.url + "/c/r")[1]["x-cache"] == "BYPASS"
    assert curl("-H", "cache-control: no-cache", gw.url + "/c/r")[1]["x-cache"] == "MISS"
    assert curl(gw.url + "/c/r")[1]["x-cache"] == "HIT"
    assert hits(backend, "/c/r") == 3


def test_max_age_from_the_response_overrides_the_ttl(gw, backend):
    assert curl(gw.url + "/c/m?h-cache-control=max-age%3D1")[1]["x-cache"] == "MISS"
    assert curl(gw.url + "/c/m?h-cache-control=max-age%3D1")[1]["x-cache"] == "HIT"
    time.sleep(1.3)
    assert curl(gw.url + "/c/m?h-cache-control=max-age%3D1")[1]["x-cache"] == "MISS"


def test_errors_and_authenticated_requests_are_not_stored(gw, backend):
    for _ in range(2):
        status, headers, _, _ = curl(gw.url + "/st/503")
        assert status == 503 and headers["x-cache"] == "MISS"
        assert curl("-H", "authorization: Bearer x", gw.url + "/c/private")[1]["x-cache"] == "MISS"
    assert hits(backend, "/status/503") == 2
    # ...unless the response says it is public.
    curl("-H", "authorization: Bearer x", gw.url + "/c/pub?h-cache-control=public")
    assert curl("-H", "authorization: Bearer y", gw.url + "/c/pub?h-cache-control=public")[1]["x-cache"] == "HIT"


def test_key_parts_and_vary(gw, backend):
    assert curl(gw.url + "/k/a?id=1&junk=1")[1]["x-cache"] == "MISS"
    assert curl(gw.url + "/k/a?junk=2&id=1")[1]["x-cache"] == "HIT", "only query:id is in the key"
    assert curl(gw.url + "/k/a?id=2")[1]["x-cache"] == "MISS"
    assert curl("-H", "x-tenant: t1", gw.url + "/k/a?id=1")[1]["x-cache"] == "MISS"
    assert curl("-H", "x-tenant: t1", gw.url + "/k/a?id=1")[1]["x-cache"] == "HIT"
    # Vary: the entry is kept with the request's accept-language and matches only it.
    url = gw.url + "/c/v?h-vary=accept-language"
    assert curl("-H", "accept-language: fr", url)[1]["x-cache"] == "MISS"
    assert curl("-H", "accept-language: fr", url)[1]["x-cache"] == "HIT"
    assert curl("-H", "accept-language: de", url)[1]["x-cache"] == "MISS"


def test_bodies_over_max_body_bytes_are_not_stored(gw, backend):
    long = "y" * 200
    for _ in range(2):
        assert curl(gw.url + f"/s/big?pad={long}")[1]["x-cache"] == "MISS"
    assert curl(gw.url + "/s/tiny")[1]["x-cache"] == "MISS"  # the echo is ~300 bytes too
    assert hits(backend, "/s/big") == 2


def burst(url, n):
    """`n` requests for `url` at once, each on its own connection: (status, x-cache, body)."""
    results = []
    start = threading.Barrier(n)

    def one():
        start.wait()
        with urllib.request.urlopen(url, timeout=30) as r:
            results.append((r.status, r.headers["x-cache"], r.read()))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n
    return results


def test_a_burst_of_100_concurrent_misses_sends_one_upstream_request(gw, backend):
    results = burst(gw.url + "/c/slow?ms=500", 100)
    assert {(s, b) for s, _, b in results} == {results[0][::2]} and results[0][0] == 200
    caches = [c for _, c, _ in results]
    assert caches.count("MISS") == 1 and caches.count("HIT") == 99, caches
    assert hits(backend, "/c/slow") == 1


def test_waiters_go_upstream_when_the_fill_cannot_be_stored(gw, backend):
    results = burst(gw.url + "/c/slow?ms=300&h-cache-control=no-store", 10)
    assert [(s, c) for s, c, _ in results] == [(200, "MISS")] * 10
    assert hits(backend, "/c/slow") == 10


def test_bad_cache_config_is_reported(tmp_path, backend):
    out = validate_bad(tmp_path, service("up", backend) + api(
        "a", "/a", "{service: up}", extra=filters('{name: cache, config: {key: [method, "cookie:sid"]}}')))
    assert 'Api/a: spec.filters.0.config.key.1: "cookie:sid" is not a key part' in out, out
