"""Mesh mTLS: the control plane's CA signs each sidecar's certificate (a SPIFFE
ID) from a signing request, sidecars call each other over mutual TLS when the
Service says `tls: {mode: mesh}`, inbound listeners refuse clients without a mesh
certificate, `authz` allows by caller identity, and certificates rotate under
load without a failed request. Real control plane, sidecars, apps, Python `ssl`
and `cryptography`, curl."""

import datetime
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from harness import BIN, curl, free_port, metric_sum, wait_for
from test_mesh import SERVICES as SERVICES_PLAIN
from test_mesh import Mesh, chain, edge_to_orders, gateway_sidecar

TD = "cluster.local"

SERVICES = "\n---\n".join(
    f"""apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: {name}}}
spec:
  discovery: {{registry: {name}}}
  tls: {{mode: mesh}}{extra}
""" for name, extra in (
        ("front", ""),
        ("orders", "\n  inbound: {policies: [orders-callers]}"),
        ("users", "")))

POLICY = f"""apiVersion: meshgate.io/v1
kind: Policy
metadata: {{name: orders-callers}}
spec:
  filters:
    - name: authz
      config:
        allow:
          - from: ["spiffe://{TD}/svc/front"]
"""


class TlsMesh(Mesh):
    def __init__(self, tmp_path, args=()):
        super().__init__(tmp_path, control_args=args)
        self.apply("mesh", POLICY + "---\n" + SERVICES)

    def root(self, tmp_path):
        status, body = self.control.call("GET", "/api/v1/mesh/ca")
        assert status == 200, body
        assert body["trustDomain"] == TD
        path = tmp_path / "mesh-root.pem"
        path.write_text(body["root"])
        return path

    def workload(self, tmp_path, service):
        """A key and a certificate for `service`, signed by the control plane from
        a CSR (as a workload outside meshgate would get one): (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([]))
               .sign(key, hashes.SHA256()))
        status, body = self.control.call("POST", "/api/v1/mesh/certificates", {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "service": service,
        })
        assert status == 200, body
        assert body["spiffeId"] == f"spiffe://{TD}/svc/{service}"
        cert, keyfile = tmp_path / f"{service}.crt", tmp_path / f"{service}.key"
        cert.write_text(body["certificate"])
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return cert, keyfile


@pytest.fixture
def mesh(tmp_path):
    m = TlsMesh(tmp_path)
    yield m
    m.stop()


def tls_context(root, client=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(root))
    # Mesh certificates name a SPIFFE ID, not a host: the ID is checked below.
    ctx.check_hostname = False
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    return ctx


def handshake(port, ctx):
    """Shake hands with 127.0.0.1:port: the TLS socket and the server's certificate."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw)
    der = s.getpeercert(binary_form=True)
    return s, x509.load_der_x509_certificate(der)


def spiffe_ids(cert):
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def http_get(s, path="/", host="orders"):
    """GET over an open (TLS) socket: (status, headers dict, body), or None when the
    server closed or refused without an answer."""
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_sidecars_call_each_other_over_mtls_with_spiffe_identities(mesh, tmp_path):
    front_app, front = mesh.instance("front", "front-1")
    orders_app, orders = mesh.instance("orders", "orders-1")
    mesh.wait_registered("orders", [orders.address])
    status, _, body = front.call("orders", "/orders/7")
    assert status == 200, body
    # The orders app learns who called, from its sidecar: the verified SPIFFE ID.
    seen = orders_app.requests[-1]["headers"]
    assert seen["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/svc/front"

    # A real handshake with the orders sidecar's inbound port: its certificate
    # chains to the mesh root and names spiffe://cluster.local/svc/orders only.
    root = mesh.root(tmp_path)
    s, cert = handshake(orders.inbound, tls_context(root))
    assert spiffe_ids(cert) == [f"spiffe://{TD}/svc/orders"]
    life = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=50) < life <= datetime.timedelta(hours=1), life
    # ...but without a mesh certificate of its own the client gets no answer.
    assert http_get(s) is None
    s.close()

    # Plaintext to the mesh-only port is refused too.
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                        f"http://127.0.0.1:{orders.inbound}/orders/7"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stdout in ("", "000"), p
    with urllib.request.urlopen(f"http://127.0.0.1:{orders.admin_port}/metrics") as r:
        metrics = r.read().decode()
    failures = [l for l in metrics.splitlines()
                if l.startswith("meshgate_downstream_tls_handshake_failures_total")]
    assert failures and float(failures[0].split()[-1]) >= 2, failures
    # Nothing reached the app but the one mesh call.
    assert len(orders_app.requests) == 1

    # With a mesh certificate for front, a client outside meshgate is served.
    s, _ = handshake(orders.inbound, tls_context(root, mesh.workload(tmp_path, "front")))
    status, headers, body = http_get(s)
    assert status == 200, body
    assert json.loads(body)["headers"]["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/svc/front"


def test_authz_denies_services_not_allowed(mesh, tmp_path):
    mesh.instance("front", "front-1")
    users_app, users = mesh.instance("users", "users-1")
    orders_app, orders = mesh.instance("orders", "orders-1")
    mesh.wait_registered("orders", [orders.address])
    # users has a valid mesh identity, but orders allows only front.
    status, _, body = users.call("orders", "/orders/7")
    assert status == 403, body
    err = json.loads(body)["error"]
    assert err["code"] == "forbidden"
    assert f"spiffe://{TD}/svc/users is not allowed" in err["message"]
    assert orders_app.requests == []
    # The same for a workload outside meshgate holding a certificate for "evil".
    root = mesh.root(tmp_path)
    s, _ = handshake(orders.inbound, tls_context(root, mesh.workload(tmp_path, "evil")))
    status, _, body = http_get(s)
    assert status == 403, body
    assert orders_app.requests == []
    # users itself has no inbound policy: orders may call it.
    status, _, body = orders.call("users", "/u")
    assert status == 200, body
    assert users_app.requests[-1]["headers"]["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/svc/orders"


def test_a_certificate_for_another_service_is_not_accepted_as_the_callee(mesh, tmp_path):
    """The caller checks the callee's SPIFFE ID: an endpoint registered for orders
    that presents users' certificate gets no request."""
    _, front = mesh.instance("front", "front-1")
    users_app, users = mesh.instance("users", "users-1")
    # Point orders at the users sidecar's inbound port: a valid mesh peer with
    # the wrong identity.
    mesh.apply("orders-static", f"""apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: orders}}
spec:
  endpoints: [{{address: "{users.address}"}}]
  tls: {{mode: mesh}}
""")
    deadline = time.time() + 5
    while time.time() < deadline:
        # 503 until the new Service reaches front's sidecar.
        status, _, body = front.call("orders", "/orders/7")
        if status != 503 or users_app.requests:
            break
        time.sleep(0.05)
    assert status == 502, (status, body)
    assert json.loads(body)["error"]["code"] == "upstream_unavailable", body
    assert users_app.requests == []
    # The caller's log says why.
    assert f"the peer is spiffe://{TD}/svc/users, not spiffe://{TD}/svc/orders" in front.logs()


def test_health_checks_of_a_mesh_service_go_over_mtls(mesh, tmp_path):
    """Active checks speak mesh mTLS: the real orders instance passes them (its app
    sees them from front's identity); an endpoint with users' certificate fails
    them, even as a TCP check, and gets no calls."""
    _, front = mesh.instance("front", "front-1")
    orders_app, orders = mesh.instance("orders", "orders-1")
    users_app, users = mesh.instance("users", "users-1")
    for kind, check in (("http", "{path: /healthz"), ("tcp", "{type: tcp")):
        mesh.apply("orders-static", f"""apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: orders}}
spec:
  endpoints: [{{address: "{orders.address}"}}, {{address: "{users.address}"}}]
  tls: {{mode: mesh}}
  inbound: {{policies: [orders-callers]}}
  healthCheck: {check}, interval: 1s, unhealthyThreshold: 1, healthyThreshold: 1}}
""")
        deadline = time.time() + 8
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{front.admin_port}/upstreams") as r:
                services = json.loads(r.read())["services"]
            svc = next((x for x in services if x["service"] == "orders"), None)
            got = {e["address"]: e for e in svc["endpoints"]} if svc else {}
            states = {a: (e["health"], (e.get("healthCheck") or {}).get("checks", 0))
                      for a, e in got.items()}
            if (states.get(users.address, ("",))[0] == "unhealthy"
                    and states.get(orders.address, ("", 0))[0] == "healthy"
                    and states[orders.address][1] >= 1):
                break
            assert time.time() < deadline, (kind, states)
            time.sleep(0.1)
        assert "certificate" in got[users.address]["reason"] or "svc/users" in got[users.address]["reason"], got
        assert set(served_by_app(front, 8)) == {"orders-1"}, kind
    assert users_app.requests == []
    # The orders app saw front's probes come through its sidecar with front's
    # identity (and its own sidecar's, which checks the app next door in plain).
    callers = {r["headers"].get("x-forwarded-client-cert") for r in orders_app.requests
               if r["path"] == "/healthz"}
    assert f"URI=spiffe://{TD}/svc/front" in callers, callers


def served_by_app(sidecar, n):
    names = []
    for _ in range(n):
        status, headers, body = sidecar.call("orders", "/orders/1")
        assert status == 200, body
        names.append(headers["x-backend"])
    return names


def allow_callers(mesh, *ids):
    """Let `ids` call orders."""
    mesh.apply("policy", POLICY.replace(f'["spiffe://{TD}/svc/front"]', json.dumps(list(ids))))


def test_the_gateway_sidecar_applies_public_filters_and_calls_two_services_over_mtls(mesh, tmp_path):
    """BFF mode: public traffic reaches the BFF's own sidecar (key-auth,
    validation, rate-limit), then the BFF app, whose calls to orders and users
    leave through the same sidecar over mTLS as spiffe://.../svc/front."""
    port, app, _ = gateway_sidecar(mesh, tmp_path, """apiVersion: meshgate.io/v1
kind: Api
metadata: {name: shop}
spec:
  gateways: [public]
  request:
    path: "/shop/{svc}/{id}"
    params: [{name: id, in: path, type: integer, minimum: 1}]
  filters:
    - {name: key-auth, config: {header: x-api-key}}
    - {name: rate-limit, config: {key: consumer, rate: "1/m", burst: 4}}
  invoke: {service: front, path: "/call/{svc}/items/{id}"}
""")
    orders_app, orders = mesh.instance("orders", "orders-1")
    users_app, users = mesh.instance("users", "users-1")
    mesh.wait_registered("users", [users.address])
    key = ("-H", "x-api-key: shop-key-123456")
    url = f"http://127.0.0.1:{port}/shop"
    assert curl(f"{url}/orders/1")[0] == 401
    status, _, body, _ = curl(*key, f"{url}/orders/zero")
    assert status == 400, body
    for svc, backend in (("orders", orders_app), ("users", users_app)):
        status, _, body, _ = curl(*key, f"{url}/{svc}/7")
        assert status == 200, body
        answer = json.loads(body)
        assert chain(answer) == ["bff-1", f"{svc}-1"]
        assert answer["called"]["path"] == "/items/7"
        assert backend.requests[-1]["headers"]["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/svc/front"
    # The rate limit is the public Api's, counted in the BFF's sidecar.
    statuses = [curl(*key, f"{url}/orders/1")[0] for _ in range(4)]
    assert 429 in statuses, statuses
    assert len(app.requests) <= 4 + 2


def test_an_edge_proxy_calls_mesh_services_with_its_gateway_identity(mesh, tmp_path):
    orders_app, orders = mesh.instance("orders", "orders-1")
    edge = edge_to_orders(mesh, tmp_path, "{service: orders}", ready=(403, 200))
    # orders' authz lets only front in: the edge (spiffe://.../gateway/edge) is refused...
    status, _, body = edge.request("/orders/x")
    assert status == 403 and f"spiffe://{TD}/gateway/edge is not allowed" in body, body
    # ...until the policy names it.
    allow_callers(mesh, f"spiffe://{TD}/svc/front", f"spiffe://{TD}/gateway/edge")
    deadline = time.time() + 10
    while edge.get("/orders/x")[0] != 200:
        assert time.time() < deadline, edge.logs()
        time.sleep(0.05)
    assert orders_app.requests[-1]["headers"]["x-forwarded-client-cert"] == f"URI=spiffe://{TD}/gateway/edge"


def test_certificates_rotate_under_load_without_a_failed_request(tmp_path):
    m = TlsMesh(tmp_path, args=("--mesh-cert-ttl", "4s"))
    try:
        _, front = m.instance("front", "front-1")
        _, orders = m.instance("orders", "orders-1")
        m.wait_registered("orders", [orders.address])
        root = m.root(tmp_path)
        first = handshake(orders.inbound, tls_context(root))[1]
        failures, done, stop = [], [0], threading.Event()

        def load():
            while not stop.is_set():
                status, _, body = front.call("orders", "/orders/1")
                if status != 200:
                    failures.append((status, body))
                done[0] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        # Three rotations (every 2 s, half of the 4 s life); some calls go on fresh
        # connections made with the newer certificates.
        serials = {first.serial_number}
        for _ in range(6):
            time.sleep(1)
            serials.add(handshake(orders.inbound, tls_context(root))[1].serial_number)
        stop.set()
        for t in threads:
            t.join()
        assert failures == [], failures[:3]
        assert done[0] > 100, done
        assert len(serials) >= 3, serials
        # The connections made before the first rotation still serve: a certificate
        # is checked at the handshake only.
        now = handshake(orders.inbound, tls_context(root))[1]
        assert now.not_valid_after_utc > first.not_valid_after_utc
    finally:
        m.stop()


def test_run_and_validate_explain_mesh_config(tmp_path):
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(f"""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: public}}
spec: {{listeners: [{{name: web, address: "127.0.0.1:{free_port()}"}}]}}
---
{SERVICES.split('---')[1].strip()}
---
{POLICY.replace(f'["spiffe://{TD}/svc/front"]', '[front]')}""")
    out = subprocess.run([BIN, "validate", "-c", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{cfg}:22: Policy/orders-callers: spec.filters.0.config.allow.0.from.0:" in out.stdout + out.stderr, out
    cfg.write_text(cfg.read_text().replace("[front]", f'["spiffe://{TD}/svc/front"]'))
    out = subprocess.run([BIN, "validate", "-c", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out
    # A gateway run from files has no CA to get mesh certificates from.
    out = subprocess.run([BIN, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert 'Service "orders" has tls.mode mesh' in out.stderr, out.stderr


MESH = """apiVersion: meshgate.io/v1
kind: Mesh
metadata: {{name: default}}
spec: {{mtls: {{mode: {mode}}}}}
"""


def plaintext_status(port):
    """The status of a plaintext GET to 127.0.0.1:port, or None when refused (a
    TLS listener answers with an alert, not HTTP)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/orders/1", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):
        return None


def test_the_mesh_moves_to_strict_mtls_under_load_without_a_failed_request(tmp_path):
    """The migration an SRE runs on a live mesh: Mesh `permissive` (inbounds take
    both), then the Services' `tls: {mode: mesh}` (callers move to mTLS), then Mesh
    `strict` (inbounds refuse plaintext, and registry Services need no `tls` of
    their own), with calls going on throughout."""
    m = Mesh(tmp_path)
    try:
        front_app, front = m.instance("front", "front-1")
        orders_app, orders = m.instance("orders", "orders-1")
        m.wait_registered("orders", [orders.address])
        status, _, body = front.call("orders", "/orders/1")
        assert status == 200, body
        assert "x-forwarded-client-cert" not in orders_app.requests[-1]["headers"]
        assert plaintext_status(orders.inbound) == 200
        root_status, ca = m.control.call("GET", "/api/v1/mesh/ca")
        assert root_status == 200, ca
        root = tmp_path / "mesh-root.pem"
        root.write_text(ca["root"])

        def takes_tls():
            try:
                s, cert = handshake(orders.inbound, tls_context(root))
            except (ssl.SSLError, OSError):
                return False
            s.close()
            return spiffe_ids(cert) == [f"spiffe://{TD}/svc/orders"]

        def caller_identity():
            status, _, body = front.call("orders", "/orders/1")
            assert status == 200, body
            return orders_app.requests[-1]["headers"].get("x-forwarded-client-cert")

        failures, done = [], [0]
        stop = threading.Event()

        def load():
            while not stop.is_set():
                status, _, body = front.call("orders", "/orders/2")
                if status == 200:
                    done[0] += 1
                else:
                    failures.append((status, body[:200]))

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            m.apply("mesh", MESH.format(mode="permissive"))
            wait_for(takes_tls, "the inbound takes mTLS once the Mesh is permissive", timeout=10)
            assert plaintext_status(orders.inbound) == 200
            assert caller_identity() is None, "callers go on in plaintext"

            m.apply("services", "\n---\n".join(
                f"apiVersion: meshgate.io/v1\nkind: Service\nmetadata: {{name: {n}}}\n"
                f"spec: {{discovery: {{registry: {n}}}, tls: {{mode: mesh}}}}\n"
                for n in ("front", "orders", "users")))
            wait_for(lambda: caller_identity() == f"URI=spiffe://{TD}/svc/front",
                     "front calls orders over mTLS", timeout=10)
            # Still permissive: a plaintext client is served, and counted.
            assert plaintext_status(orders.inbound) == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{orders.admin_port}/metrics") as r:
                counted = metric_sum(r.read().decode(), "meshgate_mesh_plaintext_connections_total")
            assert counted >= 1, counted

            m.apply("mesh", MESH.format(mode="strict"))
            wait_for(lambda: plaintext_status(orders.inbound) is None,
                     "plaintext is refused once the Mesh is strict", timeout=10)
            code, out, err = m.control.ctl("get", "meshes", "default", "-o", "yaml")
            assert code == 0 and "mode: strict" in out, (out, err)
            # Strict covers registry Services that say nothing about tls.
            m.apply("services", SERVICES_PLAIN)
            time.sleep(1)
            assert caller_identity() == f"URI=spiffe://{TD}/svc/front"
            assert plaintext_status(orders.inbound) is None
        finally:
            stop.set()
            t.join(10)
        assert not failures, failures[:5]
        assert done[0] > 100, done
    finally:
        m.stop()
