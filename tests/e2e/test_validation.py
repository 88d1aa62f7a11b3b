"""Request validation from `request.params` and `request.body.schema`, end to end:
bad requests are 400 `invalid_request` naming the parameter or JSON pointer, and never
reach the upstream; validation runs after authentication."""

import json

import pytest

from harness import Gateway, curl, service

APIS = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: app}
spec:
  credentials: [{type: key, key: app-key-0123456789}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: orders}
spec:
  request:
    path: /users/{id}/orders
    methods: [GET, POST]
    params:
      - {name: id, in: path, type: integer, minimum: 1}
      - {name: limit, in: query, type: integer, minimum: 1, maximum: 100}
      - {name: status, in: query, enum: [open, closed]}
      - {name: x-tenant, in: header, pattern: "^[a-z0-9-]{3,20}$", required: true}
    body:
      maxBytes: 4096
      schema:
        type: object
        required: [items]
        additionalProperties: false
        properties:
          note: {type: string, maxLength: 20}
          items:
            type: array
            minItems: 1
            items:
              type: object
              required: [sku, qty]
              properties:
                sku: {type: string, pattern: "^[A-Z]{3}-[0-9]+$"}
                qty: {type: integer, minimum: 1}
  filters:
    - {name: key-auth}
  invoke: {service: up}
"""

KEY = ["-H", "x-api-key: app-key-0123456789"]
TENANT = ["-H", "x-tenant: acme"]


@pytest.fixture
def gw(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + APIS)
    gateways.append(g)
    return g


def test_valid_requests_pass(gw, backend):
    st, _, body, _ = curl(*KEY, *TENANT, gw.url + "/users/7/orders?limit=10&status=open")
    assert st == 200, body
    order = json.dumps({"items": [{"sku": "ABC-1", "qty": 2}], "note": "fast"})
    st, _, body, _ = curl(*KEY, *TENANT, "-H", "content-type: application/json", "--data-binary", order,
                          gw.url + "/users/7/orders")
    assert st == 200, body
    assert backend.requests[-1]["body"] == order


@pytest.mark.parametrize("url,extra,needle", [
    ("/users/0/orders", TENANT, 'path parameter "id" must be at least 1'),
    ("/users/abc/orders", TENANT, 'path parameter "id" must be an integer'),
    ("/users/7/orders?limit=1000", TENANT, 'query parameter "limit" must be at most 100'),
    ("/users/7/orders?limit=ten", TENANT, 'query parameter "limit" must be an integer'),
    ("/users/7/orders?status=lost", TENANT, 'query parameter "status" must be one of open, closed'),
    ("/users/7/orders", [], 'header "x-tenant" is required'),
    ("/users/7/orders", ["-H", "x-tenant: ACME!"], 'header "x-tenant" must match'),
])
def test_bad_params_are_400(gw, backend, url, extra, needle):
    st, h, body, _ = curl(*KEY, *extra, gw.url + url)
    assert st == 400, body
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_request" and needle in err["message"], err
    assert h["x-request-id"]
    assert backend.count() == 0


@pytest.mark.parametrize("doc,needle", [
    ('{"items": []}', "/items"),
    ('{"items": [{"sku": "abc", "qty": 1}]}', "/items/0/sku"),
    ('{"items": [{"sku": "ABC-1", "qty": 0}]}', "/items/0/qty"),
    ('{"items": [{"sku": "ABC-1", "qty": 1}], "extra": 1}', "request body at /"),
    ('{"note": "x"}', "request body at /"),
    ('{"items": [', "not valid JSON"),
    ("", "JSON request body is required"),
])
def test_bad_bodies_are_400(gw, backend, doc, needle):
    st, _, body, _ = curl(*KEY, *TENANT, "-X", "POST", "-H", "content-type: application/json",
                          "--data-binary", doc, gw.url + "/users/7/orders")
    assert st == 400, body
    err = json.loads(body)["error"]
    assert err["code"] == "invalid_request" and needle in err["message"], err
    assert backend.count() == 0


def test_oversized_body_is_413(gw, backend):
    big = json.dumps({"items": [{"sku": "ABC-1", "qty": 1}] * 400})
    st, _, body, _ = curl(*KEY, *TENANT, "-H", "content-type: application/json", "--data-binary", big,
                          gw.url + "/users/7/orders")
    assert st == 413, body
    assert backend.count() == 0


def test_authentication_comes_first(gw, backend):
    st, _, body, _ = curl(gw.url + "/users/0/orders?limit=ten")
    assert st == 401, body
    assert backend.count() == 0
