"""quota and usage metering, end to end: calendar quotas per Consumer through real
gateways, kept across restarts (the embedded store) or shared by two gateways through
a real redis-server; metered usage read back from GET /usage and /metrics."""

import calendar
import datetime
import json
import signal
import subprocess
import threading
import time

import pytest

from harness import BIN, Addr, Gateway, Redis, api, assert_metrics_valid, curl, filters, service, validate_bad


def consumers(alice_quota="{requests: 3, per: day}", carol_quota="{requests: 2, per: month}"):
    return f"""---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: alice}}
spec:
  credentials: [{{type: key, key: alice-key-0001}}]
  quota: {alice_quota}
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: bob}}
spec:
  credentials: [{{type: key, key: bob-key-0002}}]
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: carol}}
spec:
  credentials: [{{type: key, key: carol-key-0003}}]
  quota: {carol_quota}
"""


KEYS = {"alice": "alice-key-0001", "bob": "bob-key-0002", "carol": "carol-key-0003"}


def apis(quota="{name: quota, config: {per: day, timeZone: UTC}}"):
    return (api("orders", "/orders", "{service: up}", extra=filters("{name: key-auth}", quota))
            + api("payments", "/payments", "{service: up}", extra=filters("{name: key-auth}", quota))
            + api("open", "/open", "{service: up}", extra=filters("{name: key-auth}")))


def call(gw, who, path="/orders"):
    return curl(gw.url + path, "-H", f"x-api-key: {KEYS[who]}")


def usage(gw, query=""):
    status, body = gw.admin("GET", "/usage" + query)
    assert status == 200, body
    return json.loads(body)


def row(report, consumer, api_name):
    return next((r for r in report["usage"] if r["consumer"] == consumer and r["api"] == api_name), None)


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + consumers() + apis())
    gateways.append(g)
    return g


def seconds_to_utc_midnight():
    now = datetime.datetime.now(datetime.timezone.utc)
    tomorrow = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


def test_a_daily_quota_admits_its_requests_then_429_until_midnight(gw, backend):
    seen = []
    for _ in range(3):
        status, headers, _, _ = call(gw, "alice")
        assert status == 200
        assert headers["ratelimit-policy"] == '"quota";q=3;w=86400'
        seen.append(headers["ratelimit"].split(";")[1])
    assert seen == ["r=2", "r=1", "r=0"]
    before = backend.count()
    status, headers, body, _ = call(gw, "alice")
    assert status == 429 and json.loads(body)["error"]["code"] == "quota_exceeded", body
    assert "3 requests per day" in json.loads(body)["error"]["message"]
    # Retry-After points at the next UTC midnight.
    assert abs(int(headers["retry-after"]) - seconds_to_utc_midnight()) <= 5, headers
    assert backend.count() == before, "a refused request reached the upstream"
    # One quota covers every Api with the filter; an Api without it is not counted.
    assert call(gw, "alice", "/payments")[0] == 429
    assert call(gw, "alice", "/open")[0] == 200
    # A Consumer without a quota is not limited and gets no quota headers.
    for _ in range(5):
        status, headers, _, _ = call(gw, "bob")
        assert status == 200 and "ratelimit" not in headers


def test_a_monthly_quota_follows_the_calendar_of_its_time_zone(tmp_path, backend, gateways):
    zone = "Asia/Shanghai"
    g = Gateway(tmp_path, service("up", backend) + consumers()
                + apis(f"{{name: quota, config: {{per: day, timeZone: {zone}}}}}"))
    gateways.append(g)
    status, headers, _, _ = call(g, "carol")
    assert status == 200
    # carol's own period (month) wins over the filter's (day); its length is this
    # month's in Shanghai.
    local = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=8)))
    days = calendar.monthrange(local.year, local.month)[1]
    assert headers["ratelimit-policy"] == f'"quota";q=2;w={days * 86400}', headers
    assert call(g, "carol")[0] == 200
    status, headers, body, _ = call(g, "carol")
    assert status == 429 and "2 requests per month" in body.decode()


def test_quota_counters_and_usage_survive_a_restart(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + consumers() + apis())
    gateways.append(g)
    assert [call(g, "alice")[0] for _ in range(2)] == [200, 200]
    assert call(g, "bob")[0] == 200
    assert g.stop() == 0
    g.start()
    assert call(g, "alice")[0] == 200
    assert call(g, "alice")[0] == 429
    r = row(usage(g), "alice", "orders")
    assert r["requests"] == 4 and r["statusClasses"] == {"2xx": 3, "4xx": 1}, r
    # A crash loses at most the last second: counts older than that are on disk.
    assert call(g, "carol")[0] == 200
    time.sleep(1.5)
    g.proc.send_signal(signal.SIGKILL)
    g.proc.wait()
    g.start()
    assert call(g, "alice")[0] == 429
    assert call(g, "carol")[0] == 200
    assert call(g, "carol")[0] == 429
    assert row(usage(g), "carol", "orders")["statusClasses"] == {"2xx": 2, "4xx": 1}


def test_usage_is_metered_per_consumer_api_and_status_class(gw, backend):
    for _ in range(4):
        call(gw, "alice")  # 3 × 200, 1 × 429
    call(gw, "bob", "/payments")
    backend.mode = "fail"
    call(gw, "bob", "/payments")  # 5xx from the upstream
    backend.mode = "ok"
    call(gw, "bob", "/open")
    curl(gw.url + "/orders")  # no key: 401, no Consumer, not metered
    report = usage(gw)
    assert report["persisted"] is True and report["by"] == "total"
    assert row(report, "alice", "orders")["statusClasses"] == {"2xx": 3, "4xx": 1}
    pay = row(report, "bob", "payments")
    assert pay["requests"] == 2 and pay["statusClasses"] == {"2xx": 1, "5xx": 1}, pay
    assert row(report, "bob", "open")["requests"] == 1
    assert len(report["usage"]) == 3, report
    # Filters and buckets.
    only = usage(gw, "?consumer=bob&api=payments&by=hour")["usage"]
    assert len(only) == 1 and only[0]["hour"].endswith(":00:00Z") and only[0]["requests"] == 2
    today = datetime.datetime.now(datetime.timezone.utc).date()
    tomorrow = today + datetime.timedelta(days=1)
    days = usage(gw, f"?from={today}&to={tomorrow}&by=day")
    assert days["from"] == f"{today}T00:00:00Z" and days["to"] == f"{tomorrow}T00:00:00Z"
    assert {r["day"] for r in days["usage"]} == {str(today)}
    # A range before any traffic is empty.
    assert usage(gw, "?from=2020-01-01&to=2020-02-01")["usage"] == []
    # The same counts in metrics.
    _, text = gw.admin("GET", "/metrics")
    assert_metrics_valid(text)
    assert 'meshgate_consumer_requests_total{consumer="alice",api="orders",status_class="4xx"} 1' in text
    assert 'meshgate_consumer_requests_total{consumer="bob",api="payments",status_class="5xx"} 1' in text
    assert 'meshgate_quota_decisions_total{quota="Api/orders spec.filters.1",result="exceeded"} 1' in text


@pytest.mark.parametrize("query, message", [
    ("?from=yesterday", "is not an RFC 3339 time"),
    ("?by=week", "is not total, day or hour"),
    ("?from=2026-02-01&to=2026-01-01", "to must be later than from"),
    ("?month=1", "unknown parameter"),
])
def test_bad_usage_queries_get_400_with_the_reason(gw, query, message):
    status, body = gw.admin("GET", "/usage" + query)
    assert status == 400 and message in json.loads(body)["error"]["message"], body


def test_a_state_dir_in_use_is_refused_at_start(tmp_path, gw):
    p = subprocess.run([BIN, "run", "-c", str(gw.dir), "--state-dir", str(gw.state_dir)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "in use by another meshgate process" in p.stderr, p.stderr


@pytest.mark.parametrize("resources, message", [
    (consumers("{requests: 0, per: day}") + apis(), "Consumer/alice: spec.quota.requests: must be at least 1"),
    (consumers() + apis("{name: quota, config: {timeZone: Mars/Olympus}}"),
     'Api/orders: spec.filters.1.config.timeZone: unknown time zone "Mars/Olympus"'),
    (consumers() + apis("{name: quota, config: {per: week}}"), "Api/orders: spec.filters.1.config: unknown variant `week`"),
])
def test_bad_quota_config_is_reported_with_file_and_line(tmp_path, resources, message):
    out = validate_bad(tmp_path, service("up", Addr("127.0.0.1:9")) + resources)
    assert message in out, out


# ------------------------------------------------------------------ shared through Redis

def test_a_redis_quota_is_shared_by_two_gateways_and_honours_fail_mode(tmp_path, backend, gateways):
    redis = Redis(tmp_path)
    try:
        def shared(fail):
            return (f'{{name: quota, config: {{redis: {{url: "{redis.url}", timeout: 200ms}}, '
                    f'failMode: {fail}}}}}')
        quota = "{requests: 40, per: day}"
        g1 = Gateway(tmp_path / "gw1", service("up", backend) + consumers(quota) + apis(shared("closed")))
        g2 = Gateway(tmp_path / "gw2", service("up", backend) + consumers(quota) + apis(shared("open")))
        gateways.extend([g1, g2])
        results = []
        lock = threading.Lock()

        def hammer(g):
            for _ in range(15):
                s = call(g, "alice")[0]
                with lock:
                    results.append(s)

        threads = [threading.Thread(target=hammer, args=(g,)) for g in (g1, g2, g1, g2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 60 requests over both gateways against one quota of 40: exactly 40 pass.
        assert results.count(200) == 40 and results.count(429) == 20, results
        keys = redis.cli("--scan", "--pattern", "meshgate:quota:*").split()
        assert len(keys) == 1 and redis.cli("GET", keys[0]).strip() == "40", keys
        assert int(redis.cli("TTL", keys[0])) > 86_400  # kept a day past the window
        # Redis gone: closed refuses (503), open admits.
        redis.stop()
        status, _, body, _ = call(g1, "carol")
        assert status == 503 and json.loads(body)["error"]["code"] == "rate_limit_unavailable", body
        assert call(g2, "carol")[0] == 200
        _, text = g2.admin("GET", "/metrics")
        assert 'result="failed_open"} 1' in text
        redis.start()
        deadline = time.time() + 10
        while call(g1, "carol")[0] != 200:
            assert time.time() < deadline, "the quota did not recover with Redis"
            time.sleep(0.2)
    finally:
        redis.stop()
