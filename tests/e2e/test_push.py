"""Push to proxies end to end: a real `meshgate control` and three real `meshgate
proxy` processes, each serving its own Gateway resource on ports chosen here. A write
through the admin API reaches every proxy; each node's revision shows in `ctl get
nodes`; a config one proxy cannot apply is NACKed and reported while it keeps serving
its last good one; with the control plane gone the proxies serve on, a restarted
proxy starts from its cache, and all catch up when the control plane is back."""

import json
import signal
import socket
import subprocess
import time

import pytest

from harness import BIN, TOKEN, Control, Proxy, free_port

NODES = ("a", "b", "c")
NAMES = {f"node-{n}" for n in NODES}


def gateway(name, port, admin_port):
    return f"""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: {name}}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{port}"}}]
  admin: {{address: "127.0.0.1:{admin_port}"}}
"""


def hello(body):
    return f"""apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: hello}}
spec:
  request: {{path: /hello}}
  invoke: {{mock: {{status: 200, body: "{body}"}}}}
"""


def put(control, tmp_path, name, *docs):
    f = tmp_path / f"{name}.yaml"
    f.write_text("---\n".join(docs))
    code, out, err = control.ctl("apply", "-f", str(f))
    assert code == 0, err
    return int(out.split()[1].rstrip(":")) if out.startswith("revision") else None


def nodes(control):
    status, body = control.call("GET", "/api/v1/nodes")
    assert status == 200, body
    return body["revision"], {n["name"]: n for n in body["items"]}


def wait_nodes(control, check, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rev, by_name = nodes(control)
        if check(rev, by_name):
            return rev, by_name
        time.sleep(0.05)
    raise TimeoutError(f"nodes never matched: {nodes(control)}")


def in_sync(rev, by_name):
    """Every proxy connected and running revision `rev`."""
    return set(by_name) == NAMES and all(
        n["revision"] == rev and n["connected"] for n in by_name.values())


@pytest.fixture
def fleet(tmp_path):
    """A control plane holding three Gateways, and a proxy serving each."""
    control = Control(tmp_path).start()
    proxies = {}
    gateways = []
    for i, n in enumerate(NODES):
        port, admin = free_port(), free_port()
        gateways.append(gateway(f"gw-{n}", port, admin))
        proxies[n] = Proxy(tmp_path, control.url, f"node-{n}", f"gw-{n}", port, admin,
                           labels=f"zone=z{i % 2},name={n}")
    put(control, tmp_path, "gateways", *gateways, hello("v1"))
    for p in proxies.values():
        p.start()
    for p in proxies.values():
        p.wait_for("/hello", "v1")
    yield control, proxies
    for p in proxies.values():
        p.stop()
    control.stop()


def test_a_write_reaches_every_proxy_and_every_node_shows_its_revision(fleet, tmp_path):
    control, proxies = fleet
    rev, by_name = wait_nodes(control, in_sync)
    assert by_name["node-a"]["labels"] == {"zone": "z0", "name": "a"}
    assert by_name["node-b"]["gateway"] == "gw-b"
    assert all(x["connected"] and x["lastError"] is None for x in by_name.values())

    rev2 = put(control, tmp_path, "hello", hello("v2"))
    assert rev2 == rev + 1
    start = time.time()
    for p in proxies.values():
        p.wait_for("/hello", "v2", timeout=5)
    assert time.time() - start < 3, "a write should reach every proxy in well under a second"
    wait_nodes(control, lambda r, b: r == rev2 and in_sync(r, b))
    # Each proxy reports the control plane's revision at GET /config.
    for p in proxies.values():
        cfg = p.config()
        assert cfg["revision"] == str(rev2) and cfg["sources"] == [f"control:{control.url}"]

    code, out, _ = control.ctl("get", "nodes")
    assert code == 0
    rows = [l.split() for l in out.splitlines()]
    assert rows[0][:5] == ["NODE", "GATEWAY", "LABELS", "REVISION", "STATUS"]
    assert sorted(r[0] for r in rows[1:]) == sorted(NAMES)
    for r in rows[1:]:
        assert r[3] == str(rev2) and r[4:6] == ["in", "sync"], out

    # A proxy's own reload endpoint says where its config comes from.
    req = subprocess.run(["curl", "-s", "-X", "POST", f"http://127.0.0.1:{proxies['a'].admin_port}/reload"],
                         capture_output=True, text=True, timeout=10)
    assert "comes from the control plane" in req.stdout, req.stdout


def test_a_config_one_proxy_cannot_apply_is_nacked_and_reported(fleet, tmp_path):
    control, proxies = fleet
    c = proxies["c"]
    # Valid config, but gw-c's new port is taken on c's machine.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    try:
        rev = put(control, tmp_path, "gw-c", gateway("gw-c", busy, c.admin_port), hello("v3"))
        for n in ("a", "b"):
            proxies[n].wait_for("/hello", "v3")
        _, by_name = wait_nodes(control, lambda r, b: b["node-c"]["lastError"] is not None)
        err = by_name["node-c"]["lastError"]
        assert err["revision"] == rev and f"127.0.0.1:{busy}" in " ".join(err["errors"]), err
        assert by_name["node-c"]["revision"] == rev - 1
        assert by_name["node-a"]["revision"] == rev and by_name["node-a"]["lastError"] is None
        # c keeps serving its last good config.
        assert c.get("/hello") == (200, "v1")
        code, out, _ = control.ctl("get", "nodes")
        row = next(l for l in out.splitlines() if l.startswith("node-c"))
        assert "rejected" in row and f"revision {rev}:" in row, out
    finally:
        taken.close()
    # Fixed: c takes the next revision and the error clears.
    fixed = put(control, tmp_path, "gw-c", gateway("gw-c", c.port, c.admin_port), hello("v4"))
    c.wait_for("/hello", "v4")
    wait_nodes(control, lambda r, b: r == fixed and b["node-c"]["revision"] == fixed
               and b["node-c"]["lastError"] is None)


def test_proxies_outlive_the_control_plane_and_catch_up(fleet, tmp_path):
    control, proxies = fleet
    before = put(control, tmp_path, "hello", hello("v5"))
    for p in proxies.values():
        p.wait_for("/hello", "v5")
    wait_nodes(control, lambda r, b: r == before and in_sync(r, b))

    control.stop(signal.SIGKILL)
    for _ in range(20):
        for p in proxies.values():
            assert p.get("/hello") == (200, "v5")
        time.sleep(0.05)
    # A restarted proxy starts from its cache while the control plane is down.
    b = proxies["b"]
    assert b.stop() == 0
    b.start()
    b.wait_for("/hello", "v5")
    assert b.config()["revision"] == str(before)
    assert "starting from the cached config" in b.logs()

    # The control plane comes back (same store, same port); everyone catches up.
    back = Control(tmp_path, store=control.store, port=control.port).start()
    try:
        after = put(back, tmp_path, "hello", hello("v6"))
        assert after == before + 1
        for p in proxies.values():
            p.wait_for("/hello", "v6", timeout=20)
        wait_nodes(back, lambda r, b: r == after and in_sync(r, b), timeout=20)
    finally:
        back.stop()


def test_a_proxy_needs_a_token_and_a_wrong_one_is_refused(tmp_path):
    control = Control(tmp_path).start()
    try:
        port, admin = free_port(), free_port()
        put(control, tmp_path, "gw", gateway("gw", port, admin), hello("x"))
        env = {"PATH": "/usr/bin:/bin"}
        p = subprocess.run([BIN, "proxy", "--control", control.url, "--node", "n"],
                           capture_output=True, text=True, env=env, timeout=10)
        assert p.returncode == 2 and "node token is required" in p.stderr
        bad = Proxy(tmp_path, control.url, "intruder", "gw", port, admin).start(token="wrong")
        try:
            deadline = time.time() + 10
            while "Unauthenticated" not in bad.logs() and time.time() < deadline:
                time.sleep(0.05)
            assert "Unauthenticated" in bad.logs(), bad.logs()
            assert bad.get("/hello")[0] is None, "nothing is served without a config"
            assert nodes(control)[1] == {}
        finally:
            bad.stop()
    finally:
        control.stop()
