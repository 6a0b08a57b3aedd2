"""Command-line conventions shared by every command: choice options listed by --help and completion,
installable completion, help printed as written, one-line usage errors, -q/--json everywhere,
progress on stderr beside --json, tables that keep their numbers when piped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_cli import choices
from fusion_cli.cli import common
from fusion_cli.cli.main import app, main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMANDS = ("batch", "evaluate", "hisr", "info", "metrics", "pansharpen", "report", "simulate", "train")
# option name -> the value set it must offer, for every command that has the option
ENUMERATED = {
    "method": choices.METHODS,
    "base": choices.METHODS,
    "sensor": choices.SENSORS,
    "device": (*choices.DEVICES, "cuda:N"),
    "precision": choices.PRECISIONS,
    "compress": choices.COMPRESSIONS,
    "task": choices.TASKS,
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _commands() -> dict[str, object]:
    """The click commands behind `fusion`, registered as main() does, without running one."""
    import typer

    from fusion_cli.cli.main import _register

    _register()
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def test_choice_sets_match_the_library_registries() -> None:
    """The torch-free tuples the CLI lists are the registries the library checks against."""
    from fusion_cli.classical import METHODS
    from fusion_cli.models.fuser import PRECISIONS
    from fusion_cli.models.registry import TASKS
    from fusion_cli.raster import COMPRESSIONS
    from fusion_cli.sensors import SENSORS, canonical_sensor

    assert choices.METHODS == tuple(METHODS)
    assert choices.PRECISIONS == tuple(PRECISIONS)
    assert choices.TASKS == TASKS
    assert choices.COMPRESSIONS == COMPRESSIONS
    assert choices.SENSORS == SENSORS
    assert all(canonical_sensor(a) in SENSORS for a in choices.sensor_aliases())


def test_every_enumerated_option_lists_and_completes_its_values(capsys) -> None:
    seen = set()
    for name, command in _commands().items():
        for param in command.params:
            if param.name not in ENUMERATED:
                continue
            seen.add(param.name)
            values = ENUMERATED[param.name]
            assert param.metavar == "[" + "|".join(values) + "]", (name, param.name, param.metavar)
            ctx = command.make_context(name, [], resilient_parsing=True)
            completed = [c.value for c in param.shell_complete(ctx, "")]
            assert set(values) - {"cuda:N"} <= set(completed), (name, param.name, completed)
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and "Usage: fusion " + name in out
    assert seen == set(ENUMERATED)
    # completion narrows by prefix; sensor aliases complete too
    assert common.Choices.method.complete("mtf-glp-h") == ["mtf-glp-hpm", "mtf-glp-hs"]
    assert "worldview3" in common.Choices.sensor.complete("world")


@pytest.mark.parametrize(
    ("option", "value", "what"),
    [
        ("--method", "ihs", "unknown method 'ihs'"),
        ("--sensor", "wv9", "unknown sensor 'wv9'"),
        ("--device", "tpu", "unknown device 'tpu'"),
        ("--precision", "fp8", "unknown precision 'fp8'"),
        ("--compress", "jpeg", "unknown compression 'jpeg'"),
    ],
)
def test_a_value_outside_a_choice_is_one_line_before_any_work(capsys, tmp_path, option, value, what):
    # the inputs do not exist: the choice is checked first, when the command line is parsed
    code, _, err = run(capsys, "pansharpen", "nope_pan.tif", "nope_ms.tif", "-o", str(tmp_path / "o.tif"),
                       option, value)  # fmt: skip
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("Error: ") and what in err, err
    assert not list(tmp_path.iterdir())


def test_choices_keep_the_spellings_the_library_accepts(capsys, tmp_path) -> None:
    """Case and sensor aliases pass the parser (the library normalises them), and cuda:N is a device:
    here the run goes on to the first input check."""
    for extra in (
        ["--method", "GSA", "--sensor", "WorldView-3"],
        ["--compress", "ZSTD"],
        ["--device", "cuda:1"],
    ):
        code, _, err = run(capsys, "pansharpen", "nope_pan.tif", "nope_ms.tif", "-o", str(tmp_path / "o.tif"),
                           *extra)  # fmt: skip
        assert code == 2 and "PAN file not found" in err, (extra, err)


def test_usage_errors_are_one_line(capsys) -> None:
    cases = [
        (["pansharpen"], "Missing argument 'PAN'"),
        (["pansharpen", "a.tif", "b.tif"], "Missing option '-o' / '--out'"),
        (["pansharpen", "a.tif", "b.tif", "-o", "x.tif", "--tile", "big"], "Invalid value for '--tile'"),
        (["metrics", "x.tif", "--no-such-option"], "No such option: --no-such-option"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["simulate", "a.tif", "b.tif", "-o", "x", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["train", "a", "-o", "x", "--task", "denoise"], "unknown task 'denoise'"),
    ]
    for args, match in cases:
        code, out, err = run(capsys, *args)
        assert code == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and err.startswith("Error: ") and match in err, (args, err)
        assert "--help" in err and "Traceback" not in err and "╭" not in err


def test_help_is_printed_as_written(capsys) -> None:
    """The batch help's glob examples and metrics' indented conventions reach the user unchanged."""
    code, out, _ = run(capsys, "batch", "--help")
    assert code == 0
    assert "--pan '*_PAN.tif'" in " ".join(out.split())
    assert "*_PAN.tif + *_MS.tif, *_P.tif + *_MS.tif, *_PAN.tif + *_MUL.tif" in " ".join(out.split())
    code, out, _ = run(capsys, "metrics", "--help")
    assert code == 0 and "  Q2n (shown as Q4/Q8): hypercomplex UIQI" in out  # a \b block keeps its lines
    assert "[K-1, H-K)" in out and "D_lambda^K (Khan)" in out


def _fusion(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusion_cli", *args], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_shell_completion_installs_and_completes() -> None:
    res = _fusion("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert res.returncode == 0, res.stderr
    assert (
        "_FUSION_COMPLETE=complete_bash" in res.stdout
        and "complete -o default -F _fusion_completion fusion" in res.stdout
    )
    # what the installed script asks for on TAB: the commands, then an option's values
    res = _fusion(_FUSION_COMPLETE="complete_bash", COMP_WORDS="fusion pan", COMP_CWORD="1")
    assert res.stdout.split() == ["pansharpen"], res.stderr
    res = _fusion(
        _FUSION_COMPLETE="complete_bash", COMP_WORDS="fusion pansharpen --compress ", COMP_CWORD="3"
    )
    assert res.stdout.split() == list(choices.COMPRESSIONS), res.stderr
    res = _fusion("--help")
    assert "--install-completion" in res.stdout


def test_quiet_and_json_on_every_command(capsys) -> None:
    for name, command in _commands().items():
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet", "--json"} <= opts, (name, sorted(opts))
    assert set(_commands()) == set(COMMANDS)


class ProgressSpy:
    """Stands in for `progress_bar` in one command module: records what the command asked for and
    every (done, total) the library reported, and draws nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.updates: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def __call__(self, label: str, enabled: bool):
        self.calls.append((label, enabled))
        yield (lambda done, total, what=None: self.updates.append((done, total))) if enabled else None


def test_json_keeps_progress_on_stderr_and_quiet_silences_it(tmp_path, monkeypatch, capsys) -> None:
    """simulate with --json: the JSON alone on stdout while the library reports each step to the
    CLI's bar; -q: no bar and nothing at all on stderr."""
    spy = ProgressSpy()
    monkeypatch.setattr("fusion_cli.cli.simulate.progress_bar", spy)
    pan, ms = str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif")
    code, out, err = run(capsys, "simulate", pan, ms, "-o", str(tmp_path / "a"), "--json")
    assert code == 0 and json.loads(out)["ratio"] == 2
    assert spy.calls == [("simulate", True)] and spy.updates == [(i, 5) for i in range(1, 6)]
    code, out, err = run(capsys, "simulate", pan, ms, "-o", str(tmp_path / "b"), "-q")
    assert code == 0 and out == "" and err == "" and spy.calls[-1] == ("simulate", False)


def test_evaluate_progress_and_a_piped_table_keeps_every_number(tmp_path, monkeypatch, capsys) -> None:
    """evaluate reports each fusion (reduced, then full resolution) to the bar; its table of 13
    columns is far wider than 80, and on a pipe (capsys: not a terminal) every value is whole."""
    spy = ProgressSpy()
    monkeypatch.setattr("fusion_cli.cli.evaluate.progress_bar", spy)
    pan, ms = str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif")
    args = ["evaluate", pan, ms, "--methods", "exp", "--sensor", "landsat8", "--block", "16", "--no-keep"]
    code, out, _ = run(capsys, *args, "-o", str(tmp_path))
    assert code == 0 and spy.updates == [(1, 2), (2, 2)]
    assert "…" not in out and max(len(line) for line in out.splitlines()) > 80
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    for key in ("Q2n", "SAM", "ERGAS", "QNR", "HQNR"):
        assert f"{row[key]:.4f}" in out, key


def test_progress_is_drawn_on_a_terminal_whatever_json_says(tmp_path, monkeypatch, capsys) -> None:
    """One rule for every command: a bar on stderr when it is a terminal (TTY_COMPATIBLE=1 tells rich
    so under capsys), unless -q; --json only moves the result to stdout. The pipeline gets it as
    its `progress` switch; simulate's own bar draws the library's steps."""
    seen: list[bool] = []

    class Summary:
        def to_dict(self) -> dict[str, str]:
            return {"output": "o.tif"}

    def fake_pansharpen(pan: str, ms: str, out: object, **kwargs: object) -> Summary:
        seen.append(bool(kwargs["progress"]))
        return Summary()

    monkeypatch.setattr("fusion_cli.pipeline.pansharpen", fake_pansharpen)
    args = ["pansharpen", "p.tif", "m.tif", "-o", str(tmp_path / "o.tif"), "--method", "exp", "--json"]
    for tty, extra, drawn in (("1", [], True), ("1", ["-q"], False), ("0", [], False)):
        monkeypatch.setenv("TTY_COMPATIBLE", tty)
        code, out, _ = run(capsys, *args, *extra)
        # (every --json document lists the command's warnings: none here)
        assert code == 0 and json.loads(out) == {"output": "o.tif", "warnings": []}, (tty, extra)
        assert seen[-1] is drawn, (tty, extra)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    pan, ms = str(EXAMPLES / "landsat8_pan.tif"), str(EXAMPLES / "landsat8_ms.tif")
    code, out, err = run(capsys, "simulate", pan, ms, "-o", str(tmp_path / "sim"), "--json")
    assert code == 0 and json.loads(out)["ratio"] == 2 and "simulate" in err and "5/5" in err
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    code, out, err = run(capsys, "simulate", pan, ms, "-o", str(tmp_path / "sim"), "--json", "--overwrite")
    assert code == 0 and err == ""
