#!/usr/bin/env python3
"""Regenerate crates/meshgate/meshgate.profdata, the profile that optimised builds
for x86_64 Linux are compiled with (profile-guided optimisation; see
docs/adr/0009-profile-guided-optimisation.md and scripts/rustc-pgo).

How it is made:

1. An instrumented release binary is built (-Cprofile-generate) in its own
   target directory, target/pgo-generate.
2. It runs the proxy roles of scripts/orderfile.py on real traffic: `meshgate run`
   (HTTP/1.1 and h2c, one worker and the default runtime), a control plane with
   sidecars (outbound, inbound, mesh mTLS, the fused gateway) and an edge proxy.
   Each process writes its counts when it exits.
3. llvm-profdata merges the counts into a sparse profile: only functions that ran
   are in it. Functions not in the profile are compiled as they are without one,
   not as cold code, so features this workload does not exercise lose nothing.

    python3 scripts/pgo.py        # ~25 min on 2 cores; needs `rustup component add llvm-tools`

Run it after large changes to the request path, a new toolchain or new
dependencies, then rebuild from clean (cargo clean --release): cargo does not
see the profile as an input. Functions that changed since the profile was made
are compiled without profile data; nothing breaks, the gain fades. Regenerate
hot.order (scripts/orderfile.py) afterwards: it lists functions of the binary
this profile shapes.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from orderfile import exercise, run  # noqa: E402

PROFILE = ROOT / "crates" / "meshgate" / "meshgate.profdata"
GENERATE_DIR = ROOT / "target" / "pgo-generate"


def llvm_profdata():
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                             check=True).stdout.strip()
    host = next(l.split()[1] for l in subprocess.run(["rustc", "-vV"], capture_output=True, text=True,
                                                     check=True).stdout.splitlines() if l.startswith("host:"))
    tool = Path(sysroot) / "lib" / "rustlib" / host / "bin" / "llvm-profdata"
    if not tool.exists():
        sys.exit(f"{tool} is missing: run `rustup component add llvm-tools` (its LLVM must be rustc's)")
    return tool


def main():
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/setup.sh")
    profdata = llvm_profdata()
    raw = GENERATE_DIR / "profiles"  # a fixed path: the instrumented build is reused
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    try:
        # The bench backend, uninstrumented, serves the traffic.
        run(["cargo", "build", "--release", "-q", "-p", "meshgate", "--bin", "bench-backend"], cwd=ROOT)
        env = dict(os.environ, CARGO_TARGET_DIR=str(GENERATE_DIR),
                   RUSTFLAGS=f"-Cprofile-generate={raw}")
        run(["cargo", "build", "--release", "-q", "-p", "meshgate", "--bin", "meshgate"], cwd=ROOT, env=env)
        # Only the proxies' counts: build scripts compiled by this build write theirs
        # to `raw` too, and would count code the binary shares with them (memchr).
        ran = raw / "roles"
        exercise(GENERATE_DIR / "release" / "meshgate",
                 env={"LLVM_PROFILE_FILE": str(ran / "meshgate-%p.profraw")})
        files = sorted(ran.glob("*.profraw"))
        if not files:
            sys.exit("the instrumented proxies wrote no profile")
        run([str(profdata), "merge", "--sparse", "-o", str(PROFILE), *map(str, files)])
        shown = subprocess.run([str(profdata), "show", str(PROFILE)], capture_output=True, text=True,
                               check=True).stdout
        summary = next((l for l in shown.splitlines() if l.startswith("Total functions")), "")
        print(f"{len(files)} processes; {summary}; written to {PROFILE.relative_to(ROOT)} "
              f"({PROFILE.stat().st_size / 2**20:.1f} MiB)", flush=True)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    print("now: cargo clean --release && python3 scripts/orderfile.py")


if __name__ == "__main__":
    main()
