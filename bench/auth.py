#!/usr/bin/env python3
"""What authentication costs: meshgate proxying plainly, with key-auth, and with jwt
(RS256), beside nginx proxying plainly, in the same run (method: shared/BENCHMARKING.md).

Each round measures every route in turn; the figure is requests per proxy CPU-second,
as the median of per-round ratios against plain meshgate (the filter's cost) and
against nginx. Targets (issue 3): key-auth costs at most 10%, jwt at most 20%.

Usage: .venv/bin/python bench/auth.py [--rounds 3] [--duration 10]
(the venv has PyJWT and cryptography, used to mint the benchmark's token)
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the shared helpers: start, measure, wrk, the nginx config)

import jwt as pyjwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from jwcrypto import jwk  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def config(jwks):
    """A Consumer and the two auth Apis, added to run.py's plain config."""
    return f"""---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{{{name: bench}}}}
spec:
  groups: [bench]
  credentials: [{{{{type: key, key: {KEY}}}}}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{{{name: key}}}}
spec:
  request: {{{{path: "/key/{{{{*rest}}}}"}}}}
  filters: [{{{{name: key-auth}}}}]
  invoke: {{{{service: backend}}}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{{{name: jwt}}}}
spec:
  request: {{{{path: "/jwt/{{{{*rest}}}}"}}}}
  filters:
    - name: jwt
      config:
        providers:
          - issuer: https://idp.bench
            audiences: [bench]
            algorithms: [RS256]
            jwks: {{{{inline: {json.dumps(jwks).replace("{", "{{").replace("}", "}}")}}}}}
            claimsToHeaders: {{{{sub: x-user-id}}}}
  invoke: {{{{service: backend}}}}
"""


def main():
    a = run.bench_args(__doc__)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = json.loads(jwk.JWK.from_pem(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).export_public())
    pub["kid"] = "bench"
    token = pyjwt.encode({"iss": "https://idp.bench", "aud": "bench", "sub": "user-1",
                          "exp": int(time.time()) + 3600}, private, algorithm="RS256", headers={"kid": "bench"})
    run.filter_bench(config({"keys": [pub]}), [
        ("meshgate key-auth", "/key/x", (f"x-api-key: {KEY}",)),
        ("meshgate jwt RS256", "/jwt/x", (f"authorization: Bearer {token}",)),
    ], a)


if __name__ == "__main__":
    main()
