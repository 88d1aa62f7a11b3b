"""The control plane end to end: a real `meshgate control` on the embedded store, driven
through its admin REST API (urllib) and through `meshgate ctl` as an operator would.
Every write is validated whole; history, diff and rollback work on revisions; the
state survives a restart; the token is required."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import BIN, ROOT, TOKEN, Control, free_port

QUICKSTART = ROOT / "examples" / "quickstart"


@pytest.fixture
def control(tmp_path):
    c = Control(tmp_path).start()
    yield c
    c.stop()


def revision(control):
    return control.call("GET", "/api/v1/revision")[1]["revision"]


API = """apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: {name}}}
spec:
  request: {{path: "{path}"}}
  invoke: {{service: {service}}}
"""


def test_requests_without_the_token_get_401(control):
    for token in (None, "wrong"):
        status, body = control.call("GET", "/api/v1/apis", token=token)
        assert status == 401 and body["error"]["code"] == "unauthorized", body
    code, _, err = control.ctl("get", "apis", token="wrong")
    assert code == 1 and "bearer token" in err
    code, _, err = control.ctl("get", "apis", token=None)
    assert code == 2 and "MESHGATE_ADMIN_TOKEN" in err


def test_control_needs_a_token_and_its_store_to_itself(tmp_path, control):
    env = {k: v for k, v in os.environ.items() if k != "MESHGATE_ADMIN_TOKEN"}
    p = subprocess.run([BIN, "control", "--store", str(tmp_path / "x.redb")], capture_output=True,
                       text=True, env=env, timeout=10)
    assert p.returncode == 2 and "admin token is required" in p.stderr
    second = Control(tmp_path, store=control.store).start(wait=False)
    assert second.proc.wait(10) == 3
    assert "in use by another process" in second.logs()


def test_apply_get_and_yaml_round_trip_with_ctl(control, tmp_path):
    code, out, err = control.ctl("apply", "-f", str(QUICKSTART), "-m", "quickstart")
    assert code == 0, err
    assert out.startswith("revision 1:") and "put Gateway/public" in out and "put Api/hello" in out
    code, out, _ = control.ctl("get", "apis")
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "REVISION", "STAGE"]
    assert ["Api", "hello", "1", "published"] in [l.split() for l in lines[1:]]
    code, out, _ = control.ctl("get", "service", "demo", "-o", "json")
    body = json.loads(out)
    assert body["revision"] == 1 and body["resource"]["spec"]["endpoints"][0]["address"] == "127.0.0.1:9001"
    # Applying the same files again changes nothing, nor does reformatting them.
    code, out, err = control.ctl("apply", "-f", str(QUICKSTART))
    assert code == 0 and out.startswith("no changes (revision 1)"), out + err
    hello = json.loads(control.ctl("get", "api", "hello", "-o", "json")[1])["resource"]
    status, body = control.call("PUT", "/api/v1/apis/hello", json.dumps(hello, indent=1))
    assert status == 200 and body["changes"] == [] and body["revision"] == 1, body
    # -o yaml prints resources as YAML documents, which apply back.
    code, out, _ = control.ctl("get", "apis", "-o", "yaml")
    assert out.startswith("---\napiVersion: meshgate.io/v1\nkind: Api\n")
    (tmp_path / "apis.yaml").write_text(out)
    code, out, err = control.ctl("apply", "-f", str(tmp_path / "apis.yaml"), "--dry-run")
    assert code == 0 and "dry run: valid" in out, err
    # Consumer secrets never leave the control plane, and a redacted copy is refused.
    code, out, _ = control.ctl("get", "consumer", "acme", "-o", "yaml")
    assert "<redacted>" in out
    (tmp_path / "acme.yaml").write_text(out)
    code, _, err = control.ctl("apply", "-f", str(tmp_path / "acme.yaml"))
    assert code == 1 and "Consumer/acme holds \"<redacted>\" where a secret goes" in err, err


def test_invalid_writes_name_file_and_line_and_write_nothing(control, tmp_path):
    assert control.ctl("apply", "-f", str(QUICKSTART))[0] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(API.format(name="broken", path="/broken", service="nowhere"))
    code, out, err = control.ctl("apply", "-f", str(bad))
    assert code == 1, out
    assert f"{bad}:6: Api/broken: spec.invoke.service: unknown Service \"nowhere\"" in err
    assert revision(control) == 1
    # Deleting a Service that Apis use is refused, naming the users.
    code, _, err = control.ctl("delete", "service", "demo")
    assert code == 1 and "store:Api/get-user:" in err and "unknown Service \"demo\"" in err, err
    assert revision(control) == 1
    # A dry run validates and writes nothing.
    good = tmp_path / "good.yaml"
    good.write_text(API.format(name="extra", path="/extra", service="demo"))
    code, out, _ = control.ctl("apply", "-f", str(good), "--dry-run")
    assert code == 0 and "dry run: valid" in out and "put Api/extra" in out
    assert revision(control) == 1
    # Broken YAML is a diagnostic too.
    bad.write_text("apiVersion: meshgate.io/v1\nkind: Api\nmetadata: {name: x\n")
    code, _, err = control.ctl("apply", "-f", str(bad))
    assert code == 1 and f"{bad}:" in err


def test_rest_crud_statuses(control):
    assert control.ctl("apply", "-f", str(QUICKSTART))[0] == 0
    doc = API.format(name="extra", path="/extra", service="demo")
    status, body = control.call("POST", "/api/v1/apis", doc, headers={"x-meshgate-message": "add extra"})
    assert status == 201 and body["revision"] == 2 and body["changes"] == [{"key": "Api/extra", "op": "put"}]
    status, body = control.call("POST", "/api/v1/apis", doc)
    assert status == 409 and body["error"]["code"] == "already_exists"
    status, body = control.call("PUT", "/api/v1/apis/other", doc)
    assert status == 400 and "the path" in body["error"]["message"]
    status, body = control.call("PUT", "/api/v1/services/extra", doc)
    assert status == 400 and "not a Service" in body["error"]["message"]
    # JSON is YAML: a JSON body works the same.
    as_json = {"apiVersion": "meshgate.io/v1", "kind": "Api", "metadata": {"name": "extra"},
               "spec": {"request": {"path": "/extra2"}, "invoke": {"service": "demo"}}}
    status, body = control.call("PUT", "/api/v1/apis/extra", as_json)
    assert status == 200 and body["revision"] == 3
    status, body = control.call("GET", "/api/v1/apis/extra")
    assert status == 200 and body["resource"]["spec"]["request"]["path"] == "/extra2"
    assert control.call("GET", "/api/v1/apis/nope")[0] == 404
    assert control.call("GET", "/api/v1/widgets")[0] == 400
    status, body = control.call("DELETE", "/api/v1/apis/extra")
    assert status == 200 and body["changes"] == [{"key": "Api/extra", "op": "delete"}]
    assert control.call("DELETE", "/api/v1/apis/extra")[0] == 404
    # Past revisions stay readable.
    status, body = control.call("GET", "/api/v1/apis/extra?revision=2")
    assert status == 200 and body["resource"]["spec"]["request"]["path"] == "/extra"
    assert control.call("GET", "/api/v1/apis?revision=99")[0] == 404


def test_history_diff_and_rollback(control, tmp_path):
    assert control.ctl("apply", "-f", str(QUICKSTART), "-m", "start")[0] == 0
    f = tmp_path / "extra.yaml"
    for i, path in enumerate(["/v1", "/v2", "/v3"]):
        f.write_text(API.format(name="extra", path=path, service="demo"))
        assert control.ctl("apply", "-f", str(f), "-m", f"extra {path}")[0] == 0
    assert revision(control) == 4
    code, out, _ = control.ctl("history", "api", "extra")
    rows = [l.split(None, 4) for l in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["4", "3", "2"] and rows[0][2] == "ana"
    assert rows[0][4].endswith("extra /v3")
    code, out, _ = control.ctl("diff", "api", "extra", "--from", "2", "--to", "4")
    assert '-  request: {path: "/v1"}' in out and '+  request: {path: "/v3"}' in out
    # One resource back to revision 2: a new revision 5 with revision 2's text.
    code, out, _ = control.ctl("rollback", "api", "extra", "--to", "2", "-m", "undo")
    assert code == 0 and out.startswith("revision 5:"), out
    _, body = control.call("GET", "/api/v1/apis/extra")
    assert body["resource"]["spec"]["request"]["path"] == "/v1" and body["revision"] == 5
    # The whole config back to revision 1: the extra Api goes.
    code, out, _ = control.ctl("rollback", "--to", "1")
    assert code == 0 and "delete Api/extra" in out
    assert control.call("GET", "/api/v1/apis/extra")[0] == 404
    _, body = control.call("GET", "/api/v1/diff?from=1")
    assert body["items"] == []
    code, out, _ = control.ctl("history")
    assert out.splitlines()[1].split()[0] == "6"


def test_state_survives_a_restart(tmp_path):
    c = Control(tmp_path).start()
    try:
        assert c.ctl("apply", "-f", str(QUICKSTART), "-m", "before restart")[0] == 0
    finally:
        assert c.stop() == 0
    c = Control(tmp_path, store=c.store).start()
    try:
        assert revision(c) == 1
        _, out, _ = c.ctl("history")
        assert "before restart" in out
    finally:
        c.stop()
