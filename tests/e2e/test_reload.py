"""Hot reload: atomic swaps under load with zero failed requests; bad configs are
rejected, reported and counted while the old config keeps serving."""

import json
import signal
import threading
import time
import urllib.request

from harness import Gateway, api, service


def resources(backend, tag):
    return service("up", backend) + api(
        "x", "/x", "{service: up}",
        extra=f"\n  response:\n    headers: {{set: {{x-tag: \"{tag}\"}}}}",
    ) + api("m", "/m", f"{{mock: {{body: \"{tag}\"}}}}")


class Load:
    """Keep-alive clients hammering the gateway until stopped; count failures."""

    def __init__(self, url, threads=4):
        self.url = url
        self.stop_flag = threading.Event()
        self.ok = 0
        self.failed = []
        self.tags = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self):
        import http.client
        host, port = self.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        while not self.stop_flag.is_set():
            for path in ("/x", "/m"):
                try:
                    conn.request("GET", path)
                    r = conn.getresponse()
                    body = r.read()
                    with self.lock:
                        if r.status == 200:
                            self.ok += 1
                            self.tags.add(r.getheader("x-tag") or body.decode())
                        else:
                            self.failed.append((path, r.status, body[:200]))
                except Exception as e:  # a dropped connection is a failure too
                    with self.lock:
                        self.failed.append((path, "exception", repr(e)))
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=5)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a):
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def wait_revision_change(g, old, timeout=5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rev = json.loads(g.admin("GET", "/config")[1])["revision"]
        if rev != old:
            return rev
        time.sleep(0.05)
    raise AssertionError("revision did not change")


def revision(g):
    return json.loads(g.admin("GET", "/config")[1])["revision"]


def test_reload_under_load_has_zero_failures(tmp_path, backend, gateways):
    g = Gateway(tmp_path, resources(backend, "v0"))
    gateways.append(g)
    with Load(g.url) as load:
        time.sleep(0.3)
        rev = revision(g)
        for i in range(1, 7):
            g.write(resources(backend, f"v{i}"))
            how = i % 3
            if how == 0:
                pass  # the file watcher picks it up
            elif how == 1:
                g.proc.send_signal(signal.SIGHUP)
            else:
                status, body = g.admin("POST", "/reload")
                assert status == 200, body
            rev = wait_revision_change(g, rev)
            time.sleep(0.3)
    assert load.failed == [], load.failed[:5]
    assert load.ok > 200
    assert "v6" in load.tags and len(load.tags) >= 4
    _, metrics = g.admin("GET", "/metrics")
    accepted = [l for l in metrics.splitlines() if l.startswith('meshgate_config_reloads_total{result="accepted"}')]
    assert accepted and float(accepted[0].split()[-1]) >= 7


def test_bad_reload_keeps_old_config(tmp_path, backend, gateways):
    g = Gateway(tmp_path, resources(backend, "good"))
    gateways.append(g)
    rev = revision(g)
    with Load(g.url, threads=2) as load:
        g.write(resources(backend, "bad") + api("broken", "/b", "{service: nowhere}"))
        status, body = g.admin("POST", "/reload")
        time.sleep(0.5)
    assert status == 400
    diags = json.loads(body)["error"]["diagnostics"]
    assert any('10-resources.yaml' in d and 'Api/broken: spec.invoke.service: unknown Service "nowhere"' in d for d in diags), diags
    assert load.failed == []
    assert load.tags == {"good"}, "the old config keeps serving"
    cfg = json.loads(g.admin("GET", "/config")[1])
    assert cfg["revision"] == rev
    assert cfg["lastReload"]["ok"] is False and cfg["lastReload"]["errors"]
    _, metrics = g.admin("GET", "/metrics")
    assert 'meshgate_config_reloads_total{result="rejected"}' in metrics
    # fixing the file recovers by itself (file watch)
    g.write(resources(backend, "fixed"))
    wait_revision_change(g, rev)
    with urllib.request.urlopen(g.url + "/m") as r:
        assert r.read() == b"fixed"


def test_listener_added_by_reload(tmp_path, backend, gateways):
    from harness import free_port, gateway_yaml
    g = Gateway(tmp_path, resources(backend, "a"))
    gateways.append(g)
    extra = free_port()
    gw = gateway_yaml(g.port, g.admin_port, f'\n    - {{name: extra, address: "127.0.0.1:{extra}", protocol: http}}')
    (g.dir / "00-gateway.yaml").write_text(gw)
    status, body = g.admin("POST", "/reload")
    assert status == 200, body
    with urllib.request.urlopen(f"http://127.0.0.1:{extra}/m") as r:
        assert r.read() == b"a"


def test_reload_removes_listener_and_its_connections_and_moves_admin(tmp_path, backend, gateways):
    import socket
    from harness import free_port, gateway_yaml
    g = Gateway(tmp_path, resources(backend, "a"))
    gateways.append(g)
    extra = free_port()
    (g.dir / "00-gateway.yaml").write_text(
        gateway_yaml(g.port, g.admin_port, f'\n    - {{name: extra, address: "127.0.0.1:{extra}", protocol: http}}'))
    assert g.admin("POST", "/reload")[0] == 200
    # a keep-alive connection on the extra listener
    s = socket.create_connection(("127.0.0.1", extra), timeout=5)
    s.sendall(b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    # remove the extra listener and move the admin listener in one reload
    new_admin = free_port()
    (g.dir / "00-gateway.yaml").write_text(gateway_yaml(g.port, new_admin))
    assert g.admin("POST", "/reload")[0] == 200
    # the idle connection on the removed listener is closed, new ones are refused
    s.settimeout(3)
    assert s.recv(100) == b""
    s.close()
    try:
        socket.create_connection(("127.0.0.1", extra), timeout=1).close()
        assert False, "the removed listener still accepts"
    except OSError:
        pass
    old_admin = g.admin_port
    g.admin_port = new_admin
    assert g.admin("GET", "/ready") == (200, "ready\n")
    try:
        socket.create_connection(("127.0.0.1", old_admin), timeout=1).close()
        assert False, "the old admin address still accepts"
    except OSError:
        pass
    with urllib.request.urlopen(g.url + "/m") as r:
        assert r.read() == b"a"


def test_file_watch_reloads_for_the_config_file_only(tmp_path, backend, gateways):
    """`-c FILE` watches FILE's directory; other files changing there do not reload."""
    g = Gateway(tmp_path, resources(backend, "one"), start=False)
    single = g.dir / "all.yaml"
    parts = [g.dir / "00-gateway.yaml", g.dir / "10-resources.yaml"]
    single.write_text("".join(p.read_text() for p in parts))
    for p in parts:
        p.unlink()
    g.config_arg = single
    g.start()
    gateways.append(g)
    rev = revision(g)
    for i in range(5):
        (g.dir / "neighbour.log").write_text(f"line {i}\n")
        time.sleep(0.1)
    time.sleep(0.5)
    assert revision(g) == rev, "a neighbouring file must not cause a reload"
    single.write_text(single.read_text().replace("one", "two"))
    wait_revision_change(g, rev)
    with urllib.request.urlopen(g.url + "/m") as r:
        assert r.read() == b"two"


def test_reload_changes_a_listeners_protocol_on_the_same_address(tmp_path, backend, gateways):
    """http -> https on one address: the reload is accepted (the socket is kept, not
    bound twice), new connections get TLS, and an open plaintext connection is
    closed once its request is answered, not left serving under the old terms."""
    import socket
    import ssl
    from harness import free_port, gateway_yaml
    from test_tls_admin_lifecycle import make_cert
    g = Gateway(tmp_path, resources(backend, "a"))
    gateways.append(g)
    port = free_port()
    listener = '\n    - {{name: extra, address: "127.0.0.1:{port}", protocol: {proto}{tls}}}'
    (g.dir / "00-gateway.yaml").write_text(
        gateway_yaml(g.port, g.admin_port, listener.format(port=port, proto="http", tls="")))
    assert g.admin("POST", "/reload")[0] == 200
    plain = socket.create_connection(("127.0.0.1", port), timeout=5)
    plain.sendall(b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n")
    assert plain.recv(65536).startswith(b"HTTP/1.1 200")

    key, crt = make_cert(tmp_path, "a.test")
    https = listener.format(port=port, proto="https",
                            tls=f', tls: {{certificates: [{{certFile: "{crt}", keyFile: "{key}"}}]}}')
    (g.dir / "00-gateway.yaml").write_text(gateway_yaml(g.port, g.admin_port, https))
    status, body = g.admin("POST", "/reload")
    assert status == 200, body
    assert "cannot listen" not in g.logs()

    ctx = ssl.create_default_context(cafile=str(crt))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.test") as s:
            s.sendall(b"GET /m HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
    # The plaintext connection opened before the change is closed, not served.
    plain.settimeout(5)
    assert plain.recv(100) == b""
    plain.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n")
        s.settimeout(5)
        try:
            answer = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            answer = b""
        assert not answer.startswith(b"HTTP/1.1 200"), answer
