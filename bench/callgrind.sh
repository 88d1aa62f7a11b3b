#!/usr/bin/env bash
# User-space instructions per proxied HTTP/1.1 request, counted by callgrind: the same
# for the same binary whatever else the machine does, so small request-path changes
# show where wall-clock benchmarks only show noise.
#
# Usage: bench/callgrind.sh [BIN_DIR]   (default target/release; needs valgrind, h2load)
# CALLGRIND_ARGS adds callgrind options, e.g. "--cache-sim=yes --branch-sim=yes".
# Runs meshgate under callgrind twice, serving 2,000 and 12,000 requests (c10), and
# prints (Ir(12k) - Ir(2k)) / 10k. callgrind.out files stay in a temporary directory
# for callgrind_annotate; their path is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
out=$(mktemp -d /tmp/meshgate-callgrind-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

count() {  # count N -> total Ir of meshgate serving N requests
  local n=$1 bp mp backend mg
  bp=$(free_port); mp=$(free_port)
  "$bin/bench-backend" "127.0.0.1:$bp" & backend=$!
  cat > "$out/mg.yaml" <<YAML
apiVersion: meshgate.io/v1
kind: Gateway
metadata: {name: bench}
spec:
  listeners: [{name: web, address: "127.0.0.1:$mp"}]
  accessLog: {path: "off"}
---
apiVersion: meshgate.io/v1
kind: Service
metadata: {name: backend}
spec:
  endpoints: [{address: "127.0.0.1:$bp"}]
---
apiVersion: meshgate.io/v1
kind: Api
metadata: {name: all}
spec:
  request: {path: "/{*rest}"}
  invoke: {service: backend}
YAML
  MESHGATE_WORKERS=1 MESHGATE_LOG=warn valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$out/callgrind.out.$n" \
    "$bin/meshgate" run -c "$out/mg.yaml" --state-dir "$out/state-$n" >/dev/null 2>"$out/valgrind-$n.log" & mg=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$mp/" && break; sleep 0.3; done
  h2load --h1 -n "$n" -c 10 -t 1 "http://127.0.0.1:$mp/" | grep -q "$n succeeded" \
    || { echo "h2load: not every request succeeded" >&2; kill "$mg" "$backend"; exit 1; }
  kill -TERM "$mg"; wait "$mg" || true
  kill "$backend"; wait "$backend" 2>/dev/null || true
  awk '/^totals:/ {print $2}' "$out/callgrind.out.$n"
}

small=$(count 2000)
large=$(count 12000)
echo "instructions per request: $(( (large - small) / 10000 ))  (callgrind output in $out)"
