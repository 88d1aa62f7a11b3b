#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, unit and table
# tests, docs, then end-to-end tests of the built binary against real peers.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "set-up (Debian packages, Python venv)"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -q -- -D warnings

step "unsafe code only in crates/meshgate/src/heap.rs"
allowed=$(grep -rl --include='*.rs' 'allow(unsafe_code)' crates fuzz/fuzz_targets || true)
if [ "$allowed" != "crates/meshgate/src/heap.rs" ]; then
  echo "allow(unsafe_code) is only for heap.rs's mallopt; found in: ${allowed:-nothing}" >&2
  exit 1
fi

step "optimised x86_64 Linux builds get the PGO profile, other builds do not"
pgo() { scripts/rustc-pgo echo --crate-name x "$@"; }
if [ "$(uname -m)-$(uname -s)" = x86_64-Linux ]; then
  [ -f crates/meshgate/meshgate.profdata ] || { echo "crates/meshgate/meshgate.profdata is missing" >&2; exit 1; }
  case "$(pgo -C opt-level=3)" in *"-Cprofile-use=$PWD/crates/meshgate/meshgate.profdata"*) ;;
    *) echo "scripts/rustc-pgo did not add the profile to an opt-level 3 build" >&2; exit 1 ;; esac
fi
for args in "-C opt-level=0" "-C opt-level=3 --target aarch64-unknown-linux-gnu" \
            "-C opt-level=3 -Cprofile-generate=/tmp/x"; do
  # shellcheck disable=SC2086
  case "$(pgo $args)" in *profile-use*) echo "scripts/rustc-pgo added the profile to: $args" >&2; exit 1 ;; esac
done

step "cargo test (unit, table and diagnostics tests)"
log=$(mktemp)
if ! cargo test --workspace -q >"$log" 2>&1; then
  cat "$log"
  echo "cargo test failed" >&2
  exit 1
fi
grep -E "^test result" "$log" | awk '{p+=$4; f+=$6} END {printf "%d passed, %d failed\n", p, f}'
rm -f "$log"

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

step "build the binary for end-to-end tests"
cargo build -p meshgate -q
export MESHGATE_BIN="$PWD/target/debug/meshgate"

step "end-to-end tests (real binary, real peers)"
.venv/bin/python -m pytest tests/e2e -q -p no:cacheprovider "$@"
