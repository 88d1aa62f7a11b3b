#!/usr/bin/env python3
"""meshgate beside nginx, same machine, same run (method: shared/BENCHMARKING.md).

Both proxies run one worker pinned to CPU 0, logs off, HTTP/1.1 keep-alive to the
same one-thread backend; the backend and the load generator share CPU 1. Rounds
alternate meshgate and nginx; the figure to compare is requests per proxy
CPU-second (utime+stime from /proc), reported as the median of per-round ratios.

Usage: bench/run.py [--rounds 3] [--duration 10] [--bin-dir DIR]   (run from the repository root)
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"port {port} never opened")


def start(cmd, cpu, **kw):
    p = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], start_new_session=True, **kw)
    try:  # shield the measured process from other sessions' load (needs root)
        Path(f"/proc/{p.pid}/autogroup").write_text("-15")
    except OSError:
        pass
    return p


def tree(pid):
    """pid and its descendants (nginx master + worker)."""
    out = [pid]
    try:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except OSError:
        kids = []
    for k in kids:
        out += tree(int(k))
    return out


def cpu_seconds(pid):
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICK


def rss_mib(pid):
    total = 0
    for p in tree(pid):
        try:
            m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total / 1024


def others_cpu():
    """Jiffies of all processes on the machine, to report background load."""
    return sum(int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:4]) / TICK


def parse_ms(v):
    v = v.strip()
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)


def wrk(url, conns, duration, headers=()):
    extra = [a for h in headers for a in ("-H", h)]
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", *extra, url],
        capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = parse_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = parse_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "requests": total, "p50": p50, "p99": p99, "errors": int(errors.group(1)) if errors else 0}


def h2load(url, duration):
    out = subprocess.run(
        ["taskset", "-c", "1", "h2load", "-t1", "-c10", "-m10", "-D", str(duration), url],
        capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))
    m = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {"rps": rps, "requests": done, "p50": parse_ms(m.group(3)) if m else 0, "p99": 0.0, "errors": 0}


def measure(target, kind, url, conns, duration, headers=()):
    pid = target["proc"].pid
    c0, o0 = cpu_seconds(pid), others_cpu()
    r = wrk(url, conns, duration, headers) if kind == "h1" else h2load(url, duration)
    c1, o1 = cpu_seconds(pid), others_cpu()
    r["cpu"] = c1 - c0
    r["per_cpu_s"] = r["requests"] / max(r["cpu"], 1e-6)
    r["machine_cpu"] = o1 - o0
    return r


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

MESHGATE_CONF = """apiVersion: meshgate.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  listeners: [{{name: web, address: "127.0.0.1:{port}"}}]
  accessLog: {{path: "off"}}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {{name: backend}}
spec:
  endpoints: [{{address: "127.0.0.1:{backend}"}}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {{name: all}}
spec:
  request: {{path: "/{{*rest}}"}}
  invoke: {{service: backend}}
"""


class Lab:
    """The processes of one run: the backend (and any `services`) on CPU 1, meshgate
    and nginx on CPU 0. `extra_config` is YAML appended to the plain meshgate config,
    formatted with the ports of `backend` and each service (name -> command line
    taking the port). Stops everything it started, by process group, on exit."""

    def __init__(self, a, extra_config="", services=()):
        self.a, self.extra_config, self.services = a, extra_config, dict(services)
        self.procs = []
        self.tmp = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self):
        for tool in ("wrk", "h2load", "taskset"):
            if not shutil.which(tool):
                sys.exit(f"{tool} is missing: run scripts/setup.sh")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not self.a.no_build:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "meshgate"], cwd=ROOT, check=True)
        rel = self.a.bin_dir
        tmp = self.tmp
        ports = {"backend": free_port()}
        self.procs.append(start([str(rel / "bench-backend"), f"127.0.0.1:{ports['backend']}"], 1))
        for name, cmd in self.services.items():
            ports[name] = free_port()
            self.procs.append(start(cmd(ports[name]), 1, stdout=subprocess.DEVNULL))
        for port in ports.values():
            wait_port(port)
        self.mg_port = free_port()
        conf = MESHGATE_CONF.format(port=self.mg_port, backend=ports["backend"])
        (tmp / "mg.yaml").write_text(conf + self.extra_config.format(**ports))
        env = dict(os.environ, MESHGATE_WORKERS="1", MESHGATE_LOG="warn")
        self.mg = start([str(rel / "meshgate"), "run", "-c", str(tmp / "mg.yaml"), "--state-dir", str(tmp / "state")], 0, env=env,
                        stdout=subprocess.DEVNULL)
        self.procs.append(self.mg)
        wait_port(self.mg_port)
        self.ng_h1, self.ng_h2 = free_port(), free_port()
        (tmp / "nginx.conf").write_text(
            NGINX_CONF.format(dir=tmp, backend=ports["backend"], h1=self.ng_h1, h2=self.ng_h2))
        self.ng = start([nginx, "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")], 0)
        self.procs.append(self.ng)
        wait_port(self.ng_h1)

    def __exit__(self, *exc):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    a = bench_args(__doc__, conns=False)
    with Lab(a) as lab:
        mg, ng, mg_port, ng_h1, ng_h2 = lab.mg, lab.ng, lab.mg_port, lab.ng_h1, lab.ng_h2
        time.sleep(0.5)
        targets = {
            "meshgate": {"proc": mg, "h1": f"http://127.0.0.1:{mg_port}/", "h2": f"http://127.0.0.1:{mg_port}/"},
            "nginx": {"proc": ng, "h1": f"http://127.0.0.1:{ng_h1}/", "h2": f"http://127.0.0.1:{ng_h2}/"},
        }
        idle_rss = {n: rss_mib(t["proc"].pid) for n, t in targets.items()}
        # warm-up
        for t in targets.values():
            wrk(t["h1"], 50, 2)
            h2load(t["h2"], 2)
        scenarios = [("HTTP/1.1 c50", "h1", 50), ("HTTP/1.1 c10", "h1", 10), ("h2c c10 m10", "h2", 10)]
        results = {(s[0], n): [] for s in scenarios for n in targets}
        peak_rss = {n: 0.0 for n in targets}
        for rnd in range(a.rounds):
            for label, kind, conns in scenarios:
                for name, t in targets.items():
                    r = measure(t, kind, t[kind], conns, a.duration)
                    results[(label, name)].append(r)
                    peak_rss[name] = max(peak_rss[name], rss_mib(t["proc"].pid))
                    print(f"round {rnd + 1} {label:13} {name:9} {r['rps']:>9.0f} req/s  "
                          f"{r['per_cpu_s']:>9.0f} req/CPU-s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                          f"errors {r['errors']}", flush=True)
        print()
        print("| scenario | proxy | req/s | req per proxy CPU-s | ratio vs nginx (median of rounds) | p50 ms | p99 ms | p99 ratio vs nginx (median of rounds) |")
        print("|---|---|---|---|---|---|---|---|")
        for label, _, _ in scenarios:
            base = results[(label, "nginx")]
            for name in targets:
                rs = results[(label, name)]
                ratios = [r["per_cpu_s"] / b["per_cpu_s"] for r, b in zip(rs, base)]
                med = lambda k: statistics.median(x[k] for x in rs)
                p99 = f"{med('p99'):.2f}" if kind_has_p99(label) else "n/a"
                # Compared round by round, as requests per CPU-second are: a round the
                # machine was slow in moves both proxies' p99, not one's.
                p99_ratio = "n/a"
                if kind_has_p99(label):
                    p99_ratio = f"{statistics.median(r['p99'] / b['p99'] for r, b in zip(rs, base)):.2f}"
                print(f"| {label} | {name} | {med('rps'):,.0f} | {med('per_cpu_s'):,.0f} | "
                      f"{statistics.median(ratios):.2f} | {med('p50'):.2f} | {p99} | {p99_ratio} |")
        print()
        for name in targets:
            print(f"{name}: idle RSS {idle_rss[name]:.1f} MiB, peak RSS under load {peak_rss[name]:.1f} MiB, "
                  f"idle after {rss_mib(targets[name]['proc'].pid):.1f} MiB")


def kind_has_p99(label):
    return not label.startswith("h2c")



def filter_bench(extra_config, routes, a, services=()):
    """What filters cost: meshgate plain and nginx plain, then each of `routes`
    (name, path, headers) on meshgate, measured in turn every round. `extra_config`
    is YAML appended to the plain config, formatted with the ports of `services`
    (name -> command line taking the port) and `backend`. Prints each route's
    requests per proxy CPU-second against meshgate plain and against nginx."""
    with Lab(a, extra_config, services) as lab:
        mg, ng, port, ng_h1 = lab.mg, lab.ng, lab.mg_port, lab.ng_h1
        base = f"http://127.0.0.1:{port}"
        all_routes = [("nginx plain", ng, f"http://127.0.0.1:{ng_h1}/plain/x", ()),
                      ("meshgate plain", mg, f"{base}/plain/x", ())]
        all_routes += [(name, mg, base + path, h) for name, path, h in routes]
        for _, _, url, h in all_routes:  # warm-up, and a check that every route answers 200
            r = wrk(url, a.conns, 2, h)
            if r["errors"]:
                sys.exit(f"{url} answered non-2xx during warm-up")
        results = {name: [] for name, *_ in all_routes}
        for rnd in range(a.rounds):
            for name, proc, url, h in all_routes:
                r = measure({"proc": proc}, "h1", url, a.conns, a.duration, h)
                results[name].append(r)
                print(f"round {rnd + 1} {name:24} {r['rps']:>9.0f} req/s  {r['per_cpu_s']:>9.0f} req/CPU-s  "
                      f"p99 {r['p99']:.2f} ms  errors {r['errors']}", flush=True)
        print()
        print(f"| route (HTTP/1.1 c{a.conns}) | req/s | req per proxy CPU-s | vs meshgate plain | vs nginx | p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, *_ in all_routes:
            rs = results[name]
            vs_plain = statistics.median(r["per_cpu_s"] / p["per_cpu_s"] for r, p in zip(rs, results["meshgate plain"]))
            vs_nginx = statistics.median(r["per_cpu_s"] / p["per_cpu_s"] for r, p in zip(rs, results["nginx plain"]))
            med = lambda k: statistics.median(x[k] for x in rs)
            print(f"| {name} | {med('rps'):,.0f} | {med('per_cpu_s'):,.0f} | {vs_plain:.2f} | {vs_nginx:.2f} | "
                  f"{med('p99'):.2f} |")


def bench_args(doc, conns=True):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    if conns:
        ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release",
                    help="where meshgate and bench-backend are (for an A/B of two builds; implies --no-build)")
    a = ap.parse_args()
    if a.bin_dir != ROOT / "target" / "release":
        a.no_build = True
    return a

if __name__ == "__main__":
    main()
