"""The command line contract: exit codes and FILE:LINE diagnostics."""

import subprocess

from harness import BIN, ROOT


def run(*args):
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=30)


def test_validate_ok_on_quickstart():
    p = run("validate", "-c", str(ROOT / "examples" / "quickstart"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("ok: 1 gateway(s)")


def test_readme_cargo_run_picks_the_gateway_binary():
    """The README's commands are `cargo run -p meshgate -- ...`; with more than one
    binary in the package, that only works while `default-run` names meshgate."""
    p = subprocess.run(["cargo", "run", "-q", "-p", "meshgate", "--", "validate", "-c",
                        str(ROOT / "examples" / "quickstart")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("ok: 1 gateway(s), 1 service(s), 4 api(s)")


def test_validate_reports_every_problem_with_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "apiVersion: meshgate.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n"
        "  listeners: [{name: web, address: \"nope\"}]\n---\n"
        "apiVersion: meshgate.io/v1\nkind: Api\nmetadata: {name: a}\nspec:\n"
        "  request: {path: /a}\n  invoke: {service: missing, timeout: 3x}\n"
    )
    p = run("validate", "-c", str(cfg))
    assert p.returncode == 1
    lines = p.stdout.splitlines()
    assert f'{cfg}:5: Gateway/g: spec.listeners.0.address: "nope" is not an address: use IP:PORT, like 127.0.0.1:8080 or [::1]:8080' in lines
    assert f'{cfg}:12: Api/a: spec.invoke.service: unknown Service "missing"' in lines
    assert any(l.startswith(f"{cfg}:12: Api/a: spec.invoke.timeout:") for l in lines)


def test_run_refuses_a_bad_config_with_exit_1(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kind: [\n")
    p = run("run", "-c", str(cfg))
    assert p.returncode == 1
    assert f"{cfg}:" in p.stderr


def test_usage_error_is_exit_2():
    assert run("frobnicate").returncode == 2
    assert run("validate").returncode == 2
