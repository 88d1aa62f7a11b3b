"""Policy resources end to end: a named filter list shared by several Apis, and a
gateway-wide global Policy, run in the documented order (global, then the Api's
filters; responses in reverse)."""

import json

import pytest

from harness import Gateway, api, curl, service

RESOURCES = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: acme}
spec:
  groups: [partners]
  credentials: [{type: key, key: acme-key-0123456789}]
---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: stranger}
spec:
  credentials: [{type: key, key: stranger-key-0123456789}]
---
apiVersion: meshgate.io/v1
kind: Policy
metadata: {name: partner-defaults}
spec:
  filters:
    - {name: key-auth}
    - {name: acl, config: {allow: [partners]}}
---
apiVersion: meshgate.io/v1
kind: Policy
metadata: {name: edge}
spec:
  filters:
    - {name: ip-restriction, config: {deny: [198.51.100.0/24], trustedProxies: [127.0.0.1]}}
    - name: transform
      config:
        request: {headers: {set: {x-edge: "1"}}}
        response: {headers: {set: {x-layer: global}}}
"""

API_FILTERS = """
  filters:
    - {policy: partner-defaults}
    - name: transform
      config:
        response: {headers: {set: {x-layer: api}}}"""


@pytest.fixture
def gw(tmp_path, backend, gateways):
    res = (service("up", backend) + RESOURCES
           + api("orders", "/orders", "{service: up}", extra=API_FILTERS)
           + api("invoices", "/invoices", "{service: up}", extra="\n  filters:\n    - {policy: partner-defaults}")
           + api("open", "/open", "{service: up}"))
    # Gateway.spec.policies: the global list, run before every Api's filters.
    g = Gateway(tmp_path, res, limits="\n  policies: [edge]")
    gateways.append(g)
    return g


KEY = ["-H", "x-api-key: acme-key-0123456789"]


def test_shared_policy_protects_every_api_that_names_it(gw, backend):
    for path in ("/orders", "/invoices"):
        assert curl(gw.url + path)[0] == 401
        assert curl("-H", "x-api-key: stranger-key-0123456789", gw.url + path)[0] == 403
        st, _, body, _ = curl(*KEY, gw.url + path)
        assert st == 200, body
        assert json.loads(body)["headers"]["x-consumer-name"] == "acme"
    assert curl(gw.url + "/open")[0] == 200
    assert backend.count() == 3


def test_global_policy_runs_first_and_answers_last(gw, backend):
    # The global ip-restriction refuses before the Api's key-auth would ask for a key.
    st, _, body, _ = curl("-H", "x-forwarded-for: 198.51.100.7", gw.url + "/orders")
    assert st == 403, body
    assert backend.count() == 0
    st, h, body, _ = curl(*KEY, gw.url + "/orders")
    assert st == 200
    assert json.loads(body)["headers"]["x-edge"] == "1"       # global request edit
    assert h["x-layer"] == "global"                            # global response edit ran last
    st, h, body, _ = curl(gw.url + "/open")
    assert json.loads(body)["headers"]["x-edge"] == "1" and h["x-layer"] == "global"
