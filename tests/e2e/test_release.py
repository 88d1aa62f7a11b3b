"""Grey release end to end, as an API owner drives it with `meshgate ctl release`
against a real control plane that pushes to three real proxies — a1 (zone=a), b1 and
b2 (zone=b) — in front of two real HTTP backends: the current revision of Api
`get-user` calls Service users-v1, the new one users-v2.

- placed by labels, the new revision runs on a1 only; rolled back, it is gone;
- a 10% split by a header key sends 10% ± 3% of 2,000 users to the new revision,
  each user on the same side whichever proxy answers; promoted, it is everyone's;
- a header match sends only matching requests; mistakes are refused with reasons.
"""

import http.client
import json
import subprocess
import time

import pytest

from harness import BIN, Backend, Control, Proxy, free_port, service, proxy_gateway

NODES = {"a1": "zone=a", "b1": "zone=b", "b2": "zone=b"}


gateway = proxy_gateway


def get_user(svc, path="/users/{id}", filters=""):
    return f"""apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: get-user}}
spec:
  request: {{path: "{path}", methods: [GET]}}
  invoke: {{service: {svc}}}
{filters}"""


KEY_AUTH = "  filters:\n    - {name: key-auth, config: {header: x-api-key}}\n"


def consumers(n, beta):
    """Consumers c0..c{n-1} with keys key-0..; the first `beta` are labelled tier=beta."""
    return "".join(f"""---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: c{i}}}
spec:
  labels: {{tier: {"beta" if i < beta else "ga"}}}
  credentials: [{{type: key, key: key-{i}}}]
""" for i in range(n))


class World:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.v1, self.v2 = Backend("v1"), Backend("v2")
        self.control = Control(tmp_path).start()
        self.proxies = {}
        docs = []
        for name, labels in NODES.items():
            port, admin = free_port(), free_port()
            docs.append(gateway(name, port, admin))
            self.proxies[name] = Proxy(tmp_path, self.control.url, name, name, port, admin, labels)
        docs.append(service("users-v1", self.v1).lstrip("-\n"))
        docs.append(service("users-v2", self.v2).lstrip("-\n"))
        docs.append(get_user("users-v1"))
        f = tmp_path / "all.yaml"
        f.write_text("---\n".join(docs))
        self.ctl_ok("apply", "-f", str(f))
        for p in self.proxies.values():
            p.start()
        self.new = tmp_path / "get-user-v2.yaml"
        self.new.write_text(get_user("users-v2"))
        self.conns = {}
        self.wait_acked(self.control.call("GET", "/api/v1/revision")[1]["revision"])

    def ctl_ok(self, *args):
        code, out, err = self.control.ctl(*args)
        assert code == 0, err
        return out

    def ctl_release(self, *args):
        """`ctl release ARGS`; the revision it wrote."""
        out = self.ctl_ok("release", *args)
        assert out.startswith("revision "), out
        return int(out.split()[1].rstrip(":"))

    def wait_acked(self, rev, timeout=10.0):
        """Every proxy has applied revision `rev`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, body = self.control.call("GET", "/api/v1/nodes")
            got = {n["name"]: n["revision"] for n in body["items"] if n["connected"]}
            if set(got) == set(NODES) and all(r >= rev for r in got.values()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"proxies never applied revision {rev}: {body}")

    def side(self, node, headers=None):
        """Which backend answered GET /users/7 through proxy `node`: v1 or v2."""
        conn = self.conns.get(node)
        if conn is None:
            conn = self.conns[node] = http.client.HTTPConnection(
                "127.0.0.1", self.proxies[node].port, timeout=5)
        conn.request("GET", "/users/7", headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, (node, r.status, body)
        return json.loads(body)["backend"]

    def wait_side(self, node, want, headers=None, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.side(node, headers) == want:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{node} never answered from {want}")

    def stop(self):
        for c in self.conns.values():
            c.close()
        for p in self.proxies.values():
            p.stop()
        self.control.stop()
        self.v1.stop()
        self.v2.stop()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.stop()


def test_a_release_placed_by_labels_runs_only_on_matching_proxies(world):
    rev = world.ctl_release("start", "-f", str(world.new), "--nodes", "zone=a", "-m", "try v2 in zone a")
    world.wait_acked(rev)
    for _ in range(20):
        assert world.side("a1") == "v2"
        assert world.side("b1") == "v1" and world.side("b2") == "v1"

    # Status: where it is placed and that it runs there.
    _, body = world.control.call("GET", "/api/v1/releases/get-user-canary")
    runs = {n["node"]: (n["runs"], n["share"]) for n in body["nodes"]}
    assert runs == {"a1": ("release", "100%"), "b1": ("current", "0%"), "b2": ("current", "0%")}
    assert body["of"] == "get-user" and body["rule"] == {"of": "get-user", "nodes": {"zone": "a"}}
    out = world.ctl_ok("release", "status")
    row = next(l.split() for l in out.splitlines() if l.startswith("get-user-canary"))
    assert row == ["get-user-canary", "get-user", str(rev), "zone=a", "100%", "1/1", "a1"], out
    _, out, _ = world.control.ctl("history", "api", "get-user-canary")
    assert "try v2 in zone a" in out

    # Rolled back: the current revision everywhere, and the release is gone.
    rev = world.ctl_release("rollback", "get-user-canary")
    world.wait_acked(rev)
    for node in NODES:
        assert world.side(node) == "v1"
    assert "get-user-canary" not in world.ctl_ok("get", "apis")
    assert world.control.call("GET", "/api/v1/releases")[1]["items"] == []


def test_a_ten_percent_split_is_sticky_per_user_and_promotes(world):
    rev = world.ctl_release("start", "-f", str(world.new), "--percent", "10", "--by", "header:x-user")
    world.wait_acked(rev)
    nodes = list(NODES)
    first = {}
    for i in range(2000):
        user = f"user-{i}"
        first[user] = world.side(nodes[i % 3], {"x-user": user})
    share = sum(1 for s in first.values() if s == "v2")
    assert 140 <= share <= 260, f"{share} of 2000 users on the release"
    # Sticky: each user gets the same side again, from another proxy.
    for i, (user, seen) in enumerate(first.items()):
        assert world.side(nodes[(i + 1) % 3], {"x-user": user}) == seen, user
    # A request without the key stays on the current revision.
    assert {world.side(n) for n in nodes for _ in range(10)} == {"v1"}
    _, body = world.control.call("GET", "/api/v1/releases/get-user-canary")
    assert body["share"] == "10%" and body["nodesApplied"] == 3
    assert {n["runs"] for n in body["nodes"]} == {"release"}

    # Promoted: get-user is the new revision, for every user, and the release is gone,
    # in one revision.
    rev = world.ctl_release("promote", "get-user-canary")
    world.wait_acked(rev)
    for i in range(0, 2000, 40):
        assert world.side(nodes[i % 3], {"x-user": f"user-{i}"}) == "v2"
    api = json.loads(world.ctl_ok("get", "api", "get-user", "-o", "json"))["resource"]
    assert api["spec"]["invoke"] == {"service": "users-v2"} and "release" not in api["spec"]
    assert "get-user-canary" not in world.ctl_ok("get", "apis")
    _, history = world.control.call("GET", "/api/v1/history")
    top = history["items"][0]
    assert top["revision"] == rev and "promote release get-user-canary" in top["message"]
    assert sorted((c["op"], c["key"]) for c in top["changes"]) == [
        ("delete", "Api/get-user-canary"), ("put", "Api/get-user")]


def test_a_header_match_release_and_mistakes_refused(world, tmp_path):
    # A traffic split is reached through the Api's own route: it cannot move it.
    moved = tmp_path / "moved.yaml"
    moved.write_text(get_user("users-v2", path="/people/{id}"))
    code, _, err = world.control.ctl("release", "start", "-f", str(moved), "--percent", "5")
    assert code == 1 and "spec.request: a release that splits traffic is reached through the route" in err, err
    # Bad rules, and an Api that does not exist.
    code, _, err = world.control.ctl("release", "start", "-f", str(world.new),
                                     "--percent", "150", "--by", "body:x")
    assert code == 1 and "spec.release.percent: 150 is not a percentage" in err, err
    assert "spec.release.by:" in err
    ghost = tmp_path / "ghost.yaml"
    ghost.write_text(get_user("users-v2").replace("name: get-user", "name: ghost"))
    code, _, err = world.control.ctl("release", "start", "-f", str(ghost))
    assert code == 1 and "Api/ghost does not exist" in err, err
    code, _, err = world.control.ctl("release", "promote", "get-user")
    assert code == 1 and "Api/get-user is not a release" in err, err
    assert world.control.call("GET", "/api/v1/releases")[1]["items"] == []

    rev = world.ctl_release("start", "-f", str(world.new), "--header", "x-canary=^true$")
    world.wait_acked(rev)
    for node in NODES:
        assert world.side(node, {"x-canary": "true"}) == "v2"
        assert world.side(node, {"x-canary": "false"}) == "v1"
        assert world.side(node) == "v1"
    # One release per Api at a time.
    code, _, err = world.control.ctl("release", "start", "-f", str(world.new), "--name", "other",
                                     "--percent", "5")
    assert code == 1 and 'Api "get-user" already has a release, "get-user-canary"' in err, err

    rev = world.ctl_release("rollback", "get-user-canary")
    world.wait_acked(rev)
    for node in NODES:
        assert world.side(node, {"x-canary": "true"}) == "v1"


def test_a_release_keyed_on_consumers_chooses_after_authentication(world, tmp_path):
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(get_user("users-v1", filters=KEY_AUTH) + consumers(200, beta=5))
    world.ctl_ok("apply", "-f", str(keyed))
    # The new revision authenticates the same way first, then adds its own answer header.
    new = tmp_path / "keyed-v2.yaml"
    new.write_text(get_user("users-v2", filters=KEY_AUTH
                            + "  response: {headers: {set: {x-revision: v2}}}\n"))
    rev = world.ctl_release("start", "-f", str(new), "--consumers", "tier=beta")
    world.wait_acked(rev)
    for node in NODES:
        for i in range(10):
            want = "v2" if i < 5 else "v1"
            assert world.side(node, {"x-api-key": f"key-{i}"}) == want, (node, i)
    # The release's own filters run: its answer header; the shared key-auth still
    # refuses a caller without a key, on the current revision's terms.
    conn = http.client.HTTPConnection("127.0.0.1", world.proxies["a1"].port, timeout=5)
    conn.request("GET", "/users/7", headers={"x-api-key": "key-0"})
    r = conn.getresponse()
    r.read()
    assert r.getheader("x-revision") == "v2"
    conn.request("GET", "/users/7")
    r = conn.getresponse()
    assert r.status == 401 and r.getheader("x-revision") is None, r.status
    r.read()
    conn.close()
    _, body = world.control.call("GET", "/api/v1/releases/get-user-canary")
    assert body["share"] == "requests from Consumers labelled tier=beta", body

    # A share of Consumers by name: sticky per Consumer, whichever proxy answers.
    rev = world.ctl_release("rollback", "get-user-canary")
    rev = world.ctl_release("start", "-f", str(new), "--percent", "30", "--by", "consumer")
    world.wait_acked(rev)
    nodes = list(NODES)
    seen = {i: world.side(nodes[i % 3], {"x-api-key": f"key-{i}"}) for i in range(200)}
    share = sum(1 for s in seen.values() if s == "v2")
    assert 44 <= share <= 76, f"{share} of 200 Consumers on the release"
    for i, side in seen.items():
        assert world.side(nodes[(i + 1) % 3], {"x-api-key": f"key-{i}"}) == side, i

    # A release that does not start with the same authentication cannot key on it.
    plain = tmp_path / "plain-v2.yaml"
    plain.write_text(get_user("users-v2"))
    code, _, err = world.control.ctl("release", "start", "-f", str(plain),
                                     "--consumers", "tier=beta", "--dry-run")
    assert code == 1, err
    assert "a release keyed on the Consumer is chosen once the caller is identified" in err, err


def test_a_failing_release_is_rolled_back_on_its_own(world):
    rev = world.ctl_release("start", "-f", str(world.new), "--percent", "50", "--by", "header:x-user",
                            "--rollback-above", "20", "--window", "10s", "--min-requests", "20")
    world.wait_acked(rev)
    nodes = list(NODES)

    def answers(n):
        """n requests over the proxies, by user; the statuses of those the release served."""
        statuses = []
        for i in range(n):
            conn = http.client.HTTPConnection("127.0.0.1", world.proxies[nodes[i % 3]].port, timeout=5)
            conn.request("GET", "/users/7", headers={"x-user": f"user-{i}"})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            if json.loads(body).get("backend") == "v2":
                statuses.append(r.status)
        return statuses

    def observed():
        return world.control.call("GET", "/api/v1/releases/get-user-canary")[1].get("observed")

    # Healthy, it stays: the proxies report its answers and the guard sees no 5xx.
    assert set(answers(120)) == {200}
    deadline = time.time() + 10
    while (observed() or {}).get("requests", 0) < 40 and time.time() < deadline:
        time.sleep(0.2)
    seen = observed()
    assert seen["window"] == "10s" and seen["requests"] >= 40 and seen["errors"] == 0, seen
    time.sleep(2)
    assert [r["name"] for r in world.control.call("GET", "/api/v1/releases")[1]["items"]] == ["get-user-canary"]

    # The new revision's backend fails: within seconds, the release is rolled back.
    world.v2.mode = "fail"
    assert set(answers(60)) == {500}
    deadline = time.time() + 15
    while world.control.call("GET", "/api/v1/releases")[1]["items"] and time.time() < deadline:
        answers(6)
        time.sleep(0.2)
    assert world.control.call("GET", "/api/v1/releases")[1]["items"] == [], "never rolled back"
    _, history = world.control.call("GET", "/api/v1/history")
    top = history["items"][0]
    assert top["author"] == "meshgate (automatic rollback)", top
    assert top["message"].startswith("automatic rollback: ") and "were 5xx in the last 10s, above 20%" in top["message"], top
    assert [(c["op"], c["key"]) for c in top["changes"]] == [("delete", "Api/get-user-canary")]
    world.wait_acked(top["revision"])
    for i in range(30):
        assert world.side(nodes[i % 3], {"x-user": f"user-{i}"}) == "v1"


def test_a_release_written_by_hand_is_checked_with_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(gateway("edge", 8080, 9901) + "---\n" + get_user("users") + """---
apiVersion: meshgate.io/v1
kind: Service
metadata: {name: users}
spec:
  endpoints: [{address: "127.0.0.1:9"}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: self-made}
spec:
  release: {of: self-made, by: "header:x-user"}
  request: {path: "/self", methods: [GET]}
  invoke: {service: users}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: drafted}
spec:
  release: {of: get-user, nodes: {zone: a}}
  request: {path: "/users/{id}", methods: [GET]}
  invoke: {service: users}
  lifecycle: {stage: draft}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: guarded}
spec:
  release:
    of: get-user
    percent: 5
    rollback: {errorPercent: 0, window: 2h, minRequests: 0}
  request: {path: "/users/{id}", methods: [GET]}
  invoke: {service: users}
""")
    p = subprocess.run([BIN, "validate", "-c", str(f)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    out = p.stdout
    assert "Api/self-made: spec.release.by: by chooses who falls in the percent: give percent too" in out, out
    assert "Api/drafted: spec.lifecycle.stage: a release serves traffic: it cannot be a draft" in out, out
    assert "Api/guarded: spec.release.rollback.errorPercent: 0 is not a percentage above 0" in out, out
    assert "Api/guarded: spec.release.rollback.window: use 1s to 1h" in out, out
    assert "Api/guarded: spec.release.rollback.minRequests: use at least 1" in out, out
    assert all(l.startswith(f"{f}:") for l in out.splitlines() if "Api/" in l), out
