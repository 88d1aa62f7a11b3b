"""Test harness: the real meshgate binary and real peers on loopback ports chosen
at run time. Every process a test starts is stopped by its own PID."""

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("MESHGATE_BIN", str(ROOT / "target" / "debug" / "meshgate"))


_handed_out = set()


def free_port():
    """A port free now and not handed out before in this run (the kernel may offer a
    just-released port again before the test has bound the first one)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_ready(proc, probe, what, logs=lambda: "", timeout=15.0):
    """Wait until `probe()` is true (OSError counts as not yet), failing at once if
    `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {logs()}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready: {logs()}")


def terminate(proc):
    """SIGTERM a process this test started, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open")


# ---------------------------------------------------------------- HTTP backend


class Backend:
    """A real HTTP/1.1 server with behaviours chosen by path:
    /slow?ms=N  /status/NNN  /reset  /flaky (503 once per key, then 200)
    anything else: echo the request as JSON. Records every request it sees. A query
    parameter `h-NAME=VALUE` adds a response header.

    On command, for every path: `mode = "fail"` answers 500, `"hang"` holds each
    request unanswered (until the mode changes), `"reset"` resets the connection
    without an answer; `refuse()` closes the listening socket so connects are refused,
    and `heal()` undoes any of these.

    As a mesh app (`outbound` set to its sidecar's outbound port), `/call/SERVICE/REST`
    calls `http://SERVICE/REST` through the sidecar, passing on the trace context
    (`traceparent`, `tracestate`, `baggage`) as an instrumented app does, and answers
    with its own record plus the callee's answer under `called`."""

    PROPAGATED = ("traceparent", "tracestate", "baggage")

    def __init__(self, name="backend", outbound=None):
        self.name = name
        self.outbound = outbound
        self.port = free_port()
        self.requests = []
        self.lock = threading.Lock()
        self.flaky_seen = set()
        self.mode = "ok"
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and body go out in separate writes: without TCP_NODELAY the
            # second waits for the peer's delayed ACK (40 ms) on a reused connection.
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def _body(self):
                n = int(self.headers.get("content-length") or 0)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    return data
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                if backend.mode == "hang":
                    while backend.mode == "hang":
                        time.sleep(0.02)
                    self.close_connection = True
                    return
                if backend.mode == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    return
                path, _, query = self.path.partition("?")
                rec = {
                    "backend": backend.name,
                    "method": self.command,
                    "path": path,
                    "query": query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode("latin-1"),
                    # The client's port: tells the connections apart.
                    "peer": self.client_address[1],
                }
                with backend.lock:
                    backend.requests.append(rec)
                if backend.mode == "fail":
                    return self._send(500, rec)
                if path.startswith("/slow"):
                    ms = int(dict(p.split("=") for p in query.split("&") if "=" in p).get("ms", "1000"))
                    time.sleep(ms / 1000)
                if path.startswith("/status/"):
                    return self._send(int(path.split("/")[2]), rec)
                if path.startswith("/call/") and backend.outbound:
                    service, _, rest = path[len("/call/"):].partition("/")
                    carry = {k: v for k, v in rec["headers"].items() if k in Backend.PROPAGATED}
                    status, _, answer = mesh_call(backend.outbound, service, "/" + rest, carry)
                    try:
                        rec["called"] = json.loads(answer)
                    except ValueError:
                        rec["called"] = answer
                    rec["calledStatus"] = status
                    return self._send(200 if status == 200 else 502, rec)
                if path.startswith("/flaky"):
                    key = rec["headers"].get("x-key", "")
                    with backend.lock:
                        first = key not in backend.flaky_seen
                        backend.flaky_seen.add(key)
                    return self._send(503 if first else 200, rec)
                if path.startswith("/stream"):
                    # n chunks, one every ms milliseconds: tests that bodies stream.
                    q = dict(p.split("=") for p in query.split("&") if "=" in p)
                    self.send_response(200)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for i in range(int(q.get("n", "3"))):
                        chunk = f"chunk{i}\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        time.sleep(int(q.get("ms", "300")) / 1000)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if path.startswith("/reset"):
                    self.send_response(200)
                    self.send_header("content-length", "100000")
                    self.end_headers()
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                self._send(200, rec)

            def _send(self, status, rec):
                data = json.dumps(rec).encode()
                # Query parameters `h-NAME=VALUE` become response headers (one for
                # content-type replaces the default).
                extra = [(n[2:], urllib.parse.unquote_plus(v)) for n, _, v in
                         (p.partition("=") for p in rec["query"].split("&")) if n.startswith("h-")]
                self.send_response(status)
                if not any(n.lower() == "content-type" for n, _ in extra):
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-backend", backend.name)
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            # socketserver's default backlog of 5 resets connections under the
            # concurrent load some tests make.
            request_queue_size = 128

        self.server_class, self.handler = Server, Handler
        self._serve()

    def _serve(self):
        self.server = self.server_class(("127.0.0.1", self.port), self.handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def refuse(self):
        """Close the listening socket: new connections are refused."""
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def heal(self):
        self.mode = "ok"
        if self.server is None:
            self._serve()

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def count(self):
        with self.lock:
            return len(self.requests)

    def stop(self):
        self.mode = "ok"
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def mesh_call(outbound_port, service, path, headers=None, timeout=5):
    """GET `http://SERVICE/PATH` through a sidecar's outbound port: (status,
    headers, body text), or (None, {}, error) when the connection fails."""
    req = urllib.request.Request(f"http://127.0.0.1:{outbound_port}{path}")
    req.add_header("Host", service)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()
    except OSError as e:
        return None, {}, str(e)


# ---------------------------------------------------------------- identity provider


class Idp:
    """A real HTTP identity-provider peer: serves `self.jwks` at /jwks.json (status
    `self.status`; `self.delay` seconds late) and answers RFC 7662 token introspection at
    /introspect from `self.tokens` (token -> answer dict), checking HTTP Basic client
    credentials against `self.client`. Records every request as (method, path, headers, body)."""

    def __init__(self):
        self.port = free_port()
        self.jwks = {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.tokens = {}
        self.client = ("gw", "gw-secret")
        self.hits = []
        self.lock = threading.Lock()
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with idp.lock:
                    idp.hits.append(("GET", self.path, dict(self.headers), b""))
                time.sleep(idp.delay)
                if self.path != "/jwks.json":
                    return self._reply(404, {})
                self._reply(idp.status, idp.jwks if idp.status == 200 else {"error": "down"})

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                with idp.lock:
                    idp.hits.append(("POST", self.path, dict(self.headers), body))
                time.sleep(idp.delay)
                if self.path != "/introspect":
                    return self._reply(404, {})
                if idp.status != 200:
                    return self._reply(idp.status, {"error": "down"})
                import base64
                import urllib.parse
                want = "Basic " + base64.b64encode(f"{idp.client[0]}:{idp.client[1]}".encode()).decode()
                if self.headers.get("authorization") != want:
                    return self._reply(401, {"error": "invalid_client"})
                form = urllib.parse.parse_qs(body.decode())
                token = form.get("token", [""])[0]
                self._reply(200, idp.tokens.get(token, {"active": False}))

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def count(self, path):
        with self.lock:
            return sum(1 for h in self.hits if h[1] == path)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- meshgate


def gateway_yaml(port, admin_port, extra_listener="", limits="", access_log=None):
    log = f"\n  accessLog: {{path: {access_log}}}" if access_log else ""
    return f"""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: public}}
spec:
  listeners:
    - {{name: web, address: "127.0.0.1:{port}", protocol: http}}{extra_listener}
  admin: {{address: "127.0.0.1:{admin_port}"}}
  drainTimeout: 5s{limits}{log}
"""


class Gateway:
    """A meshgate process on a config directory it owns."""

    def __init__(self, tmp_path, resources, limits="", extra_listener="", access_log=None, start=True, env=None):
        self.env = dict(os.environ, **(env or {}))
        self.dir = Path(tmp_path) / "config"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()
        self.log_path = Path(tmp_path) / "access.log"
        gw = gateway_yaml(self.port, self.admin_port, extra_listener, limits, access_log or self.log_path)
        (self.dir / "00-gateway.yaml").write_text(gw)
        self.write(resources)
        self.proc = None
        self.config_arg = self.dir
        if start:
            self.start()

    def write(self, resources, name="10-resources.yaml"):
        (self.dir / name).write_text(resources)

    def start(self):
        self.stderr = open(self.dir.parent / "meshgate.stderr", "w")
        self.state_dir = self.dir.parent / "state"
        self.proc = subprocess.Popen([BIN, "run", "-c", str(self.config_arg), "--state-dir", str(self.state_dir)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, env=self.env)
        wait_ready(self.proc, lambda: self.admin("GET", "/ready")[0] == 200, "meshgate", self.logs)

    def logs(self):
        try:
            return (self.dir.parent / "meshgate.stderr").read_text()
        except OSError:
            return ""

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def admin(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method, data=body)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def access_log(self):
        try:
            return [json.loads(l) for l in self.log_path.read_text().splitlines() if l.strip()]
        except OSError:
            return []

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None


# ---------------------------------------------------------------- clients


def wait_for(cond, what, timeout=5.0):
    """Poll `cond` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.02)


def metric_sum(text, name, **labels):
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def h2_frames_until_closed(s, timeout=8.0):
    """A raw HTTP/2 server's frames as (type, flags, stream, payload) until it closes
    the connection, answering its SETTINGS and PINGs as a client does. A timeout
    (socket.timeout) means the server kept the connection open."""
    s.settimeout(timeout)
    buf, out = b"", []
    try:
        while data := s.recv(65536):
            buf += data
            # 9-byte frame headers: length, type, flags, stream.
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                payload, buf = buf[9:9 + n], buf[9 + n:]
                out.append((kind, flags, stream, payload))
                if kind == 0x4 and not flags & 1:
                    s.sendall(b"\0\0\0\x04\x01\0\0\0\0")
                elif kind == 0x6 and not flags & 1:
                    s.sendall(b"\0\0\x08\x06\x01\0\0\0\0" + payload)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return out


def curl(*args, timeout=10):
    """Run curl; return (status, headers dict (lower-case, last wins), body, exit code)."""
    cmd = ["curl", "-sS", "-D", "-", "--max-time", str(timeout), *args]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout + 5)
    out = p.stdout
    status, headers, body = 0, {}, out
    # Skip interim (1xx) heads.
    while out.startswith(b"HTTP/"):
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
        body = rest
        out = rest if status < 200 else b""
    return status, headers, body, p.returncode


def raw(port, data, timeout=3.0):
    """Send raw bytes; return everything the server sends until it closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except socket.timeout:
                chunks.append(b"<timeout>")
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)
    finally:
        s.close()


def service(name, *backends, extra=""):
    eps = "\n".join(f'    - {{address: "{b.addr}"}}' for b in backends)
    return f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: {name}}}
spec:
  endpoints:
{eps}{extra}
"""


def grpc_service(name, port):
    """A `protocol: grpc` Service with one endpoint on loopback `port`."""
    return f"""---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: {name}}}
spec:
  protocol: grpc
  endpoints: [{{address: "127.0.0.1:{port}"}}]
"""


class Addr:
    """An endpoint given only by address (a closed port, a process started elsewhere)."""

    def __init__(self, addr, name="addr"):
        self.addr, self.name = addr, name


def assert_metrics_valid(text):
    """The Prometheus exposition passes `promtool check metrics`."""
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()


def validate_bad(tmp_path, resources):
    """`meshgate validate` on a Gateway plus `resources`; asserts it fails with
    FILE:LINE diagnostics and returns its output."""
    f = tmp_path / "bad.yaml"
    f.write_text(gateway_yaml(8080, 9901) + resources)
    p = subprocess.run([BIN, "validate", "-c", str(f)], capture_output=True, text=True)
    assert p.returncode == 1 and f"{f}:" in p.stdout, p.stdout
    return p.stdout


def validate_service(tmp_path, name, extra):
    """`validate_bad` on one Service with `extra` spec lines; the diagnostics name it."""
    out = validate_bad(tmp_path, service(name, Addr("127.0.0.1:9"), extra=extra))
    assert f"Service/{name}: " in out, out
    return out


def filters(*items):
    """An Api's `filters:` block (for `api(..., extra=...)`), one flow-style entry per item."""
    return "\n  filters:\n" + "".join(f"    - {i}\n" for i in items).rstrip("\n")


def api(name, path, invoke, methods=None, extra=""):
    m = f"\n    methods: [{', '.join(methods)}]" if methods else ""
    return f"""---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: {name}}}
spec:
  request:
    path: "{path}"{m}
  invoke: {invoke}{extra}
"""


class Nginx:
    """A real nginx, one worker, in the foreground, configured with `http_block` (the
    body of its `http {}`); `{port}` in it is replaced by a port chosen now."""

    def __init__(self, tmp_path, http_block):
        self.port = free_port()
        self.dir = tmp_path / f"nginx-{self.port}"
        self.dir.mkdir()
        body = http_block.replace("{port}", str(self.port))
        temps = "\n".join(
            f"  {k}_temp_path {self.dir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
{temps}
  access_log {self.dir}/access.log;
{body}
}}
""")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Redis:
    """A real redis-server on a port chosen now, no persistence, stopped by its PID.
    `start()` again reuses the same port (to bring it back after `stop()`)."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.dir = Path(tmp_path) / f"redis-{self.port}"
        self.dir.mkdir()
        self.proc = None
        self.start()

    def start(self):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args):
        binary = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        return subprocess.run([binary, "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout

    def stop(self):
        terminate(self.proc)


class Etcd:
    """A real single-member etcd on client and peer ports chosen now, its data in
    tmp_path, stopped by its PID. With `tls=(cert, key, ca)` its client port speaks
    TLS only and asks clients for a certificate signed by `ca`."""

    def __init__(self, tmp_path, tls=None):
        self.port, self.peer = free_port(), free_port()
        self.dir = Path(tmp_path) / f"etcd-{self.port}"
        self.tls = tls
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        scheme = "https" if tls else "http"
        client, peer = f"{scheme}://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        secure = ["--cert-file", str(tls[0]), "--key-file", str(tls[1]),
                  "--client-cert-auth", "--trusted-ca-file", str(tls[2])] if tls else []
        self.log = open(Path(tmp_path) / f"etcd-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [binary, "--name", "t", "--data-dir", str(self.dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}", "--initial-cluster-state", "new", *secure],
            stdout=self.log, stderr=subprocess.STDOUT)

        def healthy():
            if tls:
                # The client port asks for a certificate: being up is enough here.
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return "ready to serve client requests" in Path(self.log.name).read_text()
            with urllib.request.urlopen(f"{client}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        wait_ready(self.proc, healthy, "etcd", timeout=20)

    def ctl(self, *args):
        """Run etcdctl against this member; its output (it must succeed)."""
        return subprocess.run(["etcdctl", f"--endpoints=127.0.0.1:{self.port}", *args],
                              capture_output=True, text=True, timeout=10, check=True).stdout

    @property
    def url(self):
        """The `--store` URL for meshgate control."""
        return f"etcd{'s' if self.tls else ''}://127.0.0.1:{self.port}"

    def stop(self):
        terminate(self.proc)


TOKEN = "t0ken-for-tests"


class Relay:
    """A TCP relay from a port chosen now to `port` on loopback. cut() closes every
    connection through it and refuses new ones: a network partition between the
    peers on either side, both of which go on running."""

    def __init__(self, port):
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns, self.lock = [], threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self.server.accept()
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                if self.server.fileno() == -1:
                    return
                continue
            with self.lock:
                self.conns += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        for s in [self.server] + self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.close()
        with self.lock:
            for s in self.conns:
                s.close()


class Control:
    """A `meshgate control` process on a store file it owns; over TLS when given
    `tls=(cert, key, ca)` (PEM files)."""

    def __init__(self, tmp_path, store=None, port=None, tls=None, args=(), host="127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self.dir = Path(tmp_path)
        self.store = store or self.dir / "control.redb"
        self.proc = None
        self.tls = tls
        self.args = list(args)

    def start(self, wait=True):
        self.stderr = open(self.dir / f"control-{self.port}.stderr", "w")
        env = dict(os.environ, MESHGATE_ADMIN_TOKEN=TOKEN)
        tls = ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])] if self.tls else []
        self.proc = subprocess.Popen(
            [BIN, "control", "--listen", f"{self.host}:{self.port}", "--store", str(self.store),
             "--state-dir", str(self.dir / "control-state"), *tls, *self.args],
            stdout=subprocess.DEVNULL, stderr=self.stderr, env=env)
        if not wait:
            return self
        wait_ready(self.proc, lambda: self.call("GET", "/api/v1/revision")[0] == 200,
                   "control plane", self.logs)
        return self

    def logs(self):
        return (self.dir / f"control-{self.port}.stderr").read_text()

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def call(self, method, path, body=None, token=TOKEN, headers=None):
        data = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, method=method, data=data)
        if token is not None:
            req.add_header("authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        context = ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ctl(self, *args, token=TOKEN):
        env = dict(os.environ, MESHGATE_SERVER=self.url, MESHGATE_AUTHOR="ana")
        if self.tls:
            env["MESHGATE_CA_FILE"] = str(self.tls[2])
        env.pop("MESHGATE_ADMIN_TOKEN", None)
        if token is not None:
            env["MESHGATE_ADMIN_TOKEN"] = token
        p = subprocess.run([BIN, "ctl", *args], capture_output=True, text=True, env=env, timeout=30)
        return p.returncode, p.stdout, p.stderr

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        return self.proc.returncode if self.proc else None


def hello_api(body):
    """Api `hello`: GET /hello answers 200 with `body` from a mock (YAML, no `---`)."""
    return f"""apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: hello}}
spec:
  request: {{path: /hello}}
  invoke: {{mock: {{status: 200, body: "{body}"}}}}
"""


def proxy_gateway(name, port, admin_port, extra=""):
    """A Gateway resource for one `Proxy`: its listener and admin ports (YAML, no
    leading `---`); `extra` adds spec lines."""
    return f"""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: {name}}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{port}"}}]
  admin: {{address: "127.0.0.1:{admin_port}"}}{extra}
"""


def node_env(token):
    """The environment of a proxy process: the node token, not the admin's."""
    env = dict(os.environ, MESHGATE_NODE_TOKEN=token, MESHGATE_LOG="info")
    env.pop("MESHGATE_ADMIN_TOKEN", None)
    return env


class Proxy:
    """A `meshgate proxy` fed by a control plane, serving one Gateway resource whose
    listener and admin ports the test chose. Its cache and state live in tmp_path."""

    def __init__(self, tmp_path, control_url, node, gateway, port, admin_port, labels="",
                 control_ca=None):
        self.dir = Path(tmp_path)
        self.control_ca = control_ca
        self.control_url, self.node, self.gateway = control_url, node, gateway
        self.port, self.admin_port, self.labels = port, admin_port, labels
        self.cache = self.dir / f"cache-{node}"
        self.proc = None
        self.starts = 0

    def start(self, token=TOKEN):
        self.starts += 1
        self.stderr_path = self.dir / f"proxy-{self.node}-{self.starts}.stderr"
        env = node_env(token)
        if self.control_ca:
            env["MESHGATE_CONTROL_CA"] = str(self.control_ca)
        self.proc = subprocess.Popen(
            [BIN, "proxy", "--control", self.control_url, "--node", self.node,
             "--gateway", self.gateway, "--labels", self.labels,
             "--cache-dir", str(self.cache), "--state-dir", str(self.dir / f"state-{self.node}")],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), env=env)
        return self

    def logs(self):
        return self.stderr_path.read_text()

    def request(self, path):
        """(status, headers, body text) of a GET on the proxy's listener; (None, {},
        error) if refused."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()
        except OSError as e:
            return None, {}, str(e)

    def get(self, path):
        """(status, body text) of a GET on the proxy's listener."""
        status, _, body = self.request(path)
        return status, body

    def wait_for(self, path, body, timeout=10.0):
        """Wait until GET path answers 200 with `body`."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy {self.node} exited {self.proc.returncode}: {self.logs()}")
            last = self.get(path)
            if last == (200, body):
                return
            time.sleep(0.05)
        raise TimeoutError(f"proxy {self.node}: {path} answered {last}, not {body!r}\n{self.logs()}")

    def config(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/config", timeout=5) as r:
            return json.loads(r.read())

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        return self.proc.returncode if self.proc else None


class Sidecar:
    """A `meshgate proxy --role sidecar` next to `app` (HOST:PORT) for `service`, fed
    by a control plane, with inbound, outbound and admin ports chosen at run time.
    Its cache and state live in tmp_path."""

    def __init__(self, tmp_path, control_url, node, service, app, labels="", lease="2s",
                 gateway=None, args=()):
        self.dir = Path(tmp_path)
        self.control_url, self.node, self.service, self.app = control_url, node, service, app
        self.labels, self.lease, self.gateway, self.args = labels, lease, gateway, list(args)
        self.inbound, self.outbound, self.admin_port = free_port(), free_port(), free_port()
        self.proc = None
        self.starts = 0

    def start(self, wait=True):
        self.starts += 1
        self.stderr_path = self.dir / f"sidecar-{self.node}-{self.starts}.stderr"
        env = node_env(TOKEN)
        gateway = ["--gateway", self.gateway] if self.gateway else []
        self.proc = subprocess.Popen(
            [BIN, "proxy", "--role", "sidecar", "--control", self.control_url, "--node", self.node,
             "--service", self.service, "--app", self.app,
             "--inbound", f"127.0.0.1:{self.inbound}", "--outbound", f"127.0.0.1:{self.outbound}",
             "--admin", f"127.0.0.1:{self.admin_port}", "--lease", self.lease,
             "--labels", self.labels, *gateway, *self.args,
             "--cache-dir", str(self.dir / f"cache-{self.node}"),
             "--state-dir", str(self.dir / f"state-{self.node}")],
            stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "w"), env=env)
        if wait:
            wait_ready(self.proc, self.ready, f"sidecar {self.node}", self.logs)
        return self

    def ready(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=2) as r:
            return r.status == 200

    def logs(self):
        return self.stderr_path.read_text()

    @property
    def address(self):
        """The address it registers: its inbound listener."""
        return f"127.0.0.1:{self.inbound}"

    def call(self, service, path, headers=None):
        """GET http://SERVICE/PATH as the app would: through the outbound listener."""
        return mesh_call(self.outbound, service, path, headers)

    def kill(self):
        """SIGKILL: no chance to deregister."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        return self.proc.returncode if self.proc else None
