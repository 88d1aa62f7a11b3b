#!/usr/bin/env python3
"""The control plane at scale: one `meshgate control` (embedded store) holding
10,000 Apis, with 1,000 simulated proxies (`push-fleet`), each on its own push stream
and TCP connection. One Api is changed several times; for each change it reports how
long until every proxy received it and until the control plane recorded every ACK,
and the bytes sent per proxy (a delta) against the snapshot each proxy got first.
It also reports the control plane's memory: idle with the config loaded, then with
the fleet connected, and its peak.

The control plane runs alone on CPU 0; the fleet runs on CPU 1 (shared/BENCHMARKING.md).
The target (issue 5): every proxy ACKs a one-Api change within 2 s.

Usage: bench/push_scale.py [--apis 10000] [--nodes 1000] [--changes 5] [--no-build]
(run from the repository root)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, free_port, start, wait_port  # noqa: E402

TOKEN = "scale-bench-token"


def status_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def write_config(d, apis):
    """A Gateway and `apis` Apis, each with a filter and a mock, in 10 files."""
    (d / "gateway.yaml").write_text("""apiVersion: meshgate.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  listeners: [{name: web, address: "127.0.0.1:8080"}]
""")
    per_file = max(1, apis // 10)
    for f in range(0, apis, per_file):
        docs = []
        for i in range(f, min(apis, f + per_file)):
            docs.append(f"""apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: api-{i:05d}, labels: {{team: team-{i % 50}}}}}
spec:
  request: {{path: "/svc-{i % 100}/v1/items-{i}/{{id}}", methods: [GET]}}
  filters:
    - {{name: transform, config: {{request: {{headers: {{set: {{x-api: api-{i:05d}}}}}}}}}}}
  invoke: {{mock: {{status: 200, body: {{api: {i}, version: 1}}}}}}
""")
        (d / f"apis-{f:05d}.yaml").write_text("---\n".join(docs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--apis", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--debug", action="store_true", help="use the debug build (to try the bench)")
    a = ap.parse_args()
    if not a.no_build:
        release = [] if a.debug else ["--release"]
        subprocess.run(["cargo", "build", *release, "-q", "-p", "meshgate"], cwd=ROOT, check=True)
    bin_dir = ROOT / "target" / ("debug" if a.debug else "release")
    env = dict(os.environ, MESHGATE_ADMIN_TOKEN=TOKEN, MESHGATE_LOG="warn")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config").mkdir()
        write_config(tmp / "config", a.apis)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        control = start([str(bin_dir / "meshgate"), "control", "--listen", f"127.0.0.1:{port}",
                         "--store", str(tmp / "control.redb"), "--state-dir", str(tmp / "state")],
                        0, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "control.log", "w"))
        fleet = None
        try:
            wait_port(port)
            t = time.time()
            p = subprocess.run([str(bin_dir / "meshgate"), "ctl", "--server", url, "apply",
                                "-f", str(tmp / "config"), "-m", "scale bench"],
                               env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"apply failed: {p.stderr}")
            apply_s = time.time() - t
            time.sleep(1)
            idle = status_kib(control.pid, "VmRSS")
            fleet = start([str(bin_dir / "push-fleet"), "--control", url, "--nodes", str(a.nodes),
                           "--api", "api-00042", "--changes", str(a.changes)],
                          1, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = fleet.communicate(timeout=1200)
            if fleet.returncode != 0:
                sys.exit(f"push-fleet failed ({fleet.returncode}): {err}\n{(tmp / 'control.log').read_text()[-3000:]}")
            report = json.loads(out)
            connected = status_kib(control.pid, "VmRSS")
            peak = status_kib(control.pid, "VmHWM")
        finally:
            if fleet and fleet.poll() is None:
                fleet.kill()
            control.terminate()
            control.wait(30)

    changes = report["changes"]
    print(f"\ncontrol plane: {a.apis} Apis (one write of the whole config: {apply_s:.1f} s), "
          f"{report['nodes']} proxy streams (all synced in {report['syncSeconds']} s)\n")
    print("| change | revision | write ms | all received ms | all ACKs recorded ms | bytes per proxy | bytes, all proxies |")
    print("|---|---|---|---|---|---|---|")
    for i, c in enumerate(changes, 1):
        print(f"| {i} | {c['revision']} | {c['writeMs']} | {c['allReceivedMs']} | {c['allAckedMs']} "
              f"| {c['bytesPerProxy']:,} | {c['bytesTotal']:,} |")
    worst = max(c["allAckedMs"] for c in changes)
    snap = report["snapshotBytesPerProxy"]
    delta = max(c["bytesPerProxy"] for c in changes)
    print(f"\nsnapshot per proxy: {snap:,} bytes; a one-Api change: {delta:,} bytes per proxy "
          f"({snap / max(delta, 1):,.0f}x smaller)")
    print(f"control plane RSS: {mib(idle)} idle with the config, {mib(connected)} with "
          f"{report['nodes']} streams, peak {mib(peak)}")
    verdict = "met" if worst <= 2000 else "MISSED"
    print(f"target: every proxy ACKs a one-Api change within 2,000 ms: worst {worst} ms, {verdict}")


if __name__ == "__main__":
    main()
