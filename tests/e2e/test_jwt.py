"""The jwt filter end to end: tokens minted by PyJWT and jwcrypto, keys served by a real
JWKS endpoint (rotation, outage) or read from a file, checked by the real gateway in
front of a real backend. Every rejection is a JSON 401 the upstream never sees."""

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk as jwk_mod
from jwcrypto import jwt as jwt_mod

from harness import Gateway, Idp, api, curl, service

ISS = "https://idp.test"
REMOTE_ISS = "https://remote.test"
HS_SECRET = b"hs-secret-for-tests-0123456789abcdef"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_keys():
    keys = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }
    jwks = []
    for kid, k in keys.items():
        pem = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        j = json.loads(jwk_mod.JWK.from_pem(pem).export_public())
        j["kid"] = kid
        jwks.append(j)
    jwks.append({"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)})
    return keys, {"keys": jwks}


KEYS, JWKS = make_keys()

ALGS = {
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa", "PS256": "rsa", "PS384": "rsa", "PS512": "rsa",
    "ES256": "p256", "ES384": "p384", "EdDSA": "ed", "HS256": "hs", "HS384": "hs", "HS512": "hs",
}


def claims(**over):
    c = {"iss": ISS, "aud": "orders", "sub": "user-1", "exp": int(time.time()) + 300,
         "jti": str(uuid.uuid4()), "scope": "read write"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def mint(alg="RS256", kid=None, headers=None, **over):
    kid = kid or ALGS[alg]
    key = HS_SECRET if kid == "hs" else KEYS[kid]
    h = {"kid": kid}
    h.update(headers or {})
    return pyjwt.encode(claims(**over), key, algorithm=alg, headers=h)


def provider(issuer, jwks, extra=""):
    return (f"\n          - issuer: {issuer}\n            audiences: [orders]\n            jwks: {jwks}"
            f"\n            claimsToHeaders: {{sub: x-user-id, scope: x-scope}}{extra}")


def jwt_filter(providers, extra=""):
    return f"\n  filters:\n    - name: jwt\n      config:\n        leeway: 5s{extra}\n        providers:{providers}"


CONSUMER = f"""---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: bob}}
spec:
  groups: [partners]
  credentials:
    - {{type: jwt, issuer: "{ISS}", subject: bob}}
"""


@pytest.fixture(scope="module")
def idp():
    i = Idp()
    i.jwks = JWKS
    yield i
    i.stop()


@pytest.fixture
def gw(tmp_path, backend, gateways, idp):
    idp.status, idp.delay = 200, 0.0
    idp.jwks = JWKS
    file_provider = provider(ISS, "{file: keys.json}")
    remote = provider(REMOTE_ISS, f'{{uri: "{idp.url}/jwks.json", refresh: 2s, timeout: 1s}}')
    res = (service("up", backend) + CONSUMER
           + api("file", "/jwt/{*rest}", "{service: up}", extra=jwt_filter(file_provider + remote,
                                                                            "\n        query: access_token"))
           + api("only-bob", "/bob", "{service: up}",
                 extra=jwt_filter(file_provider, "\n        requireConsumer: true")
                 + "\n    - {name: acl, config: {allow: [partners]}}")
           + api("dead-idp", "/dead", "{service: up}",
                 extra=jwt_filter(provider(ISS, '{uri: "http://127.0.0.1:9/jwks.json", timeout: 500ms}'))))
    g = Gateway(tmp_path, res, start=False)
    (g.dir / "keys.json").write_text(json.dumps(JWKS))
    g.start()
    gateways.append(g)
    return g


def call(gw, token, path="/jwt/x", *extra):
    args = list(extra)
    if token is not None:
        args += ["-H", f"authorization: Bearer {token}"]
    return curl(*args, gw.url + path)


def assert_refused(gw, backend, token, path="/jwt/x", status=401, code="unauthorized"):
    before = backend.count()
    st, headers, body, _ = call(gw, token, path)
    assert st == status, body
    assert json.loads(body)["error"]["code"] == code
    assert headers["x-request-id"]
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")
    assert backend.count() == before, "a rejected request reached the upstream"
    return json.loads(body)["error"]["message"]


@pytest.mark.parametrize("alg", list(ALGS))
def test_every_algorithm_from_pyjwt(gw, alg):
    st, _, body, _ = call(gw, mint(alg))
    assert st == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-user-id"] == "user-1" and seen["x-scope"] == "read write"
    assert "authorization" not in seen


def test_tokens_from_jwcrypto(gw):
    for kid, alg in (("rsa", "PS384"), ("p256", "ES256"), ("ed", "EdDSA")):
        pem = KEYS[kid].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        key = jwk_mod.JWK.from_pem(pem)
        t = jwt_mod.JWT(header={"alg": alg, "kid": kid}, claims=claims())
        t.make_signed_token(key)
        st, _, body, _ = call(gw, t.serialize())
        assert st == 200, (alg, body)


def test_claim_headers_sent_by_the_client_are_replaced(gw):
    st, _, body, _ = call(gw, mint(), "/jwt/x", "-H", "x-user-id: admin")
    assert json.loads(body)["headers"]["x-user-id"] == "user-1"
    # Without a token the request is refused, so a forged header never arrives alone.


def test_token_in_query_is_removed(gw):
    st, _, body, _ = curl(f"{gw.url}/jwt/x?a=1&access_token={mint()}")
    assert st == 200, body
    assert json.loads(body)["query"] == "a=1"


def forge_hs_with_public_key():
    pem = KEYS["rsa"].public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def unsigned():
    head = b64(json.dumps({"alg": "none"}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


NEGATIVE = {
    "missing": lambda: None,
    "garbage": lambda: "not.a.token",
    "alg none": unsigned,
    "alg none (PyJWT)": lambda: pyjwt.encode(claims(), None, algorithm="none"),
    "HS256 with the RSA public key": forge_hs_with_public_key,
    "expired": lambda: mint(exp=int(time.time()) - 60),
    "not yet valid": lambda: mint(nbf=int(time.time()) + 120),
    "no exp": lambda: mint(exp=None),
    "wrong audience": lambda: mint(aud="billing"),
    "unknown issuer": lambda: mint(iss="https://evil.test"),
    "wrong key": lambda: pyjwt.encode(claims(), rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                      algorithm="RS256", headers={"kid": "rsa"}),
    "key of another type": lambda: pyjwt.encode(claims(), KEYS["p256"], algorithm="ES256", headers={"kid": "rsa"}),
    "unknown kid": lambda: pyjwt.encode(claims(), KEYS["rsa"], algorithm="RS256", headers={"kid": "nope"}),
    "crit": lambda: mint(headers={"crit": ["exp"]}),
    "tampered payload": lambda: (lambda t: t.split(".")[0] + "." + b64(json.dumps(claims(sub="admin")).encode())
                                 + "." + t.split(".")[2])(mint()),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_bad_tokens_are_401(gw, backend, case):
    assert_refused(gw, backend, NEGATIVE[case]())


def test_header_keys_are_never_fetched(gw, backend, idp):
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = json.loads(jwk_mod.JWK.from_pem(attacker.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).export_public())
    for h in ({"jku": f"{idp.url}/attacker-jwks"}, {"x5u": f"{idp.url}/attacker-cert"}, {"jwk": pub}):
        token = pyjwt.encode(claims(), attacker, algorithm="RS256", headers=h)
        assert_refused(gw, backend, token)
    assert idp.count("/attacker-jwks") == 0 and idp.count("/attacker-cert") == 0


def test_two_different_tokens_are_ambiguous(gw, backend):
    before = backend.count()
    st, _, body, _ = curl("-H", f"authorization: Bearer {mint()}", f"{gw.url}/jwt/x?access_token={mint()}")
    assert st == 401 and "ambiguous" in json.loads(body)["error"]["message"]
    assert backend.count() == before


def test_consumer_by_issuer_and_subject(gw, backend):
    st, _, body, _ = call(gw, mint(sub="bob"), "/bob")
    assert st == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-consumer-name"] == "bob" and seen["x-consumer-groups"] == "partners"
    msg = assert_refused(gw, backend, mint(sub="mallory"), "/bob")
    assert "consumer" in msg


def remote_token(kid="rsa", key=None, **over):
    return pyjwt.encode(claims(iss=REMOTE_ISS, **over), key or KEYS[kid], algorithm="RS256", headers={"kid": kid})


def test_remote_jwks_rotation(gw, backend, idp):
    assert call(gw, remote_token())[0] == 200
    # A new key is published and used at once: the unknown kid refetches the set
    # (no sooner than `refresh` after the last fetch).
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = json.loads(jwk_mod.JWK.from_pem(new.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).export_public())
    pub["kid"] = "rsa-2"
    idp.jwks = {"keys": JWKS["keys"] + [pub]}
    time.sleep(2.2)
    st, _, body, _ = call(gw, remote_token("rsa-2", new))
    assert st == 200, body
    # The old key is retired: after the refresh interval, its tokens stop working.
    idp.jwks = {"keys": [pub]}
    time.sleep(2.2)
    statuses = []
    for _ in range(20):
        statuses.append(call(gw, remote_token())[0])
        if statuses[-1] == 401:
            break
        time.sleep(0.2)
    assert statuses[-1] == 401, statuses


def test_remote_jwks_outage_keeps_last_good_keys(gw, backend, idp):
    assert call(gw, remote_token())[0] == 200
    fetches = idp.count("/jwks.json")
    idp.status = 503
    time.sleep(2.2)
    for _ in range(5):
        # Fresh tokens (new jti), so this is not the verdict cache answering.
        st, _, body, _ = call(gw, remote_token())
        assert st == 200, body
        time.sleep(0.1)
    assert idp.count("/jwks.json") > fetches, "the refresh was never attempted"


def test_no_keys_at_all_is_503(gw, backend):
    assert_refused(gw, backend, mint(), "/dead", status=503, code="no_healthy_upstream")


def test_each_token_is_verified_once(gw, backend, idp):
    """The verdict cache: a token verified once is answered from memory; the same
    token with a flipped signature bit is still refused (the cache keys the whole token)."""
    t = mint("RS512")
    for _ in range(3):
        assert call(gw, t)[0] == 200
    head, body, sig = t.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 1
    assert_refused(gw, backend, f"{head}.{body}.{b64(bytes(raw))}")


def test_symmetric_keys_are_redacted_in_config(tmp_path, backend, gateways):
    jwks = {"keys": [{"kty": "oct", "kid": "hs", "k": b64(HS_SECRET)}]}
    g = Gateway(tmp_path, service("up", backend) + api(
        "inline", "/inline", "{service: up}",
        extra=jwt_filter(provider(ISS, "{inline: " + json.dumps(jwks) + "}"))))
    gateways.append(g)
    assert call(g, mint("HS256"), "/inline")[0] == 200
    _, cfg = g.admin("GET", "/config")
    assert b64(HS_SECRET) not in cfg and "<redacted>" in cfg
