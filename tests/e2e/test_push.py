"""Push to proxies end to end: three real `meshgate proxy` processes, each serving its
own Gateway resource on ports chosen here, fed by a real `meshgate control` on the
embedded store, or by two control planes sharing a real etcd (proxies a and b on the
first, c on the second; every write goes through the first). A write reaches every
proxy; each node's revision shows in `ctl get nodes` on either control plane; a
config one proxy cannot apply is NACKed and reported while it keeps serving its last
good one; with every control plane gone the proxies serve on, a restarted proxy
starts from its cache, and all catch up when the control planes are back."""

import json
import signal
import socket
import subprocess
import time

import pytest

from harness import BIN, Control, Etcd, Proxy, free_port, hello_api as hello, proxy_gateway

NODES = ("a", "b", "c")
NAMES = {f"node-{n}" for n in NODES}


gateway = proxy_gateway


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


class Fleet:
    """Control planes on one store, and a proxy per Gateway."""

    def __init__(self, tmp_path, store):
        self.tmp_path = tmp_path
        self.etcd = Etcd(tmp_path) if store == "etcd" else None
        count = 2 if self.etcd else 1
        self.controls = [Control(tmp_path, store=self.etcd.url if self.etcd else None).start()
                         for _ in range(count)]
        self.proxies = {}
        gateways = []
        for i, n in enumerate(NODES):
            port, admin = free_port(), free_port()
            gateways.append(gateway(f"gw-{n}", port, admin))
            # a and b stream from the first control plane, c from the last; each
            # names the other as its fallback.
            urls = [c.url for c in self.controls]
            if n == "c":
                urls.reverse()
            self.proxies[n] = Proxy(tmp_path, ",".join(urls), f"node-{n}", f"gw-{n}", port, admin,
                                    labels=f"zone=z{i % 2},name={n}")
        put(self.control, tmp_path, "gateways", *gateways, hello("v1"))
        for p in self.proxies.values():
            p.start()
        for p in self.proxies.values():
            p.wait_for("/hello", "v1")

    @property
    def control(self):
        """The control plane writes go through."""
        return self.controls[0]

    def kill_controls(self):
        for c in self.controls:
            c.stop(signal.SIGKILL)

    def restart_controls(self):
        self.controls = [Control(self.tmp_path, store=c.store, port=c.port).start()
                         for c in self.controls]

    def stop(self):
        for p in self.proxies.values():
            p.stop()
        for c in self.controls:
            c.stop()
        if self.etcd:
            self.etcd.stop()


@pytest.fixture(params=["embedded", "etcd"])
def fleet(request, tmp_path):
    f = Fleet(tmp_path, request.param)
    yield f
    f.stop()


def test_a_write_reaches_every_proxy_and_every_node_shows_its_revision(fleet, tmp_path):
    control, proxies = fleet.control, fleet.proxies
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
    for c in fleet.controls:
        wait_nodes(c, lambda r, b: r == rev2 and in_sync(r, b))
    # Each proxy reports the control plane's revision at GET /config.
    for p in proxies.values():
        cfg = p.config()
        assert cfg["revision"] == str(rev2) and cfg["sources"] == [f"control:{p.control_url}"]

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
    control, proxies = fleet.control, fleet.proxies
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
        # A proxy serves a revision a moment before its ACK is recorded: wait for both.
        _, by_name = wait_nodes(control, lambda r, b: b["node-c"]["lastError"] is not None
                                and b["node-a"]["revision"] == rev)
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
    control, proxies = fleet.control, fleet.proxies
    before = put(control, tmp_path, "hello", hello("v5"))
    for p in proxies.values():
        p.wait_for("/hello", "v5")
    wait_nodes(control, lambda r, b: r == before and in_sync(r, b))

    fleet.kill_controls()
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

    # The control planes come back (same store, same ports); everyone catches up.
    fleet.restart_controls()
    after = put(fleet.control, tmp_path, "hello", hello("v6"))
    assert after == before + 1
    for p in proxies.values():
        p.wait_for("/hello", "v6", timeout=20)
    for c in fleet.controls:
        wait_nodes(c, lambda r, b: r == after and in_sync(r, b), timeout=20)


def node_lease(etcd, node):
    """The etcd lease (decimal) the record of `node` is written under, or None."""
    kvs = json.loads(etcd.ctl("get", f"/meshgate/nodes/{node}", "--write-out=json")).get("kvs", [])
    return kvs[0].get("lease") if kvs else None


def lease_ttl(etcd, lease):
    """Seconds `lease` has to live (-1 once gone)."""
    out = etcd.ctl("lease", "timetolive", format(lease, "x"), "--write-out=json")
    return json.loads(out).get("ttl", -1)


def test_a_lease_given_up_after_a_failed_write_is_no_longer_kept_alive(tmp_path):
    """etcd stops answering (SIGSTOP) for longer than the client's 10 s request
    timeout: the first control plane's write of a node record fails, so it gives its
    lease up and takes a new one once etcd answers again. The old lease must then
    lapse: kept alive, it would keep every record written under it, a departed
    node's included, for as long as the control plane runs."""
    fleet = Fleet(tmp_path, "etcd")
    try:
        etcd = fleet.etcd
        wait_nodes(fleet.controls[1], in_sync)
        old = node_lease(etcd, "node-a")
        assert old and lease_ttl(etcd, old) > 0

        etcd.proc.send_signal(signal.SIGSTOP)
        try:
            # node-b leaves: the first control plane writes at once, and the write
            # hangs until the client gives up on it.
            fleet.proxies.pop("b").stop()
            time.sleep(11)
        finally:
            etcd.proc.send_signal(signal.SIGCONT)
        # Heartbeats rewrite node-a's record within 10 s, under the new lease.
        deadline = time.time() + 20
        while node_lease(etcd, "node-a") in (old, None) and time.time() < deadline:
            time.sleep(0.2)
        new = node_lease(etcd, "node-a")
        assert new not in (old, None), "the control plane never took a new lease"
        # Kept alive, a lease is refreshed to its 30 s every 10 s, so over 13 s its
        # time to live never falls below 20 s. Given up, it runs down (the keep-alive
        # sent during the pause was answered on resume, so it may still be near 30).
        before = lease_ttl(etcd, old)
        time.sleep(13)
        after = lease_ttl(etcd, old)
        assert after <= before - 12 and after < 19, f"the lease given up is still kept alive ({before} s, then {after} s to live)"
        assert lease_ttl(etcd, new) > 0
        # The connected nodes' records live on under the new leases, on either
        # control plane; node-b shows as gone.
        def connected(r, b):
            return {n for n, s in b.items() if s["connected"]} == {"node-a", "node-c"}
        for c in fleet.controls:
            wait_nodes(c, connected)
    finally:
        fleet.stop()


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
