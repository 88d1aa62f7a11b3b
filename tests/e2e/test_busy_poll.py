"""Busy polling (MESHGATE_BUSY_POLL_US), end to end: a one-worker gateway in front of
a real backend keeps polling its sockets for the budget after each send instead of
sleeping, serves the same answers as without it, and goes back to sleep when the
traffic stops. What it is for (latency at low load) is measured in bench/sidecar.py,
not here; these tests check the behaviour through the CPU time the process uses."""

import http.client
import os
import time
from concurrent import futures
from pathlib import Path

import grpc

from harness import Gateway, api, free_port, grpc_service, service

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(tmp_path, backend, gateways, name, env):
    g = Gateway(tmp_path / name, service("up", backend) + api("echo", "/{*rest}", "{service: up}"),
                env=dict(env, MESHGATE_WORKERS="1"))
    gateways.append(g)
    return g


def paced(g, seconds=1.0, every=0.005):
    """Requests one at a time on one kept-alive connection, one every `every` seconds
    for `seconds`: (statuses, paths echoed, CPU seconds the gateway used)."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    statuses, paths = [], []
    before = cpu_seconds(g.proc.pid)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        conn.request("GET", f"/paced/{i}")
        r = conn.getresponse()
        body = r.read()
        statuses.append(r.status)
        paths.append(body.decode())
        i += 1
        time.sleep(every)
    used = cpu_seconds(g.proc.pid) - before
    conn.close()
    return statuses, paths, used


def test_busy_polling_serves_the_same_and_polls_only_while_traffic_flows(tmp_path, backend, gateways):
    busy = start(tmp_path, backend, gateways, "busy", {"MESHGATE_BUSY_POLL_US": "10000"})
    plain = start(tmp_path, backend, gateways, "plain", {})

    statuses, paths, busy_cpu = paced(busy)
    assert statuses and set(statuses) == {200}
    assert all(f'"/paced/{i}"' in p for i, p in enumerate(paths)), paths[:3]
    statuses, _, plain_cpu = paced(plain)
    assert statuses and set(statuses) == {200}

    # A request every 5 ms with a 10 ms budget: the busy gateway never sleeps, the
    # plain one sleeps between requests.
    assert busy_cpu >= 0.5, f"busy-polling gateway used {busy_cpu:.2f} CPU-s in 1 s of paced traffic"
    assert plain_cpu < busy_cpu / 2, f"plain {plain_cpu:.2f} CPU-s, busy {busy_cpu:.2f} CPU-s"

    # Traffic stopped: after the budget it sleeps like the plain one.
    time.sleep(0.2)
    before = cpu_seconds(busy.proc.pid)
    time.sleep(1.0)
    idle = cpu_seconds(busy.proc.pid) - before
    assert idle <= 0.1, f"busy-polling gateway used {idle:.2f} CPU-s while idle"
    # The polling task does not hold up a graceful stop.
    assert busy.stop() == 0, busy.logs()


def test_a_bad_budget_is_reported_and_the_gateway_serves_without_it(tmp_path, backend, gateways):
    g = start(tmp_path, backend, gateways, "bad", {"MESHGATE_BUSY_POLL_US": "soon"})
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    conn.request("GET", "/x")
    assert conn.getresponse().status == 200
    assert 'MESHGATE_BUSY_POLL_US="soon" is not a whole number of microseconds' in g.logs()


def test_busy_polling_is_ignored_with_a_warning_on_several_workers(tmp_path, backend, gateways):
    g = Gateway(tmp_path, service("up", backend) + api("echo", "/{*rest}", "{service: up}"),
                env={"MESHGATE_WORKERS": "2", "MESHGATE_BUSY_POLL_US": "50"})
    gateways.append(g)
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    conn.request("GET", "/x")
    assert conn.getresponse().status == 200
    assert "MESHGATE_BUSY_POLL_US applies to one worker" in g.logs()


def test_http2_and_grpc_traffic_starts_polling_too(tmp_path, gateways):
    """gRPC through the gateway is HTTP/2 both ways (hyper's server and client): the
    responses it writes and the requests it sends upstream start polling windows as
    HTTP/1.1 sends do."""
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    echo = grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Unary": echo}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        res = grpc_service("echo", port) + api("echo", "/test.Echo/{method}", "{service: echo}", methods=["POST"])
        used = {}
        for name, env in (("busy", {"MESHGATE_BUSY_POLL_US": "10000"}), ("plain", {})):
            g = Gateway(tmp_path / name, res, env=dict(env, MESHGATE_WORKERS="1"))
            gateways.append(g)
            with grpc.insecure_channel(f"127.0.0.1:{g.port}") as ch:
                call = ch.unary_unary("/test.Echo/Unary")
                assert call(b"warm", timeout=5) == b"echo:warm"
                before = cpu_seconds(g.proc.pid)
                end = time.monotonic() + 1.0
                i = 0
                while time.monotonic() < end:
                    assert call(str(i).encode(), timeout=5) == f"echo:{i}".encode()
                    i += 1
                    time.sleep(0.005)
                used[name] = cpu_seconds(g.proc.pid) - before
        assert used["busy"] >= 0.5, used
        assert used["plain"] < used["busy"] / 2, used
    finally:
        server.stop(0)
