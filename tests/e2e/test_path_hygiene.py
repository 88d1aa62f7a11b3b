"""Path and header hygiene at the auth boundary: with /admin/{*rest} behind key-auth and
/public/{*rest} open, no crafted path reaches the admin upstream unauthenticated, over
HTTP/1.1 (raw bytes, so nothing is cleaned up by the client) and HTTP/2 (curl
--path-as-is)."""

import json

import pytest

from harness import Gateway, api, curl, raw, service

CONSUMER = """---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: ops}
spec:
  credentials:
    - {type: key, key: ops-key-0123456789}
"""

# (path as sent, what must happen): "refused" = 401 from key-auth on the admin route;
# "404" = no route; "public" = served by the public Api with a path still under /public.
MATRIX = [
    ("/public/../admin/x", "refused"),
    ("/public/%2e%2e/admin/x", "refused"),
    ("/public/%2E%2E/admin/x", "refused"),
    ("/public/.%2e/admin/x", "refused"),
    ("/public/../../admin/x", "refused"),
    ("//admin/x", "refused"),
    ("///admin//x", "refused"),
    ("/admin/./x", "refused"),
    ("/admin/x;param", "refused"),
    ("/%61dmin/x", "refused"),
    ("/ADMIN/x", "404"),
    ("/Admin/x", "404"),
    ("/admin%2fx", "404"),
    ("/admin%2Fx", "404"),
    ("/public/..%2fadmin/x", "public"),
    ("/public/%2e%2e%2fadmin/x", "public"),
    ("/public/x", "public"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from harness import Backend
    tmp = tmp_path_factory.mktemp("hygiene")
    admin, public = Backend("admin"), Backend("public")
    res = (service("admin-svc", admin) + service("public-svc", public) + CONSUMER
           + api("admin", "/admin/{*rest}", "{service: admin-svc}",
                 extra="\n  filters:\n    - {name: key-auth}")
           + api("public", "/public/{*rest}", "{service: public-svc}"))
    g = Gateway(tmp, res)
    yield g, admin, public
    g.stop()
    admin.stop()
    public.stop()


def h1(gw, path):
    out = raw(gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def h2(gw, path):
    status, _, body, _ = curl("--http2-prior-knowledge", "--path-as-is", gw.url + path)
    return status, body


@pytest.mark.parametrize("proto", ["h1", "h2"])
@pytest.mark.parametrize("path,want", MATRIX)
def test_matrix(setup, proto, path, want):
    gw, admin, public = setup
    before = admin.count()
    status, body = (h1 if proto == "h1" else h2)(gw, path)
    assert admin.count() == before, f"{path} reached the admin upstream"
    if want == "refused":
        assert status == 401, (status, body)
        assert json.loads(body)["error"]["code"] == "unauthorized"
    elif want == "404":
        assert status == 404, (status, body)
        assert json.loads(body)["error"]["code"] == "no_route"
    else:
        assert status == 200, (status, body)
        assert json.loads(body)["path"].startswith("/public/")


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_positive_control(setup, proto):
    gw, admin, _ = setup
    args = ["--http2-prior-knowledge"] if proto == "h2" else []
    status, _, body, _ = curl(*args, "-H", "x-api-key: ops-key-0123456789", gw.url + "/public/../admin/./x")
    assert status == 200, body
    assert admin.requests[-1]["path"] == "/admin/x"
