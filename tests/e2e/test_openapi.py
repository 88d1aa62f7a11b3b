"""OpenAPI end to end against a real control plane.

Export: `GET /api/v1/openapi.json` and `meshgate ctl openapi` describe the published
Apis — paths, methods, parameters, body schemas, mock answers, security schemes from
the auth filters — and the document passes `openapi-spec-validator` (3.1). Drafts,
offline Apis and grey releases are left out.

Import: `meshgate ctl import openapi FILE` turns an OpenAPI 3.0 document into draft
Apis, which a real proxy on a drafts-serving gateway then serves: their mocks answer
with the documented examples, and their parameters and body schemas are enforced.
"""

import base64
import json
import urllib.request

import pytest
import yaml
from openapi_spec_validator import validate

from harness import Control, Proxy, free_port

HS_KEY = base64.urlsafe_b64encode(b"openapi-test-secret-0123456789abcdef").rstrip(b"=").decode()


def config(port, admin):
    return f"""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{port}"}}]
  admin: {{address: "127.0.0.1:{admin}"}}
  serveDrafts: true
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: users}}
spec:
  endpoints: [{{address: "127.0.0.1:9"}}]
---
apiVersion: meshgate.io/v1
kind: Policy
metadata: {{name: bearer}}
spec:
  filters:
    - {{name: jwt, config: {{providers: [{{issuer: https://idp.test, algorithms: [HS256], jwks: {{inline: {{keys: [{{kty: oct, k: "{HS_KEY}"}}]}}}}}}]}}}}
    - {{name: rate-limit, config: {{key: ip, rate: "50/s"}}}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: get-user, labels: {{team: accounts}}}}
spec:
  request:
    path: "/users/{{id}}"
    methods: [GET]
    params:
      - {{name: id, in: path, type: integer, minimum: 1}}
      - {{name: fields, in: query, type: string, enum: [name, email]}}
  filters:
    - {{name: key-auth, config: {{header: x-api-key, query: api_key}}}}
  invoke: {{service: users}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: create-order}}
spec:
  request:
    path: /orders
    methods: [POST]
    headers: {{x-tenant: "^[a-z]+$"}}
    body:
      schema:
        type: object
        required: [sku, qty]
        properties:
          sku: {{type: string}}
          qty: {{type: integer, minimum: 1}}
  filters:
    - {{policy: bearer}}
  invoke: {{mock: {{status: 201, body: {{id: 42, state: created}}}}}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: files}}
spec:
  request: {{path: "/files/{{*rest}}"}}
  invoke: {{mock: {{status: 200, body: "file", headers: {{content-type: text/plain}}}}}}
  lifecycle: {{stage: deprecated, deprecatedAt: "2026-01-01T00:00:00Z"}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: secret-draft}}
spec:
  request: {{path: /draft}}
  invoke: {{mock: {{status: 200}}}}
  lifecycle: {{stage: draft}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: retired}}
spec:
  request: {{path: /retired}}
  invoke: {{mock: {{status: 200}}}}
  lifecycle: {{stage: offline}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: get-user-canary}}
spec:
  release: {{of: get-user, percent: 5}}
  request:
    path: "/users/{{id}}"
    methods: [GET]
  invoke: {{mock: {{status: 200}}}}
"""


PETSTORE = """openapi: 3.0.3
info: {title: Petstore, version: 1.0.0}
servers: [{url: "https://petstore.example.com/v1"}]
paths:
  /pets:
    get:
      operationId: listPets
      parameters:
        - {$ref: "#/components/parameters/Limit"}
      responses:
        "200":
          description: the pets
          content:
            application/json:
              example: [{id: 1, name: rex}]
    post:
      operationId: createPet
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/NewPet"}
      responses:
        "201":
          description: created
          content:
            application/json:
              examples:
                rex: {value: {id: 2, name: rex}}
  /pets/{petId}:
    parameters:
      - {name: petId, in: path, required: true, schema: {type: integer, minimum: 1}}
    get:
      responses:
        "200": {description: one pet}
  /pets/{petId}.json:
    get:
      responses:
        "200": {description: one pet as a file}
components:
  parameters:
    Limit: {name: limit, in: query, schema: {type: integer, maximum: 100}}
  schemas:
    NewPet:
      type: object
      required: [name]
      properties:
        name: {type: string, minLength: 1}
        tag: {$ref: "#/components/schemas/Tag"}
    Tag: {type: string, maxLength: 20}
"""


@pytest.fixture
def world(tmp_path):
    control = Control(tmp_path).start()
    port, admin = free_port(), free_port()
    f = tmp_path / "config.yaml"
    f.write_text(config(port, admin))
    code, _, err = control.ctl("apply", "-f", str(f))
    assert code == 0, err
    proxy = Proxy(tmp_path, control.url, "edge-1", "edge", port, admin).start()
    yield control, proxy
    proxy.stop()
    control.stop()


def test_the_exported_document_is_valid_openapi_3_1_of_the_published_apis(world):
    control, _ = world
    status, doc = control.call("GET", "/api/v1/openapi.json")
    assert status == 200, doc
    validate(doc)  # raises on an invalid document
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {"/users/{id}", "/orders", "/files/{rest}"}

    get_user = doc["paths"]["/users/{id}"]["get"]
    assert get_user["operationId"] == "get-user" and get_user["tags"] == ["accounts"]
    params = {(p["in"], p["name"]): p for p in get_user["parameters"]}
    assert params[("path", "id")] == {"name": "id", "in": "path", "required": True,
                                      "schema": {"type": "integer", "minimum": 1}}
    assert params[("query", "fields")]["schema"]["enum"] == ["name", "email"]
    assert params[("query", "fields")]["required"] is False
    assert get_user["security"] == [{"keyAuth.x-api-key": []}, {"keyAuthQuery.api_key": []}]
    assert set(get_user["responses"]) == {"default", "400", "401"}

    order = doc["paths"]["/orders"]["post"]
    assert order["requestBody"]["required"] is True
    assert order["requestBody"]["content"]["application/json"]["schema"]["required"] == ["sku", "qty"]
    assert order["responses"]["201"]["content"]["application/json"]["example"] == {"id": 42, "state": "created"}
    assert order["security"] == [{"jwt": []}]  # from the Policy it names
    assert {"400", "401", "429"} <= set(order["responses"])
    assert {"in": "header", "name": "x-tenant", "required": True,
            "schema": {"type": "string", "pattern": "^[a-z]+$"}} in order["parameters"]

    files = doc["paths"]["/files/{rest}"]
    assert set(files) == {"get", "put", "post", "delete", "patch"}
    assert files["get"]["deprecated"] is True and files["get"]["operationId"] == "files-get"
    assert files["get"]["responses"]["200"]["content"] == {"text/plain": {"example": "file"}}

    schemes = doc["components"]["securitySchemes"]
    assert schemes["jwt"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert schemes["keyAuth.x-api-key"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}

    # ctl prints the same document, as YAML on request; an unknown gateway is 404.
    code, out, err = control.ctl("openapi", "-o", "yaml")
    assert code == 0, err
    assert yaml.safe_load(out) == doc
    code, out, _ = control.ctl("openapi", "--gateway", "edge")
    assert code == 0 and json.loads(out)["info"]["title"] == "meshgate Gateway edge"
    code, _, err = control.ctl("openapi", "--gateway", "nope")
    assert code == 1 and "Gateway/nope does not exist" in err


def call(proxy, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{proxy.port}{path}", method=method, data=data,
                                 headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_an_imported_openapi_document_becomes_draft_apis_that_serve_and_validate(world, tmp_path):
    control, proxy = world
    f = tmp_path / "petstore.yaml"
    f.write_text(PETSTORE)
    code, out, err = control.ctl("import", "openapi", str(f), "-m", "petstore")
    assert code == 0, err
    assert "put Api/list-pets" in out and "put Api/create-pet" in out and "put Api/get-pets-pet-id" in out
    assert 'skipped: GET /pets/{petId}.json: segment "{petId}.json" mixes a parameter with text' in out, out
    _, listing, _ = control.ctl("get", "apis")
    rows = {l.split()[1]: l.split()[3] for l in listing.splitlines()[1:]}
    assert rows["list-pets"] == rows["create-pet"] == rows["get-pets-pet-id"] == "draft"

    # The drafts serve on a drafts-serving gateway, from the server's base path.
    deadline_wait = proxy.wait_for  # waits for 200 with a body
    deadline_wait("/v1/pets", '[{"id":1,"name":"rex"}]')
    assert call(proxy, "GET", "/v1/pets?limit=500")[0] == 400
    status, body = call(proxy, "POST", "/v1/pets", {"name": "rex"})
    assert (status, body) == (201, {"id": 2, "name": "rex"})
    status, body = call(proxy, "POST", "/v1/pets", {"tag": "x" * 30})
    assert status == 400 and body["error"]["code"] == "invalid_request", body
    assert call(proxy, "GET", "/v1/pets/0")[0] == 400
    assert call(proxy, "GET", "/v1/pets/7")[0] == 200

    # Drafts are not in the export until published.
    assert "/v1/pets" not in control.call("GET", "/api/v1/openapi.json")[1]["paths"]
    code, _, err = control.ctl("lifecycle", "list-pets", "published")
    assert code == 0, err
    _, doc = control.call("GET", "/api/v1/openapi.json")
    validate(doc)
    assert doc["paths"]["/v1/pets"]["get"]["parameters"] == [
        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "maximum": 100}}]

    # Importing again would overwrite: refused, nothing written.
    code, _, err = control.ctl("import", "openapi", str(f))
    assert code == 1 and "already exists" in err, err
    # With --service the Apis call it instead of mocking.
    code, out, err = control.ctl("import", "openapi", str(f), "--service", "users", "--dry-run")
    assert code == 1 and "already exists" in err


def test_import_refuses_what_it_cannot_read(world, tmp_path):
    control, _ = world
    for text, message in [
        ('{"swagger": "2.0", "paths": {}}', "Swagger 2.0 is not supported"),
        ("just: [a, yaml", "not JSON or YAML"),
        ("openapi: 3.1.0\ninfo: {title: t, version: '1'}\npaths: {}\n", "no operations"),
    ]:
        f = tmp_path / "doc.yaml"
        f.write_text(text)
        code, _, err = control.ctl("import", "openapi", str(f))
        assert code == 1 and message in err, err
    f = tmp_path / "svc.yaml"
    f.write_text(PETSTORE.replace("/pets", "/animals").replace("Pets", "Animals"))
    code, out, err = control.ctl("import", "openapi", str(f), "--service", "users", "--dry-run")
    assert code == 0 and out.startswith("dry run: valid") and "put Api/list-animals" in out, (out, err)
    code, out, err = control.ctl("import", "openapi", str(f), "--service", "nope")
    assert code == 1 and 'unknown Service "nope"' in err, err
