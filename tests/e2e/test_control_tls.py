"""The control plane over TLS: `meshgate control --tls-cert --tls-key` serves the
admin API and the push streams on one port over TLS only; `ctl --ca-file` and
`proxy --control-ca` verify it against a CA made here with openssl. Plain HTTP to the
port gets no answer, and a client that cannot verify the certificate is refused."""

import subprocess
import time

import pytest

from harness import BIN, Control, Etcd, Proxy, free_port, hello_api as hello, proxy_gateway, TOKEN


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate it signs for 127.0.0.1, and a stranger CA."""
    d = tmp_path
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN=meshgate test {ca}",
                "-keyout", d / f"{ca}.key", "-out", d / f"{ca}.pem")
    openssl("req", *ec, "-subj", "/CN=control", "-keyout", d / "control.key", "-out", d / "control.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", d / "control.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", d / "ext.cnf", "-out", d / "control.pem")
    # A client certificate, for etcd's client-certificate authentication.
    openssl("req", *ec, "-subj", "/CN=meshgate-control", "-keyout", d / "client.key", "-out", d / "client.csr")
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", d / "client.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", d / "client.cnf", "-out", d / "client.pem")
    return d


def test_admin_api_and_push_over_tls(tmp_path, pki):
    control = Control(tmp_path, tls=(pki / "control.pem", pki / "control.key", pki / "ca.pem")).start()
    port, admin = free_port(), free_port()
    proxy = Proxy(tmp_path, control.url, "edge-1", "edge", port, admin, control_ca=pki / "ca.pem")
    try:
        f = tmp_path / "config.yaml"
        f.write_text(proxy_gateway("edge", port, admin) + "---\n" + hello("over tls"))
        code, out, err = control.ctl("apply", "-f", str(f))
        assert code == 0 and out.startswith("revision 1"), err
        proxy.start()
        proxy.wait_for("/hello", "over tls")
        # The node list (push stream over TLS), and a change pushed over it.
        f.write_text(proxy_gateway("edge", port, admin) + "---\n" + hello("changed"))
        code, _, err = control.ctl("apply", "-f", str(f))
        assert code == 0, err
        proxy.wait_for("/hello", "changed")
        code, out, err = control.ctl("get", "nodes")
        assert code == 0 and "edge-1" in out and " 2 " in f" {out} ", out

        # Plain HTTP to the TLS port gets no answer.
        p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                            "-H", f"authorization: Bearer {TOKEN}",
                            f"http://127.0.0.1:{control.port}/api/v1/revision"],
                           capture_output=True, text=True, timeout=15)
        assert p.returncode != 0 and p.stdout == "000", (p.returncode, p.stdout, p.stderr)
        # curl verifying with the CA gets the answer; with no CA, a certificate error.
        p = subprocess.run(["curl", "-sS", "--cacert", str(pki / "ca.pem"),
                            "-H", f"authorization: Bearer {TOKEN}", f"{control.url}/api/v1/revision"],
                           capture_output=True, text=True, timeout=15)
        assert p.returncode == 0 and '"revision":2' in p.stdout, p
        p = subprocess.run(["curl", "-sS", f"{control.url}/api/v1/revision"],
                           capture_output=True, text=True, timeout=15)
        assert p.returncode == 60, p  # SSL certificate problem

        # ctl: https needs a CA; a CA that did not sign the certificate is refused.
        env_ctl = [BIN, "ctl", "--server", control.url, "get", "nodes"]
        env = {"MESHGATE_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
        p = subprocess.run(env_ctl, capture_output=True, text=True, env=env, timeout=15)
        assert p.returncode == 2 and "--ca-file" in p.stderr, p.stderr
        p = subprocess.run([*env_ctl[:2], "--ca-file", str(pki / "other-ca.pem"), *env_ctl[2:]],
                           capture_output=True, text=True, env=env, timeout=15)
        assert p.returncode == 3 and "certificate" in p.stderr.lower(), p.stderr
    finally:
        proxy.stop() if proxy.proc else None
        control.stop()


def test_a_proxy_refuses_a_control_plane_it_cannot_verify(tmp_path, pki):
    control = Control(tmp_path, tls=(pki / "control.pem", pki / "control.key", pki / "ca.pem")).start()
    port, admin = free_port(), free_port()
    try:
        # No CA for an https control plane: a usage error at once.
        p = subprocess.run([BIN, "proxy", "--control", control.url, "--node", "x",
                            "--state-dir", str(tmp_path / "s")],
                           capture_output=True, text=True, env={"MESHGATE_NODE_TOKEN": TOKEN}, timeout=15)
        assert p.returncode != 0 and "--control-ca" in p.stderr, p.stderr
        # A stranger CA: the proxy keeps trying and never gets a config.
        f = tmp_path / "config.yaml"
        f.write_text(proxy_gateway("edge", port, admin) + "---\n" + hello("secret"))
        assert control.ctl("apply", "-f", str(f))[0] == 0
        proxy = Proxy(tmp_path, control.url, "edge-1", "edge", port, admin,
                      control_ca=pki / "other-ca.pem").start()
        try:
            deadline = time.time() + 3
            while time.time() < deadline and "certificate" not in proxy.logs().lower():
                time.sleep(0.1)
            assert "certificate" in proxy.logs().lower(), proxy.logs()
            assert proxy.get("/hello")[0] is None
            assert control.call("GET", "/api/v1/nodes")[1]["items"] == []
        finally:
            proxy.stop()
    finally:
        control.stop()


def test_the_store_in_etcd_over_tls_with_a_client_certificate(tmp_path, pki):
    etcd = Etcd(tmp_path, tls=(pki / "control.pem", pki / "control.key", pki / "ca.pem"))
    try:
        store = etcd.url
        assert store.startswith("etcds://")
        control = Control(tmp_path, store=store, args=[
            "--etcd-ca", str(pki / "ca.pem"),
            "--etcd-cert", str(pki / "client.pem"), "--etcd-key", str(pki / "client.key")]).start()
        try:
            f = tmp_path / "hello.yaml"
            f.write_text(proxy_gateway("edge", free_port(), free_port()) + "---\n" + hello("kept in etcd"))
            code, out, err = control.ctl("apply", "-f", str(f))
            assert code == 0 and out.startswith("revision 1"), err
            assert control.call("GET", "/api/v1/apis/hello")[0] == 200
        finally:
            control.stop()
        # The revision is in etcd: a second control plane reads it back.
        again = Control(tmp_path, store=store, args=[
            "--etcd-ca", str(pki / "ca.pem"),
            "--etcd-cert", str(pki / "client.pem"), "--etcd-key", str(pki / "client.key")]).start()
        try:
            assert again.call("GET", "/api/v1/revision")[1]["revision"] == 1
        finally:
            again.stop()

        def control_fails(*args, store=store):
            p = subprocess.run([BIN, "control", "--listen", f"127.0.0.1:{free_port()}", "--store", store,
                                "--state-dir", str(tmp_path / "s"), *args],
                               capture_output=True, text=True, env={"MESHGATE_ADMIN_TOKEN": TOKEN}, timeout=30)
            assert p.returncode != 0, p
            return p.stderr

        # No CA, no client certificate (etcd refuses), a plain etcd:// with TLS flags.
        assert "--etcd-ca" in control_fails()
        err = control_fails("--etcd-ca", str(pki / "ca.pem"))
        assert "cannot use etcd at https://127.0.0.1:" in err and "--etcd-cert" in err, err
        err = control_fails("--etcd-ca", str(pki / "ca.pem"), store=store.replace("etcds", "etcd"))
        assert "use --store etcds://" in err, err
    finally:
        etcd.stop()
