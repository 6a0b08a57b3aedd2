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


def test_entry_point_bounds_idle_openmp_spinning_unless_the_user_chose():
    """`fusion` sets a short OpenMP spin (GOMP_SPINCOUNT, KMP_BLOCKTIME) before torch starts its
    OpenMP threads, so concurrent runs on shared cores do not spin against each other while a
    training step's many small ops do not wait for sleeping threads; a user's own settings win."""
    probe = (
        "import os, sys; from fusion_cli.cli.main import share_cores; share_cores(); "
        "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'), "
        "os.environ.get('KMP_BLOCKTIME', '-'), 'torch' in sys.modules)"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    }

    def run(**extra: str) -> list[str]:
        cmd = [sys.executable, "-c", probe]
        return subprocess.run(
            cmd, env={**env, **extra}, capture_output=True, text=True, check=True
        ).stdout.split()

    assert run() == ["-", "1000", "0", "False"]
    assert run(GOMP_SPINCOUNT="50") == ["-", "50", "0", "False"]
    assert run(OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "-", "-", "False"]


def test_debug_adds_the_traceback_and_keeps_the_exit_code(tmp_path):
    # --debug re-raised the error: exit 1 where the same bad input exits 2 without it
    args = ("pansharpen", str(tmp_path / "missing_pan.tif"), str(tmp_path / "missing_ms.tif"), "-o")
    plain = run_cli(*args, str(tmp_path / "a.tif"))
    debug = run_cli("--debug", *args, str(tmp_path / "b.tif"))
    assert plain.returncode == debug.returncode == 2, debug.stderr
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    last = debug.stderr.strip().splitlines()[-1]
    assert last == plain.stderr.strip() and last.startswith("Error: ") and "missing_pan.tif" in last
    assert not any(tmp_path.iterdir())


def test_progress_time_left_follows_the_whole_runs_pace(monkeypatch):
    # a network finishes a batch of windows at one instant: rich's estimate from the last updates
    # read "0:00:01" left where 45 s were; the bar now divides the elapsed time by the windows done
    from fusion_cli.cli import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.TileProgress()
    bar.start(12, "fusing x.tif")
    try:
        now[0] = 110.0  # the first batch of 4 windows, 10 s in
        for _ in range(4):
            bar.advance(1_000_000)
        fields = bar._bar.tasks[0].fields
        assert fields["eta"] == "0:20 left" and fields["rate"] == "0.4"
    finally:
        bar.stop()
