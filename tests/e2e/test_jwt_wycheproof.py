"""Every Wycheproof JSON Web Signature vector whose key uses an algorithm meshgate
supports, sent through the real gateway: valid vectors must pass (200), invalid ones
must be refused (401) and never reach the upstream.

The vectors' payloads are opaque bytes, not JWT claim sets, so each group's Api uses a
provider with `payload: any` (signature-only, documented in docs/security.md); the
header, key-selection and signature rules are exactly those of ordinary JWTs."""

import http.client
import json
import os
from pathlib import Path

import pytest

from harness import ROOT, Gateway, api, service

TESTDATA = Path(os.environ.get("MESHGATE_TESTDATA", ROOT.parent / "shared" / "testdata"))
VECTORS = TESTDATA / "wycheproof" / "json_web_signature_test.json"
SUPPORTED = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
             "HS256", "HS384", "HS512"}
PRIVATE = {"d", "p", "q", "dp", "dq", "qi"}
# A second, unrelated key, so that a group whose only key may not verify (use: enc)
# still makes a valid key set; no vector names its kid.
# Vectors whose label is wrong upstream (Wycheproof's own Java JWS test and other
# suites exclude the same ones). Each is still checked, against what meshgate does and why.
DEFECTIVE = {
    # Byte-identical to the valid tcId 357: the padding the name speaks of is absent.
    "invalidBase64Padding": 200,
    "invalidBase64PaddingInPayload": 200,
    # A '?' inside base64url: RFC 7515 section 2 base64url has no such character.
    "InvalidCharacterInsertedInHeader": 401,
    "InvalidCharacterInsertedInPayload": 401,
    # RFC 7520 figure 20 signs with PS384 under a key whose "alg" is PS256; a key's
    # declared alg binds it (the same rule that refuses RS256 under a PS512 key).
    "Figure20": 401,
}
FILLER = {"kty": "oct", "kid": "meshgate-filler", "alg": "HS256", "k": "c2VjcmV0LWZpbGxlci1rZXktMDEyMzQ1Njc4OWFi"}


def groups():
    if not VECTORS.exists():
        raise FileNotFoundError(f"{VECTORS} is missing: set MESHGATE_TESTDATA to the shared testdata folder")
    data = json.loads(VECTORS.read_text())
    out = []
    for g in data["testGroups"]:
        key = dict(g.get("public") or g["private"])
        if key.get("kty") != "oct":
            key = {k: v for k, v in key.items() if k not in PRIVATE}
        if key.get("alg") is not None and key["alg"] not in SUPPORTED:
            continue
        out.append((key, g["tests"]))
    return out


GROUPS = groups()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, backend_module):
    tmp = tmp_path_factory.mktemp("wycheproof")
    res = service("up", backend_module)
    for i, (key, _) in enumerate(GROUPS):
        jwks = json.dumps({"keys": [key, FILLER]})
        res += api(f"g{i}", f"/g{i}", "{service: up}", extra=(
            "\n  filters:\n    - name: jwt\n      config:\n        providers:"
            f"\n          - {{payload: any, jwks: {{inline: {jwks}}}}}"))
    g = Gateway(tmp, res)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def backend_module():
    from harness import Backend
    b = Backend("wp")
    yield b
    b.stop()


def test_vectors(gw, backend_module):
    assert len(GROUPS) >= 20
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    wrong = []
    counted = {"valid": 0, "invalid": 0}
    for i, (_, tests) in enumerate(GROUPS):
        for t in tests:
            jws = t["jws"] if isinstance(t["jws"], str) else json.dumps(t["jws"], separators=(",", ":"))
            before = backend_module.count()
            conn.request("GET", f"/g{i}", headers={"authorization": f"Bearer {jws}"})
            r = conn.getresponse()
            body = r.read()
            want = DEFECTIVE.get(t["comment"], 200 if t["result"] == "valid" else 401)
            counted["valid" if want == 200 else "invalid"] += 1
            reached = backend_module.count() - before
            if r.status != want or reached != (1 if want == 200 else 0):
                wrong.append((t["tcId"], t["comment"], t["result"], r.status, body[:120]))
    conn.close()
    assert not wrong, f"{len(wrong)} vectors mishandled: {wrong[:10]}"
    assert counted["valid"] >= 40 and counted["invalid"] >= 300, counted
