"""An app for a test's network namespaces (the harness's apps run in the test
process, which cannot enter a namespace). It knows nothing of the mesh: it calls
other hosts with plain urllib and plain sockets, as an unmodified app does.

    netns_app.py http NAME HOST:PORT
        GET /fetch?url=URL[&host=HOST]
                            fetch URL (no proxy; with HOST as the Host header)
                            and answer its status and body
        GET /tcp?to=HOST:PORT&send=HEX[&banner=1][&hold=S[&tick=S]]
                            open a TCP connection, read one line first when
                            `banner`, send the bytes, read as many back; with
                            `hold`, keep the connection up to S seconds (sending
                            and reading back a byte every `tick`) and answer
                            when the other side closed it (`closedAfter`)
        anything else       echo the request as JSON (name, path, headers, client)
    netns_app.py echo HOST:PORT [BANNER]
        a TCP echo server; with BANNER it speaks first (as SMTP or MySQL do)

HOST may be an IPv6 address in brackets ([::]:8080).
"""

import http.server
import json
import socket
import socketserver
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def family(addr):
    return socket.AF_INET6 if ":" in split(addr)[0] else socket.AF_INET


def fetch(url, host=None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with OPENER.open(req, timeout=5) as r:
            return {"status": r.status, "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}
    except OSError as e:
        return {"error": str(e)}


def tcp(to, send, banner, hold=0.0, tick=0.0):
    try:
        with socket.create_connection(split(to), timeout=max(5, hold + 1)) as s:
            first = b""
            if banner:
                while not first.endswith(b"\n"):
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    first += chunk
            s.sendall(send)
            back = b""
            while len(back) < len(send):
                chunk = s.recv(4096)
                if not chunk:
                    break
                back += chunk
            answer = {"banner": first.decode(errors="replace"), "echo": back.hex()}
            if hold:
                answer["closedAfter"] = watch(s, hold, tick)
            return answer
    except OSError as e:
        return {"error": str(e)}


def watch(s, hold, tick):
    """Seconds until the peer closed s, within hold (None: still open). With tick,
    send a byte every tick seconds and read it back, to keep the connection busy."""
    start = time.monotonic()
    while (left := hold - (time.monotonic() - start)) > 0:
        s.settimeout(min(left, tick) if tick else left)
        try:
            if tick:
                s.sendall(b".")
            if not s.recv(1):
                return round(time.monotonic() - start, 2)
        except socket.timeout:
            continue
        except OSError:
            return round(time.monotonic() - start, 2)
        if tick:
            time.sleep(max(0.0, tick - (time.monotonic() - start) % tick))
    return None


def serve_http(name, addr):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/fetch":
                answer = fetch(q["url"], q.get("host"))
            elif url.path == "/tcp":
                answer = tcp(q["to"], bytes.fromhex(q["send"]), q.get("banner"),
                             float(q.get("hold", 0)), float(q.get("tick", 0)))
            else:
                answer = {"backend": name, "path": self.path,
                          "headers": {k.lower(): v for k, v in self.headers.items()},
                          "client": self.client_address[0]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(http.server.ThreadingHTTPServer):
        address_family = family(addr)

    server = Server(split(addr), Handler)
    server.daemon_threads = True
    server.serve_forever()


def serve_echo(addr, banner):
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            if banner:
                self.request.sendall(banner.encode() + b"\r\n")
            while True:
                data = self.request.recv(4096)
                if not data:
                    return
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        address_family = family(addr)
        allow_reuse_address = True

    server = Server(split(addr), Echo)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "http":
        serve_http(sys.argv[2], sys.argv[3])
    else:
        serve_echo(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
