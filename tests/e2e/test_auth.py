"""Consumers, key-auth, acl and the gateway-owned identity headers, end to end."""

import json

import pytest

from harness import Gateway, api, curl, service

CONSUMERS = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: alice}
spec:
  groups: [partners, gold]
  credentials:
    - {type: key, key: alice-inline-key-123}
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: bob}
spec:
  groups: [free]
  credentials:
    - {type: key, key: {env: MESHGATE_TEST_BOB_KEY}}
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: carol}
spec:
  credentials:
    - {type: key, key: {file: carol.key}}
"""

KEYAUTH = '\n  filters:\n    - {name: key-auth, config: {header: x-api-key, query: api_key}}'
ACL = KEYAUTH + '\n    - {name: acl, config: {allow: [partners, carol], deny: [blocked]}}'


@pytest.fixture
def gw(tmp_path, backend, gateways, monkeypatch):
    monkeypatch.setenv("MESHGATE_TEST_BOB_KEY", "bob-env-key-456")
    res = (service("up", backend) + CONSUMERS
           + api("keyed", "/keyed/{*rest}", "{service: up}", extra=KEYAUTH)
           + api("acl", "/acl", "{service: up}", extra=ACL)
           + api("open", "/open", "{service: up}"))
    g = Gateway(tmp_path, res, start=False)
    (g.dir / "carol.key").write_text("carol-file-key-789\n")
    g.start()
    gateways.append(g)
    return g


def error_code(body):
    return json.loads(body)["error"]["code"]


def test_key_from_header_sets_identity_and_hides_the_key(gw):
    status, _, body, _ = curl("-H", "x-api-key: alice-inline-key-123",
                              "-H", "x-consumer-name: admin", "-H", "x-consumer-groups: root",
                              gw.url + "/keyed/x")
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-consumer-name"] == "alice"
    assert seen["x-consumer-groups"] == "partners,gold"
    assert "x-api-key" not in seen


def test_secrets_from_env_and_file(gw):
    for key, who in (("bob-env-key-456", "bob"), ("carol-file-key-789", "carol")):
        status, _, body, _ = curl("-H", f"x-api-key: {key}", gw.url + "/keyed/x")
        assert status == 200, body
        assert json.loads(body)["headers"]["x-consumer-name"] == who


def test_key_from_query_is_removed_before_forwarding(gw):
    status, _, body, _ = curl(gw.url + "/keyed/x?a=1&api_key=alice-inline-key-123&b=2")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["query"] == "a=1&b=2"
    assert seen["headers"]["x-consumer-name"] == "alice"


@pytest.mark.parametrize("args", [
    [],                                                       # missing
    ["-H", "x-api-key: wrong"],                               # unknown
    ["-H", "x-api-key: alice-inline-key-12"],                 # a prefix of a real key
    ["-H", "x-api-key: alice-inline-key-123", "QUERY=bob-env-key-456"],  # two different keys
    ["-H", "x-api-key: alice-inline-key-123", "-H", "x-api-key: bob-env-key-456"],
])
def test_bad_keys_are_401_and_never_reach_the_upstream(gw, backend, args):
    url = gw.url + "/keyed/x"
    if args and args[-1].startswith("QUERY="):
        url += "?api_key=" + args.pop().split("=", 1)[1]
    status, headers, body, _ = curl(*args, url)
    assert status == 401
    assert error_code(body) == "unauthorized"
    assert headers["x-request-id"]
    assert b"alice-inline-key" not in body and b"bob-env-key" not in body
    assert backend.count() == 0


def test_same_key_twice_is_not_ambiguous(gw):
    status, _, body, _ = curl("-H", "x-api-key: alice-inline-key-123",
                              gw.url + "/keyed/x?api_key=alice-inline-key-123")
    assert status == 200, body


def test_acl_by_group_and_name(gw):
    assert curl("-H", "x-api-key: alice-inline-key-123", gw.url + "/acl")[0] == 200   # group partners
    assert curl("-H", "x-api-key: carol-file-key-789", gw.url + "/acl")[0] == 200     # by name
    status, _, body, _ = curl("-H", "x-api-key: bob-env-key-456", gw.url + "/acl")
    assert status == 403 and error_code(body) == "forbidden"
    assert curl(gw.url + "/acl")[0] == 401


def test_identity_headers_stripped_without_auth(gw):
    status, _, body, _ = curl("-H", "x-consumer-name: admin", "-H", "x-consumer-groups: root", gw.url + "/open")
    assert status == 200
    seen = json.loads(body)["headers"]
    assert "x-consumer-name" not in seen and "x-consumer-groups" not in seen


def test_secrets_never_in_config_output_or_access_log(gw):
    curl("-H", "x-api-key: alice-inline-key-123", gw.url + "/keyed/x?api_key=alice-inline-key-123")
    curl("-H", "x-api-key: wrong-key", gw.url + "/keyed/x?api_key=bob-env-key-456")
    _, cfg = gw.admin("GET", "/config")
    assert "alice-inline-key-123" not in cfg and "<redacted>" in cfg
    assert "MESHGATE_TEST_BOB_KEY" in cfg  # the reference is shown, not the value
    assert "bob-env-key-456" not in cfg and "carol-file-key" not in cfg
    import time
    time.sleep(0.3)
    log = (gw.log_path).read_text()
    assert "alice-inline-key-123" not in log and "bob-env-key-456" not in log
    _, metrics = gw.admin("GET", "/metrics")
    assert "alice-inline-key" not in metrics
