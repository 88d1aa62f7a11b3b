#!/usr/bin/env python3
"""What a sidecar costs: latency added over calling the backend directly, and idle
memory per sidecar, with nginx as a one-hop reference in the same run.

Paths, each measured with wrk -t1 at 1 and at 10 connections, alternating round by
round:

  direct     wrk -> backend
  nginx      wrk -> nginx (proxy_pass, keep-alive) -> backend
  outbound   wrk -> sidecar A outbound (Host: local) -> backend              (one sidecar)
  outbound-busy  the same through sidecar A2, which busy-polls for 50 us after each send
             (MESHGATE_BUSY_POLL_US=50, ADR 0008)
  mesh       wrk -> sidecar A outbound (Host: echo) -> sidecar B inbound -> backend
  mesh-mtls  the same over mesh mTLS (Host: echo-tls, sidecar C, tls mode mesh)
  fused      wrk -> sidecar B, Gateway "public" (BFF mode) -> backend
  two-hop    wrk -> edge proxy -> sidecar B inbound -> backend

A control plane holds the config; sidecar B registers as service `echo`, which
sidecar A and the edge proxy find through the registry. Proxies have one worker each
(MESHGATE_WORKERS=1), access logs off. Every path is measured in two layouts, one
after the other, the processes moved between cores with `taskset -ap`:

  split      shared/BENCHMARKING.md's: every proxy on CPU 0; backend, control plane
             and wrk on CPU 1. "direct" is then a ping-pong within one core, and
             each hop adds the wake-ups of the other core.
  by-node    each process on the core of what it runs beside, as if the two cores
             were two nodes: wrk (the calling app), its sidecars A and A2, nginx in
             their place, the edge proxy and the control plane on CPU 1; the backend
             (the called service) and its sidecars B and C on CPU 0. "direct" then
             crosses cores as a call to another node does, and a hop adds what the
             proxy itself costs beside its app.

Idle RSS is read after start-up with the config, before any load, for the bench's
sidecars and for one sidecar with the default runtime (a worker per core).

Targets (issue 6): <= 100 us added p50 for the sidecar outbound path, <= 15 MiB
idle RSS per sidecar.

Usage: bench/sidecar.py [--rounds 3] [--duration 10] [--no-build]   (from the repository root)
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import NGINX_CONF, ROOT, bench_args, cpu_seconds, free_port, rss_mib, start, tree, wait_port, wrk  # noqa: E402

BUSY_POLL_US = "50"

TOKEN = "sidecar-bench-token"

CONFIG = """apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: echo}}
spec: {{discovery: {{registry: echo}}}}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: echo-tls}}
spec: {{discovery: {{registry: echo-tls}}, tls: {{mode: mesh}}}}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: local}}
spec: {{endpoints: [{{address: "127.0.0.1:{backend}"}}]}}
---
apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: public}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{public}"}}]
  accessLog: {{path: "off"}}
---
apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{edge}"}}]
  admin: {{address: "127.0.0.1:{edge_admin}"}}
  accessLog: {{path: "off"}}
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: pub}}
spec:
  gateways: [public, edge]
  request: {{path: "/{{*rest}}"}}
  invoke: {{service: echo}}
"""

def memory(pid):
    """RSS, PSS and anonymous memory of one process, in MiB. Most of a meshgate
    process's RSS is its binary's code, mapped from the file and shared by every
    process running the same binary; PSS splits shared pages between them."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        fields[k] = int(v.split()[0]) / 1024
    return fields.get("Rss", 0.0), fields.get("Pss", 0.0), fields.get("Anonymous", 0.0)


def call(url, method="GET", body=None):
    req = urllib.request.Request(url, method=method, data=body)
    req.add_header("authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def main():
    a = bench_args(__doc__, conns=False)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/setup.sh")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshgate"], cwd=ROOT, check=True)
    rel = a.bin_dir
    mg = str(rel / "meshgate")
    tmp = Path(tempfile.mkdtemp(prefix="meshgate-sidecar-bench-"))
    procs = []
    env = dict(os.environ, MESHGATE_ADMIN_TOKEN=TOKEN, MESHGATE_NODE_TOKEN=TOKEN,
               MESHGATE_WORKERS="1", MESHGATE_LOG="warn")
    try:
        p = {k: free_port() for k in ("backend", "control", "public", "edge", "edge_admin", "nginx")}
        procs.append(start([str(rel / "bench-backend"), f"127.0.0.1:{p['backend']}"], 1))
        control = f"http://127.0.0.1:{p['control']}"
        procs.append(start([mg, "control", "--listen", f"127.0.0.1:{p['control']}",
                            "--store", str(tmp / "control.redb"), "--state-dir", str(tmp / "cs")],
                           1, env=env, stdout=subprocess.DEVNULL))
        wait_port(p["backend"])
        wait_port(p["control"])
        files = {"files": [{"name": "bench.yaml", "text": CONFIG.format(**p)}]}
        call(f"{control}/api/v1/apply", "POST", json.dumps(files).encode())

        def sidecar(name, service, app, extra=(), workers="1", more_env=None):
            ports = {k: free_port() for k in ("inbound", "outbound", "admin")}
            e = dict(env, MESHGATE_WORKERS=workers) if workers else {k: v for k, v in env.items() if k != "MESHGATE_WORKERS"}
            e.update(more_env or {})
            proc = start([mg, "proxy", "--role", "sidecar", "--control", control, "--node", name,
                          "--service", service, "--app", app,
                          "--inbound", f"127.0.0.1:{ports['inbound']}",
                          "--outbound", f"127.0.0.1:{ports['outbound']}",
                          "--admin", f"127.0.0.1:{ports['admin']}", *extra,
                          "--cache-dir", str(tmp / f"cache-{name}"), "--state-dir", str(tmp / f"st-{name}")],
                         0, env=e, stdout=subprocess.DEVNULL)
            procs.append(proc)
            wait_port(ports["admin"])
            return proc, ports

        b, b_ports = sidecar("b", "echo", f"127.0.0.1:{p['backend']}", ("--gateway", "public"))
        c, _ = sidecar("c", "echo-tls", f"127.0.0.1:{p['backend']}")
        s, s_ports = sidecar("a", "client", "127.0.0.1:1")
        sb, sb_ports = sidecar("a2", "client-busy", "127.0.0.1:1", more_env={"MESHGATE_BUSY_POLL_US": BUSY_POLL_US})
        d, _ = sidecar("default-runtime", "idle", "127.0.0.1:1", workers=None)
        edge = start([mg, "proxy", "--control", control, "--node", "edge", "--gateway", "edge",
                      "--cache-dir", str(tmp / "cache-edge"), "--state-dir", str(tmp / "st-edge")],
                     0, env=env, stdout=subprocess.DEVNULL)
        procs.append(edge)
        # The main bench's nginx, its HTTP/2 port unused here.
        (tmp / "nginx.conf").write_text(
            NGINX_CONF.format(dir=tmp, backend=p["backend"], h1=p["nginx"], h2=free_port()))
        ng = start([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(tmp / "nginx.conf"),
                    "-e", str(tmp / "error.log")], 0)
        procs.append(ng)
        for port in (p["public"], p["edge"], p["nginx"], s_ports["outbound"], sb_ports["outbound"]):
            wait_port(port)
        time.sleep(1.0)
        idle = {"sidecar A (1 worker)": memory(s.pid), "sidecar B (1 worker, BFF)": memory(b.pid),
                "sidecar, default runtime": memory(d.pid), "edge proxy (1 worker)": memory(edge.pid)}
        nginx_rss = rss_mib(ng.pid)
        out = f"http://127.0.0.1:{s_ports['outbound']}/"
        # Each path with the proxy processes it crosses, whose CPU time is measured.
        paths = [
            ("direct", f"http://127.0.0.1:{p['backend']}/", (), ()),
            ("nginx", f"http://127.0.0.1:{p['nginx']}/", (), (ng,)),
            ("outbound", out, ("Host: local",), (s,)),
            ("outbound-busy", f"http://127.0.0.1:{sb_ports['outbound']}/", ("Host: local",), (sb,)),
            ("mesh", out, ("Host: echo",), (s, b)),
            ("mesh-mtls", out, ("Host: echo-tls",), (s, c)),
            ("fused", f"http://127.0.0.1:{p['public']}/", (), (b,)),
            ("two-hop", f"http://127.0.0.1:{p['edge']}/", (), (edge, b)),
        ]
        # The core of every process in each layout (wrk is always on CPU 1).
        backend = procs[0]
        layouts = {
            "split": {backend: 1, s: 0, sb: 0, ng: 0, edge: 0, b: 0, c: 0},
            "by-node": {backend: 0, b: 0, c: 0, s: 1, sb: 1, ng: 1, edge: 1},
        }
        for layout, cpus in layouts.items():
            for proc, cpu in cpus.items():
                pin(proc, cpu)
            print(f"layout {layout}", flush=True)
            report(layout, paths, measure(paths, a.rounds, a.duration))
        print("| process, idle | RSS MiB | PSS MiB | anonymous MiB |")
        print("|---|---|---|---|")
        for name, (rss, pss, anon) in idle.items():
            print(f"| {name} | {rss:.1f} | {pss:.1f} | {anon:.1f} |")
        print(f"| nginx (master + worker) | {nginx_rss:.1f} | | |")
    finally:
        # The proxies first, waited for, so that the sidecars deregister from a control
        # plane still running; then the control plane and the backend (started first).
        for group in (procs[2:], procs[:2]):
            stop(group)
        shutil.rmtree(tmp, ignore_errors=True)


def pin(proc, cpu):
    """Move a process, all its threads and its children (nginx's worker) to one CPU."""
    for pid in tree(proc.pid):
        subprocess.run(["taskset", "-apc", str(cpu), str(pid)], check=True, capture_output=True)


def measure(paths, rounds, duration):
    """wrk over every path at 1 and 10 connections, round by round, after a warm-up
    in which every path must answer 200."""
    for name, url, h, _ in paths:
        r = wrk(url, 10, 2, h)
        if r["errors"] or r["requests"] == 0:
            sys.exit(f"{name}: {url} answered non-2xx during warm-up")
    results = {(n, c): [] for n, *_ in paths for c in (1, 10)}
    for rnd in range(rounds):
        for conns in (1, 10):
            for name, url, h, proxies in paths:
                cpu0 = sum(cpu_seconds(x.pid) for x in proxies)
                r = wrk(url, conns, duration, h)
                cpu = sum(cpu_seconds(x.pid) for x in proxies) - cpu0
                r["per_cpu_s"] = r["requests"] / cpu if proxies and cpu > 0 else 0.0
                results[(name, conns)].append(r)
                print(f"round {rnd + 1} c{conns:<2} {name:13} {r['rps']:>8.0f} req/s  p50 {r['p50'] * 1000:7.0f} us  "
                      f"p99 {r['p99'] * 1000:7.0f} us  {r['per_cpu_s']:>8.0f} req/proxy-CPU-s  "
                      f"errors {r['errors']}", flush=True)
    return results


def report(layout, paths, results):
    """The table of one layout: medians over rounds; added latency as the median of
    per-round differences to the direct path."""
    print()
    print(f"| path ({layout}) | conns | req/s | p50 us | p99 us | added p50 over direct, us "
          "| added p99, us | req per proxy CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for conns in (1, 10):
        base = results[("direct", conns)]
        for name, *_ in paths:
            rs = results[(name, conns)]
            med = lambda k: statistics.median(x[k] for x in rs) * 1000
            added = statistics.median(r["p50"] - b["p50"] for r, b in zip(rs, base)) * 1000
            added99 = statistics.median(r["p99"] - b["p99"] for r, b in zip(rs, base)) * 1000
            rps = statistics.median(x["rps"] for x in rs)
            per_cpu = statistics.median(x["per_cpu_s"] for x in rs)
            print(f"| {name} | {conns} | {rps:,.0f} | {med('p50'):.0f} | {med('p99'):.0f} | "
                  f"{added:.0f} | {added99:.0f} | {f'{per_cpu:,.0f}' if per_cpu else '—'} |")
    print()


def stop(procs):
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
