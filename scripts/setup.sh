#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian machine: the real peers
# (curl, nginx, promtool, openssl, wrk, h2load, redis-server, etcd and etcdctl; protoc, which the
# etcd client crate's build runs; iptables, ip and setpriv for the network-namespace
# test of transparent interception) and a Python venv with the clients
# (pytest, grpcio). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in curl:curl nginx:nginx-light promtool:prometheus openssl:openssl wrk:wrk h2load:nghttp2-client redis-server:redis-server etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler iptables:iptables ip:iproute2 setpriv:util-linux; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
# The well-known .proto files protoc imports.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# The system trust store, which `tls: {mode: simple}` verifies upstreams with by default.
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Install when the venv lacks the packages or the pinned list changed since.
if ! cmp -s tests/e2e/requirements.txt .venv/.installed-requirements; then
  echo "setup: installing Python test packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt
  cp tests/e2e/requirements.txt .venv/.installed-requirements
fi
