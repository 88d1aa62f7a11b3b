"""The mesh: three services (front, orders, users), each instance a real HTTP app
with a real `meshgate proxy --role sidecar` beside it, registered through a real
control plane. Apps call each other by service name through their sidecar's
outbound listener; sidecars find each other through the registry."""

import base64
import json
import signal
import subprocess
import threading
import time

import grpc
import pytest

import harness
from test_grpc import grpc_server  # noqa: F401 (a fixture)
from harness import (BIN, TOKEN, Backend, Control, Etcd, Proxy, Relay, Sidecar, curl,
                     free_port, proxy_gateway, wait_for, wait_ready)

SERVICES = "\n---\n".join(
    f"""apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: {name}}}
spec: {{discovery: {{registry: {name}}}}}
""" for name in ("front", "orders", "users"))


class Mesh:
    """A control plane with the three Services, and the apps and sidecars a test
    adds; stop() stops every process the test started. With `etcd`, two control
    planes (replicas) share a real etcd."""

    def __init__(self, tmp_path, control_args=(), etcd=False):
        self.tmp_path = tmp_path
        self.etcd = Etcd(tmp_path) if etcd else None
        store = self.etcd.url if etcd else None
        self.controls = [Control(tmp_path, store=store, args=control_args).start()
                         for _ in range(2 if etcd else 1)]
        self.control = self.controls[0]
        self.apply("services", SERVICES)
        self.apps, self.sidecars, self.others = [], [], []

    def apply(self, name, text):
        f = self.tmp_path / f"{name}.yaml"
        f.write_text(text)
        code, _, err = self.control.ctl("apply", "-f", str(f))
        assert code == 0, err

    def instance(self, service, name, labels="", lease="2s", wait=True, args=(), controls=None):
        """A new app `name` of `service` with its sidecar, started; it streams from
        `controls` (in order of preference; default the first control plane)."""
        app = Backend(name)
        self.apps.append(app)
        urls = ",".join(c.url for c in (controls or [self.control]))
        sidecar = Sidecar(self.tmp_path, urls, name, service, app.addr,
                          labels=labels, lease=lease, args=args)
        app.outbound = sidecar.outbound
        self.sidecars.append(sidecar)
        return app, sidecar.start(wait=wait)

    def registered(self, service, control=None):
        status, body = (control or self.control).call("GET", f"/api/v1/registry/{service}")
        assert status == 200, body
        return sorted(i["address"] for i in body["items"])

    def wait_registered(self, service, addresses, timeout=10.0, control=None):
        deadline = time.time() + timeout
        while time.time() < deadline:
            now = self.registered(service, control)
            if now == sorted(addresses):
                return time.time()
            time.sleep(0.02)
        raise TimeoutError(f"{service}: registered {now}, not {sorted(addresses)}")

    def stop(self):
        for p in self.sidecars + self.others:
            p.stop()
        for a in self.apps:
            a.stop()
        for c in self.controls:
            c.stop()
        if self.etcd:
            self.etcd.stop()


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    yield m
    m.stop()


def served_by(sidecar, service, n, path="/"):
    """Which app answered each of n calls to `service` through `sidecar`."""
    names = []
    for _ in range(n):
        status, headers, body = sidecar.call(service, path)
        assert status == 200, body
        names.append(headers["x-backend"])
    return names


def test_instances_register_and_calls_by_name_balance_across_them(mesh):
    _, front = mesh.instance("front", "front-1")
    o1, s1 = mesh.instance("orders", "orders-1")
    o2, s2 = mesh.instance("orders", "orders-2")
    mesh.instance("users", "users-1")
    mesh.wait_registered("orders", [s1.address, s2.address])
    status, body = mesh.control.call("GET", "/api/v1/registry")
    by_node = {i["node"]: i for i in body["items"]}
    assert set(by_node) == {"front-1", "orders-1", "orders-2", "users-1"}
    assert by_node["orders-1"]["service"] == "orders"
    assert by_node["orders-1"]["leaseSeconds"] == 2
    # The app calls http://orders/... through its sidecar: round robin over both.
    names = served_by(front, "orders", 20)
    assert names.count("orders-1") == 10 and names.count("orders-2") == 10, names
    # What the orders app saw came through its own sidecar's inbound listener.
    seen = o1.requests[-1]["headers"]
    assert seen["host"] == "orders" and "x-request-id" in seen
    # ctl lists the registry too.
    code, out, err = mesh.control.ctl("get", "registry")
    assert code == 0, err
    assert "orders-1" in out and s1.address in out and "users-1" in out


def test_a_chain_of_three_services_through_their_sidecars(mesh):
    _, front = mesh.instance("front", "front-1")
    mesh.instance("orders", "orders-1")
    mesh.instance("users", "users-1")
    for s in ("front", "orders", "users"):
        assert len(mesh.registered(s)) == 1
    # The test calls front by name; front's app calls orders, whose app calls users.
    status, headers, body = front.call("front", "/call/orders/call/users/end")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["backend"] == "front-1"
    assert answer["called"]["backend"] == "orders-1"
    assert answer["called"]["called"]["backend"] == "users-1"
    assert answer["called"]["called"]["path"] == "/end"


def test_a_killed_instance_leaves_within_its_lease_and_a_new_one_is_used_within_a_second(mesh):
    _, front = mesh.instance("front", "front-1")
    o1, s1 = mesh.instance("orders", "orders-1", lease="2s")
    o2, s2 = mesh.instance("orders", "orders-2", lease="2s")
    mesh.wait_registered("orders", [s1.address, s2.address])
    assert set(served_by(front, "orders", 4)) == {"orders-1", "orders-2"}
    killed_at = time.time()
    s2.kill()
    gone_at = mesh.wait_registered("orders", [s1.address], timeout=5)
    # Gone within the 2 s lease (plus the sweep's 100 ms and this poll's step).
    assert gone_at - killed_at < 2.5, gone_at - killed_at
    # Calls meanwhile and after: never an error (a refused connection is retried
    # on the other instance), and after removal only orders-1 answers.
    assert set(served_by(front, "orders", 6)) == {"orders-1"}
    # A new instance: used within a second of its registration.
    o3, s3 = mesh.instance("orders", "orders-3", wait=False)
    registered_at = mesh.wait_registered("orders", [s1.address, s3.address])
    while o3.count() == 0:
        assert time.time() - registered_at < 1.0, "the new instance was not used within 1 s"
        status, _, body = front.call("orders", "/")
        assert status == 200, body


def test_control_planes_on_one_etcd_share_the_registry(tmp_path):
    mesh = Mesh(tmp_path, etcd=True)
    try:
        a, b = mesh.controls
        # front streams from b only; the orders instances from a (orders-2 falls
        # back to b).
        _, front = mesh.instance("front", "front-1", controls=[b])
        _, s1 = mesh.instance("orders", "orders-1", controls=[a])
        _, s2 = mesh.instance("orders", "orders-2", controls=[a, b])
        mesh.wait_registered("orders", [s1.address, s2.address], timeout=5, control=b)
        assert set(served_by(front, "orders", 4)) == {"orders-1", "orders-2"}
        # b lists a's instances, whose leases a keeps.
        status, body = b.call("GET", "/api/v1/registry/orders")
        assert [("expiresInMs" in i) for i in body["items"]] == [False, False], body
        code, out, err = b.ctl("get", "registry", "orders")
        assert code == 0 and "orders-1" in out, err
        # A killed instance leaves b's view within its 2 s lease, as it leaves a's.
        killed_at = time.time()
        s1.kill()
        gone_at = mesh.wait_registered("orders", [s2.address], timeout=5, control=b)
        assert gone_at - killed_at < 2.5, gone_at - killed_at
        # a dies: orders-2 moves to b and never leaves the registry meanwhile (a's
        # records outlive a by its etcd lease, and b writes it again as its own).
        a.stop(signal.SIGKILL)
        deadline = time.time() + 4
        while time.time() < deadline:
            assert mesh.registered("orders", control=b) == [s2.address]
            assert served_by(front, "orders", 1) == ["orders-2"]
        status, body = b.call("GET", "/api/v1/registry/orders")
        assert "expiresInMs" in body["items"][0], "b holds orders-2's lease now"
    finally:
        mesh.stop()


def etcd_record(etcd, node):
    """The registry record of `node` in `etcd` (JSON) and the etcd lease it is
    under, or (None, None)."""
    out = etcd.ctl("get", f"/meshgate/registry/{node}", "--write-out=json")
    kvs = json.loads(out).get("kvs") or []
    if not kvs:
        return None, None
    return json.loads(base64.b64decode(kvs[0]["value"])), kvs[0].get("lease")


def test_a_sidecar_that_moves_between_live_control_planes_stays_in_the_shared_registry(tmp_path):
    mesh = Mesh(tmp_path, etcd=True)
    try:
        a, b = mesh.controls
        c = Control(tmp_path, store=mesh.etcd.url).start()
        mesh.controls.append(c)
        # orders-1 reaches a through a relay the test can cut, b directly.
        to_a = Relay(a.port)
        _, s = mesh.instance("orders", "orders-1", lease="4s", controls=[to_a, b])
        mesh.wait_registered("orders", [s.address], control=c)
        _, a_lease = etcd_record(mesh.etcd, "orders-1")
        # A partition between the sidecar and a, both alive: the sidecar moves to b.
        # a's lease on the instance lingers (no Deregister came), but b's claim is
        # the later one, so a drops it at once rather than at its expiry.
        cut_at = time.time()
        to_a.cut()

        def holders():
            held = []
            for control in (a, b):
                _, body = control.call("GET", "/api/v1/registry/orders")
                held += [control.port for i in body["items"] if "expiresInMs" in i]
            return held
        wait_for(lambda: holders() == [b.port], "b holds orders-1's lease and a does not",
                 timeout=3)
        assert time.time() - cut_at < 3, "a yielded before its 4 s lease ran out"
        # a's etcd lease lapses while a lives (as after a pause or a partition from
        # etcd): a takes a new one and writes its records again, which must not
        # take orders-1 back, nor delete it when a's old lease on it would have run out.
        mesh.etcd.ctl("lease", "revoke", format(a_lease, "x"))
        mesh.instance("users", "users-1", controls=[a])
        while time.time() < cut_at + 6.5:
            assert mesh.registered("orders", control=c) == [s.address]
            assert mesh.registered("orders", control=a) == [s.address]
            time.sleep(0.1)
        record, lease = etcd_record(mesh.etcd, "orders-1")
        assert record and lease != a_lease, (record, lease)
        _, users_lease = etcd_record(mesh.etcd, "users-1")
        assert users_lease not in (None, a_lease, lease), "a wrote under a new lease"
    finally:
        mesh.stop()


def test_a_graceful_stop_deregisters_first_and_no_call_fails(mesh):
    _, front = mesh.instance("front", "front-1")
    _, s1 = mesh.instance("orders", "orders-1", lease="30s")
    _, s2 = mesh.instance("orders", "orders-2", lease="30s")
    mesh.wait_registered("orders", [s1.address, s2.address])
    failures, done = [], threading.Event()

    def load():
        while not done.is_set():
            status, _, body = front.call("orders", "/")
            if status != 200:
                failures.append((status, body))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stopped_at = time.time()
    s2.proc.terminate()
    # Out of the registry at once, long before its 30 s lease.
    gone_at = mesh.wait_registered("orders", [s1.address], timeout=5)
    assert gone_at - stopped_at < 1.0
    assert s2.proc.wait(15) == 0
    time.sleep(0.5)
    done.set()
    for t in threads:
        t.join()
    assert failures == []
    assert "deregistered" in s2.logs()


def test_outbound_speaks_http2_and_refuses_unknown_services(mesh):
    _, front = mesh.instance("front", "front-1")
    mesh.instance("users", "users-1")
    status, headers, body, code = curl("--http2-prior-knowledge", "-H", "Host: users",
                                       f"http://127.0.0.1:{front.outbound}/profile")
    assert (status, code, headers["x-backend"]) == (200, 0, "users-1"), body
    # curl sends the Host header as :authority; the app sees it as Host.
    assert json.loads(body)["headers"]["host"] == "users"
    status, headers, body = front.call("nowhere", "/")
    assert status == 404 and '"no_route"' in body
    # A Service with no instance registered: 503, said as JSON.
    status, _, body = front.call("orders", "/")
    assert status == 503 and "no_healthy_upstream" in body, body


def edge_to_orders(mesh, tmp_path, invoke, ready=(200,)):
    """An edge proxy serving Gateway `edge` with Api `/orders/{*rest}` invoking
    `invoke` (flow YAML), once it answers one of `ready`."""
    port, admin = free_port(), free_port()
    mesh.apply("edge", proxy_gateway("edge", port, admin) + f"""---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: orders-api}}
spec:
  gateways: [edge]
  request: {{path: "/orders/{{*rest}}"}}
  invoke: {invoke}
""")
    edge = Proxy(tmp_path, mesh.control.url, "edge-1", "edge", port, admin).start()
    mesh.others.append(edge)
    deadline = time.time() + 10
    while edge.get("/orders/x")[0] not in ready:
        assert time.time() < deadline, edge.logs()
        time.sleep(0.05)
    return edge


def test_an_edge_proxy_reaches_registered_instances(mesh, tmp_path):
    _, s1 = mesh.instance("orders", "orders-1")
    edge = edge_to_orders(mesh, tmp_path, '{service: orders, path: "/{rest}"}')
    status, headers, body = edge.request("/orders/x")
    assert headers["x-backend"] == "orders-1"
    assert json.loads(body)["path"] == "/x", "the edge's Api rewrote the path"
    # A sidecar serves none of the config's Apis unless told (--gateway): a call
    # through its outbound listener goes to the service as it is.
    status, _, body = s1.call("orders", "/orders/x")
    assert status == 200 and json.loads(body)["path"] == "/orders/x"


def test_sidecar_flags_are_checked():
    def run(*args):
        return subprocess.run([BIN, "proxy", "--control", "http://127.0.0.1:1", "--node", "n", *args],
                              capture_output=True, text=True, timeout=10,
                              env={"MESHGATE_NODE_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"})
    p = run("--role", "sidecar", "--service", "orders")
    assert p.returncode == 2 and "--app" in p.stderr, p.stderr
    p = run("--role", "sidecar", "--service", "orders", "--app", "127.0.0.1:1",
            "--inbound", "0.0.0.0:15006")
    assert p.returncode == 2 and "--advertise" in p.stderr, p.stderr
    p = run("--service", "orders")
    assert p.returncode == 2 and "--role sidecar" in p.stderr, p.stderr
    p = run("--role", "sidecar", "--service", "orders", "--app", "127.0.0.1:1",
            "--inbound", "127.0.0.1:2", "--lease", "0s")
    assert p.returncode == 2 and "lease" in p.stderr, p.stderr
    for bad in ("0s", "soon"):
        p = run("--role", "sidecar", "--service", "orders", "--app", "127.0.0.1:1",
                "--inbound", "127.0.0.1:2", "--tcp-idle-timeout", bad)
        assert p.returncode == 2 and "--tcp-idle-timeout" in p.stderr, p.stderr
    p = run("--role", "sidecar", "--service", "orders", "--app", "127.0.0.1:1",
            "--inbound", "127.0.0.1:2", "--outbound", "127.0.0.1:3,[::1]:3,127.0.0.1:3")
    assert p.returncode == 2 and "--outbound names 127.0.0.1:3 twice" in p.stderr, p.stderr
    p = run("--role", "sidecar", "--service", "orders", "--app", "127.0.0.1:1",
            "--inbound", "127.0.0.1:2,somewhere")
    assert p.returncode == 2 and "--inbound" in p.stderr, p.stderr
    # The iptables helper: a network of the other family is a usage error.
    p = subprocess.run([BIN, "mesh", "iptables", "--proxy-uid", "1", "--ip-family", "ipv4",
                        "--exclude-outbound-cidrs", "fd00::/8"], capture_output=True, text=True)
    assert p.returncode == 2 and "fd00::/8 is not of --ip-family" in p.stderr, p.stderr
    p = subprocess.run([BIN, "mesh", "iptables", "--proxy-uid", "1"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and p.stdout.count("*nat") == 2, p.stdout
    assert "ip6tables-restore --noflush" in p.stdout, p.stdout


def chain(answer):
    """The apps a /call/... request went through, in order."""
    names = []
    while isinstance(answer, dict):
        names.append(answer["backend"])
        answer = answer.get("called")
    return names


def test_a_lane_tag_reaches_each_services_lane_instance_or_its_baseline(mesh):
    _, front = mesh.instance("front", "front-1")
    mesh.instance("orders", "orders-1")
    mesh.instance("orders", "orders-canary", labels="lane=canary")
    mesh.instance("users", "users-1")
    assert len(mesh.registered("orders")) == 2
    path = "/call/orders/call/users/end"

    def through_front(headers):
        # As another proxy would: straight to front's inbound listener.
        status, _, body = harness.mesh_call(front.inbound, "front", path, headers)
        assert status == 200, body
        return chain(json.loads(body))

    # Untagged: the baseline only, every time.
    for _ in range(6):
        assert through_front({}) == ["front-1", "orders-1", "users-1"]
    # Tagged at the edge; the apps pass on only their trace context: the sidecars
    # tag each hop from it. orders has a canary, users has none (its baseline).
    for i in range(4):
        trace = f"00-{i + 1:032x}-00f067aa0ba902b7-01"
        got = through_front({"x-mesh-lane": "canary", "traceparent": trace})
        assert got == ["front-1", "orders-canary", "users-1"], got
    # The tag in W3C baggage, which the apps pass on themselves.
    got = through_front({"baggage": "mesh-lane=canary,user=ana"})
    assert got == ["front-1", "orders-canary", "users-1"], got
    # A lane no service has: the baseline everywhere.
    got = through_front({"x-mesh-lane": "blue", "traceparent": f"00-{99:032x}-00f067aa0ba902b7-01"})
    assert got == ["front-1", "orders-1", "users-1"], got


SHOP_CONSUMER = """apiVersion: meshgate.io/v1
kind: Consumer
metadata: {name: shop-app}
spec:
  credentials: [{type: key, key: shop-key-123456}]
"""


def gateway_sidecar(mesh, tmp_path, api):
    """Gateway `public` with the shop Consumer and `api` (an Api resource's YAML),
    served by the sidecar of front's app `bff-1`: (public port, app, sidecar)."""
    port, admin = free_port(), free_port()
    mesh.apply("public", proxy_gateway("public", port, admin) + "---\n" + SHOP_CONSUMER
               + "---\n" + api)
    app = Backend("bff-1")
    mesh.apps.append(app)
    bff = Sidecar(tmp_path, mesh.control.url, "bff-1", "front", app.addr, gateway="public")
    app.outbound = bff.outbound
    mesh.sidecars.append(bff.start())
    return port, app, bff


def test_a_gateway_sidecar_serves_public_apis_with_no_extra_hop(mesh, tmp_path):
    port, app, _ = gateway_sidecar(mesh, tmp_path, """apiVersion: meshgate.io/v1
kind: Api
metadata: {name: shop}
spec:
  gateways: [public]
  request: {path: "/shop/{*rest}"}
  filters:
    - {name: key-auth, config: {header: x-api-key}}
  invoke: {service: front, path: "/call/orders/{rest}"}
""")
    mesh.instance("orders", "orders-1")
    url = f"http://127.0.0.1:{port}/shop/items"
    status, _, body, _ = curl(url)
    assert status == 401, body
    status, headers, body, _ = curl("-H", "x-api-key: shop-key-123456", url)
    assert status == 200, body
    answer = json.loads(body)
    # The public Api ran its filters in the BFF's own sidecar and went straight to
    # the app, whose call to orders left through the same sidecar.
    assert chain(answer) == ["bff-1", "orders-1"]
    assert answer["headers"]["x-consumer-name"] == "shop-app"
    assert answer["called"]["path"] == "/items"
    assert len(app.requests) == 1


def test_grpc_calls_by_service_name_through_two_sidecars(mesh, tmp_path, grpc_server):
    mesh.apply("greeter", """apiVersion: meshgate.io/v1
kind: Service
metadata: {name: greeter}
spec: {protocol: grpc, discovery: {registry: greeter}}
""")
    greeter = Sidecar(tmp_path, mesh.control.url, "greeter-1", "greeter", f"127.0.0.1:{grpc_server}")
    mesh.sidecars.append(greeter.start())
    _, front = mesh.instance("front", "front-1")
    mesh.wait_registered("greeter", [greeter.address])
    # A grpcio channel to the app's sidecar, with the service name as authority.
    ch = grpc.insecure_channel(f"127.0.0.1:{front.outbound}",
                               options=[("grpc.default_authority", "greeter")])
    try:
        unary = ch.unary_unary("/test.Echo/Unary")
        answer, call = unary.with_call(b"hi", timeout=5)
        assert answer == b"echo:hi"
        assert ("x-trailer", "t1") in call.trailing_metadata()
        stream = ch.unary_stream("/test.Echo/Stream")
        assert list(stream(b"3", timeout=5)) == [b"msg0", b"msg1", b"msg2"]
        with pytest.raises(grpc.RpcError) as failed:
            ch.unary_unary("/test.Echo/Fail")(b"", timeout=5)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failed.value.details() == "nope"
    finally:
        ch.close()
