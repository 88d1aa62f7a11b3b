"""rate-limit, end to end: curl and concurrent clients through real gateways to a real
backend; the cluster scope shares one real redis-server between two gateways."""

import base64
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import jwt as pyjwt
import pytest

from harness import BIN, Gateway, Redis, api, assert_metrics_valid, curl, filters, gateway_yaml, service

HS_SECRET = b"rate-limit-test-secret-0123456789abcdef"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


CONSUMERS = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: alice}
spec:
  credentials: [{type: key, key: alice-key-0001}]
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: bob}
spec:
  credentials: [{type: key, key: bob-key-0002}]
"""

JWT = ("{name: jwt, config: {providers: [{issuer: https://idp.test, algorithms: [HS256], "
       f"jwks: {{inline: {{keys: [{{kty: oct, k: '{b64(HS_SECRET)}'}}]}}}}}}]}}}}")


def local_apis():
    return (
        api("ip", "/ip", "{service: up}",
            extra=filters('{name: rate-limit, config: {key: ip, rate: "5/m"}}'))
        + api("per-consumer", "/consumer", "{service: up}",
              extra=filters("{name: key-auth}", '{name: rate-limit, config: {key: consumer, rate: "2/m"}}'))
        + api("per-header", "/header", "{service: up}",
              extra=filters('{name: rate-limit, config: {key: "header:x-user", rate: "2/m"}}'))
        + api("per-claim", "/claim", "{service: up}",
              extra=filters(JWT, '{name: rate-limit, config: {key: ["claim:tenant", api], rate: "2/m"}}'))
        + api("two-limits", "/two", "{service: up}",
              extra=filters("{name: rate-limit, config: {limits: ["
                            "{name: second, rate: 2/s}, {name: minute, rate: 3/m}]}}"))
        + api("quiet", "/quiet", "{service: up}",
              extra=filters('{name: rate-limit, config: {rate: "1/m", headers: false}}'))
    )


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + CONSUMERS + local_apis())
    gateways.append(g)
    return g


def code_of(body):
    return json.loads(body)["error"]["code"]


def test_local_limit_admits_the_burst_then_429_with_headers(gw, backend):
    remaining = []
    for _ in range(5):
        status, headers, _, _ = curl(gw.url + "/ip")
        assert status == 200
        assert headers["ratelimit-policy"] == '"5/m";q=5;w=60'
        remaining.append(headers["ratelimit"])
    assert [r.split(";")[1] for r in remaining] == ["r=4", "r=3", "r=2", "r=1", "r=0"]
    # t= is the time until the bucket is full again: 12 s per request spent.
    assert remaining[-1].endswith("t=60")
    status, headers, body, _ = curl(gw.url + "/ip")
    assert status == 429 and code_of(body) == "rate_limited"
    assert headers["x-request-id"] and 1 <= int(headers["retry-after"]) <= 12
    assert headers["ratelimit"].startswith('"5/m";r=0;')
    assert len([r for r in backend.requests if r["path"] == "/ip"]) == 5


def test_keys_separate_consumers_headers_and_claims(gw):
    for who in ("alice-key-0001", "bob-key-0002"):
        codes = [curl("-H", f"x-api-key: {who}", gw.url + "/consumer")[0] for _ in range(3)]
        assert codes == [200, 200, 429], who
    for user in ("u1", "u2"):
        codes = [curl("-H", f"x-user: {user}", gw.url + "/header")[0] for _ in range(3)]
        assert codes == [200, 200, 429], user
    # Without the header the bucket is the client address's: leaving it out is no way around.
    codes = [curl(gw.url + "/header")[0] for _ in range(3)]
    assert codes == [200, 200, 429]

    def token(tenant):
        return pyjwt.encode({"iss": "https://idp.test", "sub": "s", "tenant": tenant,
                             "exp": int(time.time()) + 300}, HS_SECRET, algorithm="HS256")
    for tenant in ("t1", "t2"):
        # A fresh token per request: the limit is on the claim, not the token.
        codes = [curl("-H", f"authorization: Bearer {token(tenant)}", gw.url + "/claim")[0] for _ in range(3)]
        assert codes == [200, 200, 429], tenant


def test_several_limits_must_all_admit(gw):
    first = [curl(gw.url + "/two") for _ in range(3)]
    assert [s for s, *_ in first] == [200, 200, 429]
    assert first[0][1]["ratelimit-policy"] == '"second";q=2;w=1, "minute";q=3;w=60'
    assert first[1][1]["ratelimit"].startswith('"second";r=0;t=1, "minute";r=1;')
    time.sleep(1.1)
    # The per-second limit refilled; the refusal above took nothing from the minute.
    assert curl(gw.url + "/two")[0] == 200
    time.sleep(1.1)
    status, headers, _, _ = curl(gw.url + "/two")
    assert status == 429 and int(headers["retry-after"]) > 5


def test_headers_can_be_turned_off(gw):
    status, headers, _, _ = curl(gw.url + "/quiet")
    assert status == 200 and "ratelimit" not in headers and "ratelimit-policy" not in headers
    status, headers, _, _ = curl(gw.url + "/quiet")
    assert status == 429 and "retry-after" in headers and "ratelimit" not in headers


def test_reload_keeps_counters_and_metrics_count_decisions(gw):
    assert [curl(gw.url + "/quiet")[0] for _ in range(2)] == [200, 429]
    # A reload with an unrelated change keeps the bucket: no free burst.
    gw.write(service("other", type("B", (), {"addr": "127.0.0.1:9"})()), name="20-other.yaml")
    assert gw.admin("POST", "/reload")[0] == 200
    assert curl(gw.url + "/quiet")[0] == 429
    status, text = gw.admin("GET", "/metrics")
    assert status == 200
    line = 'meshgate_rate_limit_decisions_total{limiter="Api/quiet spec.filters.0",result="limited"} 2'
    assert line in text, text
    assert 'limiter="Api/quiet spec.filters.0",result="allowed"} 1' in text
    assert_metrics_valid(text)
    # Changing the filter's own config starts it afresh.
    res = (service("up", type("B", (), {"addr": "127.0.0.1:9"})()) + CONSUMERS
           + local_apis().replace('rate: "1/m", headers: false', 'rate: "2/m", headers: false'))
    gw.write(res)
    assert gw.admin("POST", "/reload")[0] == 200
    assert curl(gw.url + "/quiet")[0] == 502  # admitted, and the new upstream refuses


BAD = [
    ('{name: rate-limit, config: {rate: "fast"}}', "config.rate: \"fast\" is not a rate"),
    ('{name: rate-limit, config: {rate: "10/s", key: "cookie:x"}}', "config.key: unknown key"),
    ('{name: rate-limit, config: {scope: cluster, rate: "10/s"}}', "config.redis: scope: cluster needs redis"),
    ('{name: rate-limit, config: {rate: "10/s", redis: {url: "redis://127.0.0.1"}}}',
     "config.redis: redis is only used with scope: cluster"),
    ('{name: rate-limit, config: {scope: cluster, rate: "1/s", redis: {url: "redis://:pw@127.0.0.1"}}}',
     "put the password in redis.password"),
    ('{name: rate-limit, config: {rate: "1/s", limits: [{rate: 2/s}]}}', "give either rate"),
]


@pytest.mark.parametrize("entry,message", BAD)
def test_bad_configs_are_file_line_errors(tmp_path, entry, message):
    f = tmp_path / "bad.yaml"
    text = gateway_yaml(8080, 9901) + service("up", type("B", (), {"addr": "127.0.0.1:9"})())
    text += api("x", "/x", "{service: up}", extra=filters(entry))
    f.write_text(text)
    line = text.splitlines().index("    - " + entry) + 1
    p = subprocess.run([BIN, "validate", "-c", str(f)], capture_output=True, text=True)
    assert p.returncode == 1
    assert f"{f}:{line}: Api/x: spec.filters.0." in p.stdout, p.stdout + p.stderr
    assert message in p.stdout + p.stderr


# ------------------------------------------------------------------ cluster scope

def cluster_apis(redis_url):
    def rl(extra):
        return filters("{name: rate-limit, config: {scope: cluster, key: api, "
                       f'redis: {{url: "{redis_url}", timeout: 300ms}}, {extra}}}}}')
    return (api("shared", "/shared", "{service: up}", extra=rl('rate: "200/h"'))
            + api("fail-open", "/open", "{service: up}", extra=rl('rate: "1000/s", failMode: open'))
            + api("fail-closed", "/closed", "{service: up}", extra=rl('rate: "1000/s", failMode: closed')))


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


@pytest.fixture
def pair(tmp_path, backend, gateways, redis):
    out = []
    for i in range(2):
        g = Gateway(tmp_path / f"gw{i}", service("up", backend) + cluster_apis(redis.url))
        gateways.append(g)
        out.append(g)
    return out


def hammer(urls, per_url, threads_per_url=6):
    """Send `per_url` requests to each URL from several threads at once; count statuses."""
    counts = {}
    lock = threading.Lock()

    def worker(url, n):
        for _ in range(n):
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            with lock:
                counts[code] = counts.get(code, 0) + 1

    ts = [threading.Thread(target=worker, args=(u, per_url // threads_per_url))
          for u in urls for _ in range(threads_per_url)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def test_cluster_limit_is_shared_by_two_gateways(pair, redis, backend):
    # 200 per hour with a burst of 200: under concurrent load on both gateways, the
    # cluster as a whole admits 200 (the refill during the test is well under 1).
    counts = hammer([g.url + "/shared" for g in pair], per_url=300)
    assert sum(counts.values()) == 600
    assert 190 <= counts.get(200, 0) <= 210, counts
    assert counts.get(200, 0) + counts.get(429, 0) == 600, counts
    # Each gateway admitted some: the counter really is shared, not per process.
    status, headers, _, _ = curl(pair[0].url + "/shared")
    assert status == 429 and headers["ratelimit-policy"] == '"200/h";q=200;w=3600'
    assert redis.cli("--scan", "--pattern", "meshgate:rl:*").strip()


def test_redis_outage_follows_fail_mode_and_recovers(pair, redis):
    g = pair[0]
    assert curl(g.url + "/open")[0] == 200
    assert curl(g.url + "/closed")[0] == 200
    redis.stop()
    status, headers, _, _ = curl(g.url + "/open")
    assert status == 200 and "ratelimit" not in headers
    status, headers, body, _ = curl(g.url + "/closed")
    assert status == 503 and code_of(body) == "rate_limit_unavailable" and headers["x-request-id"]
    _, text = g.admin("GET", "/metrics")
    assert 'limiter="Api/fail-open spec.filters.0",result="failed_open"} 1' in text
    assert 'limiter="Api/fail-closed spec.filters.0",result="failed_closed"} 1' in text
    redis.start()
    deadline = time.time() + 10
    while time.time() < deadline:
        status, headers, _, _ = curl(g.url + "/closed")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200 and headers["ratelimit"].startswith('"1000/s";r=')
