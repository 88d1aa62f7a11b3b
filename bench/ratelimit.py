#!/usr/bin/env python3
"""What rate limiting costs: meshgate plain, with a local rate-limit, with two local
limits, and with a cluster limit through a real redis-server, beside nginx plain, in
the same run (method: shared/BENCHMARKING.md). The limits are set high enough never
to refuse, so every request pays the full check and carries the RateLimit headers.

Target (issue 4): the local rate-limit costs at most 5% of plain requests per proxy
CPU-second. The cluster scope adds one Redis round trip per request; its cost is
reported, not targeted (Redis shares CPU 1 with the backend and wrk).

Usage: python3 bench/ratelimit.py [--rounds 3] [--duration 10]
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the shared helpers)


def api(name, filters):
    return f"""---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{{{name: {name}}}}}
spec:
  request: {{{{path: "/{name}/{{{{*rest}}}}"}}}}
  filters: [{filters}]
  invoke: {{{{service: backend}}}}
"""


CONFIG = (
    api("local", '{{name: rate-limit, config: {{key: ip, rate: "10000000/s"}}}}')
    + api("two", '{{name: rate-limit, config: {{key: ip, limits: [{{rate: "10000000/s"}}, {{rate: "1000000000/h"}}]}}}}')
    + api("cluster", '{{name: rate-limit, config: {{scope: cluster, key: ip, rate: "10000000/s", '
          'redis: {{url: "redis://127.0.0.1:{redis}"}}}}}}')
)


def main():
    a = run.bench_args(__doc__)
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    run.filter_bench(CONFIG, [
        ("meshgate rate-limit local", "/local/x", ()),
        ("meshgate two local limits", "/two/x", ()),
        ("meshgate rate-limit cluster", "/cluster/x", ()),
    ], a, services={"redis": lambda port: [redis, "--port", str(port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no"]})


if __name__ == "__main__":
    main()
