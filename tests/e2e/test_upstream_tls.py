"""TLS to upstreams outside the mesh (`Service.spec.tls.mode: simple`), against a
real nginx serving HTTPS with certificates from a CA the test makes."""

import subprocess

import pytest

from harness import Gateway, Nginx, api, curl, service, validate_service


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA; a server certificate it signs for upstream.test and 127.0.0.1; a client
    certificate it signs; and a second, self-signed server certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=meshgate upstream test CA",
            "-keyout", d / "ca.key", "-out", d / "ca.pem")
    for name, ext in (("server", "subjectAltName=DNS:upstream.test,IP:127.0.0.1\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        openssl("req", *ec, "-subj", f"/CN={name}", "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr")
        (d / f"{name}.cnf").write_text(ext)
        openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", d / f"{name}.cnf", "-out", d / f"{name}.pem")
    return d


# What the upstream saw of the connection, in the body.
SEEN = 'return 200 "tls=$ssl_protocol sni=$ssl_server_name proto=$server_protocol ' \
       'reqs=$connection_requests client=$ssl_client_s_dn\\n";'


@pytest.fixture
def https_nginx(tmp_path, pki):
    """Start an HTTPS nginx (`extra` in its server block; `http2`), stopped after the test."""
    started = []

    def start(extra="", http2=False):
        started.append(serve_https(tmp_path, pki, extra, http2))
        return started[-1]

    yield start
    for ng in started:
        ng.stop()


def serve_https(tmp_path, pki, extra, http2):
    h2 = " http2" if http2 else ""
    return Nginx(tmp_path, f"""
  server {{
    listen 127.0.0.1:{{port}} ssl{h2};
    ssl_certificate {pki / "server.pem"};
    ssl_certificate_key {pki / "server.key"};
    keepalive_requests 1000;
    {extra}
    location / {{ {SEEN} }}
  }}""")


def gateway(tmp_path, gateways, upstream, tls, protocol="http1"):
    extra = f"\n  protocol: {protocol}\n  tls: {tls}"
    g = Gateway(tmp_path, service("up", upstream, extra=extra) + api("all", "/{*rest}", "{service: up}"))
    gateways.append(g)
    return g


def get(url):
    status, _, body, _ = curl(url)
    return status, body.decode()


def seen(body):
    """The upstream's view: `tls`, `sni`, `proto`, `reqs` (on this connection), `client`."""
    out = {}
    for part in body.replace(" client=", "\nclient=").split("\n"):
        if part.startswith("client="):
            out["client"] = part[len("client="):]
        else:
            out.update(kv.split("=", 1) for kv in part.split())
    return out


def test_simple_tls_verifies_the_upstream_with_the_given_ca_and_sends_sni(tmp_path, pki, https_nginx, gateways):
    ng = https_nginx()
    g = gateway(tmp_path, gateways, ng, f'{{mode: simple, caFile: "{pki / "ca.pem"}", sni: upstream.test}}')
    status, body = get(f"{g.url}/a")
    assert status == 200, body
    s = seen(body)
    assert s["tls"].startswith("TLSv1.") and s["sni"] == "upstream.test", s
    assert s["proto"] == "HTTP/1.1"
    # The connection is kept and reused.
    assert seen(get(f"{g.url}/b")[1])["reqs"] == "2"


def test_without_sni_the_endpoint_ip_is_verified(tmp_path, pki, https_nginx, gateways):
    ng = https_nginx()
    g = gateway(tmp_path, gateways, ng, f'{{mode: simple, caFile: "{pki / "ca.pem"}"}}')
    status, body = get(f"{g.url}/")
    assert status == 200, body
    assert seen(body)["sni"] == "", body  # no SNI is sent for an IP address


@pytest.mark.parametrize("tls, why", [
    # The test CA is not in the system trust store.
    ("{mode: simple, sni: upstream.test}", "UnknownIssuer"),
    # The certificate is not for this name.
    ('{mode: simple, caFile: "CA", sni: other.test}', 'not valid for name "other.test"'),
])
def test_an_upstream_that_fails_verification_is_never_called(tmp_path, pki, https_nginx, gateways, tls, why):
    ng = https_nginx()
    g = gateway(tmp_path, gateways, ng, tls.replace("CA", str(pki / "ca.pem")))
    status, body = get(f"{g.url}/")
    assert status == 502 and '"upstream_unavailable"' in body, body
    assert "upstream TLS handshake failed" in g.logs() and why in g.logs(), g.logs()
    assert "GET /" not in (ng.dir / "access.log").read_text()


def test_insecure_skip_verify_encrypts_without_verifying(tmp_path, pki, https_nginx, gateways):
    ng = https_nginx()
    g = gateway(tmp_path, gateways, ng, "{mode: simple, insecureSkipVerify: true}")
    status, body = get(f"{g.url}/")
    assert status == 200 and seen(body)["tls"].startswith("TLSv1."), body


def test_a_client_certificate_is_presented_to_an_upstream_that_asks(tmp_path, pki, https_nginx, gateways):
    ask = f"ssl_verify_client on; ssl_client_certificate {pki / 'ca.pem'};"
    ng = https_nginx(extra=ask)
    for d in ("without", "with"):
        (tmp_path / d).mkdir()
    without = gateway(tmp_path / "without", gateways, ng, f'{{mode: simple, caFile: "{pki / "ca.pem"}"}}')
    # nginx answers a request that came without a certificate with 400.
    assert get(f"{without.url}/")[0] == 400
    g = gateway(tmp_path / "with", gateways, ng,
                f'{{mode: simple, caFile: "{pki / "ca.pem"}", '
                f'certFile: "{pki / "client.pem"}", keyFile: "{pki / "client.key"}"}}')
    status, body = get(f"{g.url}/")
    assert status == 200, body
    assert seen(body)["client"] == "CN=client", body


def test_http2_upstream_over_tls_negotiates_h2_by_alpn(tmp_path, pki, https_nginx, gateways):
    ng = https_nginx(http2=True)
    g = gateway(tmp_path, gateways, ng, f'{{mode: simple, caFile: "{pki / "ca.pem"}", sni: upstream.test}}',
                protocol="http2")
    status, body = get(f"{g.url}/")
    assert status == 200, body
    assert seen(body)["proto"] == "HTTP/2.0", body


def test_bad_upstream_tls_config_is_explained(tmp_path, pki):
    out = validate_service(tmp_path, "s1", '\n  tls: {mode: simple, caFile: "/nonexistent/ca.pem"}')
    assert 'spec.tls.caFile: "/nonexistent/ca.pem" does not exist' in out, out
    out = validate_service(tmp_path, "s2", f'\n  tls: {{mode: simple, caFile: "{pki / "ca.key"}"}}')
    assert "spec.tls.caFile" in out and "no certificate" in out, out
    out = validate_service(tmp_path, "s3", f'\n  tls: {{mode: simple, certFile: "{pki / "client.pem"}"}}')
    assert "spec.tls.keyFile: certFile needs keyFile" in out, out
    out = validate_service(tmp_path, "s4", "\n  tls: {mode: mesh, sni: upstream.test}")
    assert "spec.tls.sni: only for mode: simple" in out, out
    out = validate_service(tmp_path, "s5", '\n  tls: {mode: simple, sni: "not a name"}')
    assert "spec.tls.sni" in out and "not a DNS name" in out, out
