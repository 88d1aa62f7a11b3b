"""API lifecycle end to end, as an API owner drives it with `meshgate ctl lifecycle`
against a real control plane that pushes to two real proxies: `prod` (a gateway that
does not serve drafts) and `staging` (`serveDrafts: true`). A draft is tried on
staging with `invoke.mock` before it exists on prod; published, it is everywhere;
deprecated, its answers carry Deprecation, Sunset and Link; past its sunset, or
offline, it answers 410; deleted, it is gone (404)."""

import email.utils
import json
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from harness import BIN, Control, Proxy, free_port, proxy_gateway


def gateway(name, port, admin, drafts=False):
    return proxy_gateway(name, port, admin, "\n  serveDrafts: true" if drafts else "")


ORDERS = """apiVersion: meshgate.io/v1
kind: Api
metadata: {name: orders-v2}
spec:
  request: {path: /v2/orders}
  invoke: {mock: {status: 200, body: "orders v2"}}
  lifecycle: {stage: draft}
"""


def get(proxy, path="/v2/orders"):
    """(status, headers, body) of a GET through the proxy."""
    return proxy.request(path)


def wait_status(proxy, status, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = get(proxy)
        if got[0] == status:
            return got
        time.sleep(0.05)
    raise TimeoutError(f"{proxy.node}: /v2/orders never answered {status}: {get(proxy)}")


@pytest.fixture
def world(tmp_path):
    control = Control(tmp_path).start()
    proxies = {}
    docs = []
    for name, drafts in (("prod", False), ("staging", True)):
        port, admin = free_port(), free_port()
        docs.append(gateway(name, port, admin, drafts))
        proxies[name] = Proxy(tmp_path, control.url, name, name, port, admin)
    f = tmp_path / "all.yaml"
    f.write_text("---\n".join(docs + [ORDERS]))
    code, _, err = control.ctl("apply", "-f", str(f))
    assert code == 0, err
    for p in proxies.values():
        p.start()
    yield control, proxies
    for p in proxies.values():
        p.stop()
    control.stop()


def lifecycle(control, *args):
    code, out, err = control.ctl("lifecycle", "orders-v2", *args)
    assert code == 0, err
    return out


def test_an_api_goes_from_draft_to_gone(world):
    control, px = world
    prod, staging = px["prod"], px["staging"]

    # Draft: tried on staging, with a mock, before it exists on prod.
    status, _, body = wait_status(staging, 200)
    assert body == "orders v2"
    status, _, body = wait_status(prod, 404)
    assert json.loads(body)["error"]["code"] == "no_route"
    code, out, _ = control.ctl("get", "apis")
    assert ["Api", "orders-v2", "1", "draft"] in [l.split() for l in out.splitlines()]

    # Published: everywhere, with no lifecycle headers.
    assert lifecycle(control, "published", "-m", "go live").startswith("revision 2:")
    status, headers, _ = wait_status(prod, 200)
    assert headers.get("Deprecation") is None and headers.get("Sunset") is None

    # Deprecated, with a sunset and a link: every answer says so.
    sunset = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
    lifecycle(control, "deprecated", "--sunset", sunset.isoformat().replace("+00:00", "Z"),
              "--link", "https://docs.example.com/orders-v3")
    # The revision reaches each proxy in its own time: wait for both.
    deadline = time.time() + 10
    while any(get(p)[1].get("Deprecation") is None for p in (prod, staging)) and time.time() < deadline:
        time.sleep(0.05)
    for p in (prod, staging):
        status, headers, body = get(p)
        assert (status, body) == (200, "orders v2")
        deprecation = headers["Deprecation"]
        assert deprecation.startswith("@") and abs(int(deprecation[1:]) - time.time()) < 120, deprecation
        assert email.utils.parsedate_to_datetime(headers["Sunset"]) == sunset
        assert headers["Link"] == '<https://docs.example.com/orders-v3>; rel="deprecation"'
    _, out, _ = control.ctl("get", "api", "orders-v2", "-o", "json")
    lc = json.loads(out)["resource"]["spec"]["lifecycle"]
    assert lc["stage"] == "deprecated" and lc["deprecatedAt"].endswith("Z")

    # Past its sunset it answers 410 by itself, with no new revision.
    soon = (datetime.now(timezone.utc) + timedelta(seconds=2)).replace(microsecond=0) + timedelta(seconds=1)
    lifecycle(control, "deprecated", "--sunset", soon.isoformat().replace("+00:00", "Z"))
    status, _, body = wait_status(prod, 410, timeout=15)
    assert json.loads(body)["error"]["code"] == "api_gone"
    assert datetime.now(timezone.utc) >= soon

    # Back to published (a mistake undone), then offline: 410 at once.
    lifecycle(control, "published")
    wait_status(prod, 200)
    lifecycle(control, "offline")
    status, _, body = wait_status(prod, 410)
    err = json.loads(body)["error"]
    assert err["code"] == "api_gone" and "orders-v2" in err["message"]
    # Deleted: gone entirely.
    code, _, err = control.ctl("delete", "api", "orders-v2")
    assert code == 0, err
    wait_status(prod, 404)


def test_lifecycle_mistakes_are_refused_with_the_reason(world, tmp_path):
    control, _ = world
    code, _, err = control.ctl("lifecycle", "nope", "published")
    assert code == 1 and "Api/nope does not exist" in err
    code, _, err = control.ctl("lifecycle", "orders-v2", "retired")
    assert code == 2 and "invalid value" in err
    code, _, err = control.ctl("lifecycle", "orders-v2", "deprecated", "--sunset", "next tuesday")
    assert code == 1 and "spec.lifecycle.sunset" in err and "RFC 3339" in err, err
    # Written by hand, a deprecated Api needs its date, and a draft has no sunset.
    bad = tmp_path / "bad.yaml"
    bad.write_text(ORDERS.replace("lifecycle: {stage: draft}",
                                  "lifecycle: {stage: deprecated, link: 'ftp://x'}") + "---\n" +
                   ORDERS.replace("orders-v2", "orders-v1").replace("/v2/", "/v1/")
                   .replace("lifecycle: {stage: draft}", "lifecycle: {stage: draft, sunset: '2030-01-01T00:00:00Z'}"))
    p = subprocess.run([BIN, "validate", "-c", str(bad)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert f"{bad}:7: Api/orders-v2: spec.lifecycle.deprecatedAt: a deprecated Api needs deprecatedAt" in p.stdout, p.stdout
    assert f"{bad}:7: Api/orders-v2: spec.lifecycle.link: \"ftp://x\" is not an http(s) URL" in p.stdout
    assert "Api/orders-v1: spec.lifecycle.sunset: only a deprecated (or offline) Api has a sunset" in p.stdout
