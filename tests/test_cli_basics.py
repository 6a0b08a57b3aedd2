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
