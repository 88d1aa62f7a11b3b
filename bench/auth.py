#!/usr/bin/env python3
"""What authentication costs: meshgate proxying plainly, with key-auth, and with jwt
(RS256), beside nginx proxying plainly, in the same run (method: shared/BENCHMARKING.md).

Each round measures every route in turn; the figure is requests per proxy CPU-second,
as the median of per-round ratios against plain meshgate (the filter's cost) and
against nginx. Targets (issue 3): key-auth costs at most 10%, jwt at most 20%.

Usage: .venv/bin/python bench/auth.py [--rounds 3] [--duration 10]
(the venv has PyJWT and cryptography, used to mint the benchmark's token)
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the shared helpers: start, measure, wrk, the nginx config)

import jwt as pyjwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from jwcrypto import jwk  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def config(port, backend, jwks):
    """run.py's plain config (one catch-all Api), plus a Consumer and the two auth Apis."""
    return run.MESHGATE_CONF.format(port=port, backend=backend) + f"""---
apiVersion: meshgate.io/v1
kind: Consumer
metadata: {{name: bench}}
spec:
  groups: [bench]
  credentials: [{{type: key, key: {KEY}}}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: key}}
spec:
  request: {{path: "/key/{{*rest}}"}}
  filters: [{{name: key-auth}}]
  invoke: {{service: backend}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: jwt}}
spec:
  request: {{path: "/jwt/{{*rest}}"}}
  filters:
    - name: jwt
      config:
        providers:
          - issuer: https://idp.bench
            audiences: [bench]
            algorithms: [RS256]
            jwks: {{inline: {json.dumps(jwks)}}}
            claimsToHeaders: {{sub: x-user-id}}
  invoke: {{service: backend}}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshgate"], cwd=run.ROOT, check=True)
    rel = run.ROOT / "target" / "release"
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = json.loads(jwk.JWK.from_pem(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).export_public())
    pub["kid"] = "bench"
    token = pyjwt.encode({"iss": "https://idp.bench", "aud": "bench", "sub": "user-1",
                          "exp": int(time.time()) + 3600}, private, algorithm="RS256", headers={"kid": "bench"})
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-bench-auth-"))
    procs = []
    try:
        backend = run.free_port()
        procs.append(run.start([str(rel / "bench-backend"), f"127.0.0.1:{backend}"], 1))
        run.wait_port(backend)
        port = run.free_port()
        (tmp / "mg.yaml").write_text(config(port, backend, {"keys": [pub]}))
        env = dict(os.environ, MESHGATE_WORKERS="1", MESHGATE_LOG="warn")
        mg = run.start([str(rel / "meshgate"), "run", "-c", str(tmp / "mg.yaml")], 0, env=env,
                       stdout=subprocess.DEVNULL)
        procs.append(mg)
        run.wait_port(port)
        ng_h1, ng_h2 = run.free_port(), run.free_port()
        (tmp / "nginx.conf").write_text(run.NGINX_CONF.format(dir=tmp, backend=backend, h1=ng_h1, h2=ng_h2))
        ng = run.start([nginx, "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")], 0)
        procs.append(ng)
        run.wait_port(ng_h1)
        base = f"http://127.0.0.1:{port}"
        routes = [
            ("nginx plain", ng, f"http://127.0.0.1:{ng_h1}/plain/x", ()),
            ("meshgate plain", mg, f"{base}/plain/x", ()),
            ("meshgate key-auth", mg, f"{base}/key/x", (f"x-api-key: {KEY}",)),
            ("meshgate jwt RS256", mg, f"{base}/jwt/x", (f"authorization: Bearer {token}",)),
        ]
        for _, _, url, h in routes:  # warm-up, and a check that every route answers 200
            r = run.wrk(url, a.conns, 2, h)
            if r["errors"]:
                sys.exit(f"{url} answered non-2xx during warm-up")
        results = {name: [] for name, *_ in routes}
        for rnd in range(a.rounds):
            for name, proc, url, h in routes:
                r = run.measure({"proc": proc}, "h1", url, a.conns, a.duration, h)
                results[name].append(r)
                print(f"round {rnd + 1} {name:20} {r['rps']:>9.0f} req/s  {r['per_cpu_s']:>9.0f} req/CPU-s  "
                      f"p99 {r['p99']:.2f} ms  errors {r['errors']}", flush=True)
        print()
        print(f"| route (HTTP/1.1 c{a.conns}) | req/s | req per proxy CPU-s | vs meshgate plain | vs nginx | p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, *_ in routes:
            rs = results[name]
            vs_plain = statistics.median(r["per_cpu_s"] / p["per_cpu_s"] for r, p in zip(rs, results["meshgate plain"]))
            vs_nginx = statistics.median(r["per_cpu_s"] / p["per_cpu_s"] for r, p in zip(rs, results["nginx plain"]))
            med = lambda k: statistics.median(x[k] for x in rs)
            print(f"| {name} | {med('rps'):,.0f} | {med('per_cpu_s'):,.0f} | {vs_plain:.2f} | {vs_nginx:.2f} | "
                  f"{med('p99'):.2f} |")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, 15)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
