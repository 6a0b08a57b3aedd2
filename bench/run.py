"""Run every `bench/bench_*.py` that defines `run() -> list[dict]`, print a table and write
BENCHMARKS.md at the repository root with the machine it ran on (the others are standalone scripts:
the lent GPU's, `bench_batch.py`).

    python bench/run.py [NAME ...]     # e.g. `python bench/run.py pipeline` runs bench_pipeline only
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, torch version and date: what a reader needs to compare figures."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    except OSError:
        pass
    try:
        import torch

        torch_v = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        torch_v = "not installed"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu,
        "cores available": str(cores),
        "RAM": ram,
        "torch": torch_v,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table over the union of the rows' keys (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    wanted = set(argv)
    sys.path.insert(0, str(BENCH))
    # the process settings of the `fusion` entry point (idle OpenMP threads sleep: spinning ones
    # would add CPU seconds to the one-thread profile), before any bench imports torch
    from fusion_cli.cli.main import share_cores

    share_cores()
    sections: dict[str, str] = {}
    failed = 0
    for path in sorted(BENCH.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        if "\ndef run(" not in path.read_text():  # a standalone script (the GPU benches, bench_batch)
            continue
        print(f"== {path.name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        module = None
        try:
            module = load(path)
            rows = module.run()
        except Exception:
            failed += 1
            rows = [{"bench": name, "error": traceback.format_exc().strip().splitlines()[-1]}]
        took = time.perf_counter() - t0
        text = table(rows)
        print(text + f"\n({took:.0f} s)\n", flush=True)
        doc = (getattr(module, "__doc__", None) or "").strip()
        sections[path.name] = f"## {path.name}\n\n{doc}\n\n{text}\n\n({took:.0f} s, {machine()['date']})\n"
    out = ROOT / "BENCHMARKS.md"
    if wanted and out.exists():
        # A partial run replaces only its own sections and keeps the others' figures.
        for part in out.read_text().split("\n## ")[1:]:
            sections.setdefault(part.split("\n", 1)[0].strip(), "## " + part.rstrip() + "\n")
    header = "# Benchmarks\n\nWritten by `make bench` (`bench/run.py`).\n\n" + "\n".join(
        f"- **{k}**: {v}" for k, v in machine().items()
    )
    out.write_text(header + "\n\n" + "\n".join(sections[k] for k in sorted(sections)))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
