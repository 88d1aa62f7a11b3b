"""Transparent interception, in network namespaces the test makes: apps that know
nothing of the mesh (plain urllib and sockets, no proxy settings) have their TCP
traffic sent through their sidecar by the rules `meshgate mesh iptables --apply`
installs. The sidecars run as their own user (uid 1337), as the rules expect.

    root namespace: the control plane, on a bridge (10.X.Y.1, fdXX:X:X::1)
    front  (10.X.Y.2, fdXX:X:X::2): app + sidecar + rules
    orders (10.X.Y.3, fdXX:X:X::3): app + sidecar + rules, tls mode mesh
    ext    (10.X.Y.4, fdXX:X:X::4): HTTP and TCP echo servers outside the mesh

Every host has an IPv4 and an IPv6 address: the rules and the sidecars cover both
families.

In the mesh namespaces, `orders` resolves to the orders host (/etc/netns/NS/hosts)
as a DNS name would."""

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import BIN, TOKEN, Control, curl, metric_sum, node_env, wait_ready

APP = str(Path(__file__).with_name("netns_app.py"))
PROXY_UID = 1337

SERVICES = """apiVersion: meshgate.io/v1
kind: Service
metadata: {name: front}
spec: {discovery: {registry: front}}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {name: orders}
spec:
  discovery: {registry: orders}
  tls: {mode: mesh}
"""


def sh(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


class Host:
    """A network namespace on the bridge, and the processes the test runs in it."""

    def __init__(self, net, name, n):
        self.net, self.ns = net, f"mg{net.tag}{name}"
        self.ip, self.ip6 = net.ip(n), net.ip6(n)
        self.procs = []
        sh("ip", "netns", "add", self.ns)
        hosts = Path("/etc/netns") / self.ns
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(f"127.0.0.1 localhost\n{net.ip(3)} orders\n")
        outside, inside = f"mgv{net.tag}{name[0]}", f"mgp{net.tag}{name[0]}"
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", self.ns)
        sh("ip", "link", "set", outside, "master", net.bridge, "up")
        self.exec("ip", "addr", "add", f"{self.ip}/24", "dev", inside)
        self.exec("ip", "addr", "add", f"{self.ip6}/64", "dev", inside, "nodad")
        self.exec("ip", "link", "set", inside, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *args, check=True):
        return sh("ip", "netns", "exec", self.ns, *args, check=check)

    def start(self, args, log, env=None):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *args],
                             stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        self.procs.append(p)
        return p

    def wait_listening(self, port, timeout=10.0, loopback="127.0.0.1"):
        """Until something in the namespace listens on `port` (over loopback, which
        the rules leave alone)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            probe = self.exec("bash", "-c", f"exec 3<>/dev/tcp/{loopback}/{port}", check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on {self.ns} port {port}")

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        sh("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(Path("/etc/netns") / self.ns, ignore_errors=True)


class Net:
    """A bridge in the root namespace with a random 10.x.y.0/24 and fdXX:X:X::/64,
    and the hosts on it."""

    def __init__(self, tmp_path):
        self.tag = "%04x" % random.randrange(1 << 16)
        self.prefix = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        # Written as the proxy prints addresses (no leading zeros in a group), so that
        # the tests can compare them as strings.
        self.prefix6 = f"fd{random.randrange(256):02x}:{random.randrange(1 << 16):x}:{int(self.tag, 16):x}"
        self.bridge = f"mgbr{self.tag}"
        self.tmp_path = tmp_path
        # The sidecars run as PROXY_UID: their cache and state go where it can write.
        self.shared = Path(tempfile.mkdtemp(prefix="meshgate-netns-"))
        os.chmod(self.shared, 0o777)
        self.hosts = []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.ip(1)}/24", "dev", self.bridge)
        sh("ip", "addr", "add", f"{self.ip6(1)}/64", "dev", self.bridge, "nodad")
        sh("ip", "link", "set", self.bridge, "up")
        self.control = Control(tmp_path, host=self.ip(1)).start()

    def ip(self, n):
        return f"{self.prefix}.{n}"

    def ip6(self, n):
        return f"{self.prefix6}::{n}"

    def host(self, name, n):
        h = Host(self, name, n)
        self.hosts.append(h)
        return h

    def stop(self):
        for h in self.hosts:
            h.stop()
        self.control.stop()
        sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.shared, ignore_errors=True)


def mesh_host(net, service, n, extra=()):
    """A namespace with the interception rules, the app on :8080 and its sidecar
    (running as PROXY_UID) with inbound :15006, outbound :15001, admin :15000."""
    h = net.host(service, n)
    r = h.exec(BIN, "mesh", "iptables", "--proxy-uid", str(PROXY_UID),
               "--exclude-inbound-ports", "15000", "--apply")
    assert r.returncode == 0, r.stderr
    h.start(["python3", APP, "http", f"{service}-1", "0.0.0.0:8080"],
            net.tmp_path / f"app-{service}.log")
    h.wait_listening(8080)
    state = net.shared / service
    h.sidecar_log = net.tmp_path / f"sidecar-{service}.log"
    h.sidecar = h.start(
        ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
         BIN, "proxy", "--role", "sidecar", "--control", net.control.url,
         "--node", f"{service}-1", "--service", service, "--app", "127.0.0.1:8080",
         "--inbound", "0.0.0.0:15006,[::]:15006", "--advertise", f"{h.ip}:15006",
         "--outbound", "127.0.0.1:15001,[::1]:15001", "--admin", "0.0.0.0:15000",
         "--lease", "2s",
         "--cache-dir", str(state / "cache"), "--state-dir", str(state / "state"), *extra],
        h.sidecar_log, env=node_env(TOKEN))

    def ready():
        with urllib.request.urlopen(f"http://{h.ip}:15000/ready", timeout=2) as r:
            return r.status == 200

    wait_ready(h.sidecar, ready, f"sidecar {service}", h.sidecar_log.read_text)
    return h


def metrics(h):
    with urllib.request.urlopen(f"http://{h.ip}:15000/metrics", timeout=5) as r:
        return r.read().decode()


def ask(h, path, **query):
    """GET http://HOST:8080/PATH?QUERY from the root namespace, as JSON."""
    q = f"?{urllib.parse.urlencode(query)}" if query else ""
    status, _, body, code = curl(f"http://{h.ip}:8080{path}{q}")
    assert (status, code) == (200, 0), body
    return json.loads(body)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Net(tmp_path_factory.mktemp("netns"))
    try:
        f = n.tmp_path / "services.yaml"
        f.write_text(SERVICES)
        code, _, err = n.control.ctl("apply", "-f", str(f))
        assert code == 0, err
        n.front = mesh_host(n, "front", 2, ("--tcp-idle-timeout", "1s"))
        n.orders = mesh_host(n, "orders", 3)
        n.ext = n.host("ext", 4)
        n.ext.start(["python3", APP, "http", "ext", "0.0.0.0:8080"], n.tmp_path / "ext-http.log")
        n.ext.start(["python3", APP, "echo", "0.0.0.0:7000"], n.tmp_path / "ext-echo.log")
        n.ext.start(["python3", APP, "echo", "0.0.0.0:7001", "220 ext ready"],
                    n.tmp_path / "ext-banner.log")
        n.ext.start(["python3", APP, "http", "ext6", "[::]:8081"], n.tmp_path / "ext-http6.log")
        n.ext.start(["python3", APP, "echo", "[::]:7002"], n.tmp_path / "ext-echo6.log")
        for port in (8080, 7000, 7001):
            n.ext.wait_listening(port)
        for port in (8081, 7002):
            n.ext.wait_listening(port, loopback="::1")
        deadline = time.time() + 10
        while time.time() < deadline:
            status, body = n.control.call("GET", "/api/v1/registry")
            if {i["service"] for i in body["items"]} == {"front", "orders"}:
                break
            time.sleep(0.05)
        yield n
    finally:
        n.stop()


def test_an_unmodified_app_calls_a_service_by_name_through_both_sidecars_over_mtls(net):
    got = ask(net.front, "/fetch?url=http://orders:8080/orders/7")
    assert got.get("status") == 200, got
    seen = json.loads(got["body"])
    assert seen["backend"] == "orders-1" and seen["path"] == "/orders/7"
    # The orders app was reached by its own sidecar (from loopback) after a mesh
    # mTLS handshake in which front's sidecar proved front's identity.
    assert seen["headers"]["x-forwarded-client-cert"] == "URI=spiffe://cluster.local/svc/front"
    assert seen["client"] == "127.0.0.1"
    assert seen["headers"]["host"] == "orders:8080"
    m = metrics(net.front)
    assert metric_sum(m, "meshgate_requests_total", api="meshgate.outbound.orders") >= 1, m


def test_inbound_traffic_to_the_app_port_goes_through_the_sidecar(net):
    # The test calls front's app port from outside: the rules hand the connection
    # to front's inbound listener, which passes it to the app.
    seen = ask(net.front, "/hello")
    assert seen["backend"] == "front-1" and seen["client"] == "127.0.0.1", seen
    assert seen["headers"]["x-forwarded-for"] == net.ip(1)
    assert "x-request-id" in seen["headers"]
    # orders takes only mesh mTLS: plaintext to its app port never reaches the app.
    before = metric_sum(metrics(net.orders), "meshgate_downstream_tls_handshake_failures_total")
    status, _, _, code = curl(f"http://{net.orders.ip}:8080/orders/1")
    assert status == 0 and code != 0, (status, code)
    after = metric_sum(metrics(net.orders), "meshgate_downstream_tls_handshake_failures_total")
    assert after == before + 1


def test_http_to_a_host_outside_the_mesh_passes_through_to_its_original_destination(net):
    got = ask(net.front, f"/fetch?url=http://{net.ext.ip}:8080/hello")
    assert got.get("status") == 200, got
    seen = json.loads(got["body"])
    assert seen["backend"] == "ext" and seen["path"] == "/hello"
    # Sent on by front's sidecar (it added a request id), from front's address.
    assert seen["client"] == net.front.ip
    assert "x-request-id" in seen["headers"]
    assert seen["headers"]["host"] == f"{net.ext.ip}:8080"
    m = metrics(net.front)
    assert metric_sum(m, "meshgate_requests_total", api="meshgate.outbound.passthrough") >= 1, m


def test_other_protocols_are_relayed_as_bytes(net):
    before = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_connections_total")
    data = bytes(range(256)).hex()
    got = ask(net.front, f"/tcp?to={net.ext.ip}:7000&send={data}")
    assert got.get("echo") == data, got
    # The server speaks first: the sidecar waits for the client's first bytes,
    # then relays, so the banner still arrives.
    got = ask(net.front, f"/tcp?to={net.ext.ip}:7001&send={b'HELO x'.hex()}&banner=1")
    assert got.get("banner") == "220 ext ready\r\n" and got.get("echo") == b"HELO x".hex(), got
    after = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_connections_total")
    assert after == before + 2


def test_a_relayed_connection_idle_for_its_timeout_is_closed_and_a_busy_one_is_not(net):
    # front's sidecar runs with --tcp-idle-timeout 1s.
    before = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_idle_timeouts_total")
    data = b"ping".hex()
    got = ask(net.front, f"/tcp?to={net.ext.ip}:7000&send={data}&hold=4")
    assert got.get("echo") == data, got
    assert got["closedAfter"] is not None and 0.8 <= got["closedAfter"] <= 2.0, got
    # A byte each way every 0.3 s keeps a connection open past the timeout.
    got = ask(net.front, f"/tcp?to={net.ext.ip}:7000&send={data}&hold=2.5&tick=0.3")
    assert got.get("echo") == data and got["closedAfter"] is None, got
    after = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_idle_timeouts_total")
    assert after == before + 1


def test_ipv6_traffic_is_intercepted_as_ipv4_is(net):
    # By name: the app reaches orders' IPv6 address, naming the Service in Host; the
    # rules send it to the sidecar's [::1]:15001, which calls orders over mesh mTLS.
    got = ask(net.front, "/fetch", url=f"http://[{net.orders.ip6}]:8080/orders/6",
              host="orders:8080")
    assert got.get("status") == 200, got
    seen = json.loads(got["body"])
    assert seen["backend"] == "orders-1" and seen["path"] == "/orders/6", seen
    assert seen["headers"]["x-forwarded-client-cert"] == "URI=spiffe://cluster.local/svc/front"
    # Any other host: HTTP on to its original IPv6 destination.
    got = ask(net.front, "/fetch", url=f"http://[{net.ext.ip6}]:8081/hello")
    assert got.get("status") == 200, got
    seen = json.loads(got["body"])
    assert seen["backend"] == "ext6" and seen["client"] == net.front.ip6, seen
    assert "x-request-id" in seen["headers"], "sent on by front's sidecar"
    # Other protocols: relayed as bytes.
    before = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_connections_total")
    data = bytes(range(64)).hex()
    got = ask(net.front, "/tcp", to=f"[{net.ext.ip6}]:7002", send=data)
    assert got.get("echo") == data, got
    after = metric_sum(metrics(net.front), "meshgate_outbound_tcp_passthrough_connections_total")
    assert after == before + 1
    # Inbound: the app port over IPv6 goes through the sidecar's [::]:15006.
    status, _, body, code = curl("-g", f"http://[{net.front.ip6}]:8080/hello")
    assert (status, code) == (200, 0), body
    seen = json.loads(body)
    assert seen["backend"] == "front-1" and seen["client"] == "127.0.0.1", seen
    assert seen["headers"]["x-forwarded-for"] == net.ip6(1)
    # orders takes only mesh mTLS, over IPv6 as over IPv4.
    status, _, _, code = curl("-g", f"http://[{net.orders.ip6}]:8080/orders/1")
    assert status == 0 and code != 0, (status, code)


def test_the_rules_are_removed_on_request(net):
    h = net.host("spare", 5)
    apply = h.exec(BIN, "mesh", "iptables", "--proxy-gid", "1337", "--inbound-ports", "8080",
                   "--apply")
    assert apply.returncode == 0, apply.stderr
    for tool in ("iptables", "ip6tables"):
        listed = h.exec(tool, "-t", "nat", "-S").stdout
        assert "-A OUTPUT -p tcp -j MESHGATE_OUTPUT" in listed, (tool, listed)
        assert "--dport 8080 -j MESHGATE_IN_REDIRECT" in listed, (tool, listed)
    # Applying again replaces, never doubles.
    h.exec(BIN, "mesh", "iptables", "--proxy-gid", "1337", "--apply")
    for tool in ("iptables", "ip6tables"):
        assert h.exec(tool, "-t", "nat", "-S").stdout.count("-j MESHGATE_OUTPUT") == 1
    assert h.exec(BIN, "mesh", "iptables", "--remove").returncode == 0
    for tool in ("iptables", "ip6tables"):
        assert "MESHGATE" not in h.exec(tool, "-t", "nat", "-S").stdout
    # One family only: the other's tables are left alone.
    h.exec(BIN, "mesh", "iptables", "--proxy-gid", "1337", "--ip-family", "ipv4", "--apply")
    assert "MESHGATE" in h.exec("iptables", "-t", "nat", "-S").stdout
    assert "MESHGATE" not in h.exec("ip6tables", "-t", "nat", "-S").stdout
    h.exec(BIN, "mesh", "iptables", "--remove")
    assert "MESHGATE" not in h.exec("iptables", "-t", "nat", "-S").stdout
    # Without a uid or gid to spare, nothing is printed or installed: usage error.
    r = subprocess.run([BIN, "mesh", "iptables"], capture_output=True, text=True)
    assert r.returncode == 2 and "--proxy-uid" in r.stderr
