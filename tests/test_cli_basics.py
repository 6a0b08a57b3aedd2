import os
import subprocess
import sys

from fusion_cli import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fusion_cli.cli.main import main; main()", *args],
        capture_output=True,
        text=True,
    )


def test_version():
    res = run_cli("--version")
    assert res.returncode == 0
    assert res.stdout.strip() == f"fusion-cli {__version__}"


def test_unknown_command_is_usage_error():
    res = run_cli("no-such-command")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_entry_point_lets_idle_openmp_threads_sleep_unless_the_user_chose():
    """`fusion` sets OMP_WAIT_POLICY=PASSIVE before torch starts its OpenMP threads (so concurrent
    runs on shared cores do not spin against each other), and keeps a value the user set."""
    probe = (
        "import os, sys; from fusion_cli.cli.main import share_cores; share_cores(); "
        "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "False"]
