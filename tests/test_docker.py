"""docker/Dockerfile.cpu and docker/Dockerfile.cuda, checked without docker: known instructions, COPY
sources present in the repository and not excluded by .dockerignore, pip installs naming extras that
pyproject.toml defines and the torch the Makefile pins, `fusion` as the entry point, and the README
building the images its recipes run."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, args = (pending + line).partition(" ")
        out.append((word, args.strip()))
        pending = ""
    assert not pending, f"{path.name}: a continuation runs past the end"
    return out


def expand(text: str, args: dict[str, str]) -> str:
    """${NAME} and $NAME with the build arguments' defaults, as docker would without --build-arg."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `rel` (or a folder above it) out of the build context."""
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        names = parts if pat.startswith("**/") else prefixes  # **/x: x at any depth
        if any(fnmatch.fnmatch(name, pat.removeprefix("**/")) for name in names):
            return True
    return False


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    patterns = dockerignore()
    assert ignored(".venv/bin/python", patterns) and ignored("fusion_cli/__pycache__/x.pyc", patterns)
    assert not ignored("fusion_cli/cli/main.py", patterns)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints(path: Path) -> None:
    steps = instructions(path)
    words = [w for w, _ in steps]
    assert set(words) <= INSTRUCTIONS, sorted(set(words) - INSTRUCTIONS)
    assert all(w == w.upper() for w in words)
    first = next(i for i, w in enumerate(words) if w != "ARG")
    assert words[first] == "FROM" and words.count("FROM") == 1
    build_args = {}
    for word, args in steps:
        if word == "ARG":
            name, _, default = args.partition("=")
            build_args[name] = default
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    torch_pin = re.search(r"^TORCH := (\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    patterns = dockerignore()
    installs_package = installs_torch = False
    for word, args in steps:
        text = expand(args, build_args)
        if word == "COPY":
            *sources, _dest = shlex.split(text)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
        if word == "RUN" and "pip install" in text:
            for command in text.split("&&"):
                if "pip install" not in command:
                    continue
                for target in shlex.split(command):
                    if target.startswith("."):  # the package itself, with extras
                        installs_package = True
                        named = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
                        assert named, target
                        assert set(filter(None, (named[1] or "").split(","))) <= extras, target
                    if target.startswith("torch"):
                        installs_torch = True
                        assert target == torch_pin, (target, torch_pin)
                if "torch" in command:
                    assert "--index-url https://download.pytorch.org/whl/" in command, command
    assert installs_package and installs_torch
    # the CUDA image can add the `cuda` extra: its name must be one pyproject defines
    assert "cuda" in extras and "dask" in extras
    entry = [args for word, args in steps if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["fusion"]
    cpu = path.name.endswith(".cpu")
    assert ("whl/cpu" in path.read_text()) == cpu  # CPU torch on the CPU image only


def test_readme_builds_the_images_its_recipes_run() -> None:
    readme = (ROOT / "README.md").read_text()
    builds = re.findall(r"docker build -f (\S+) -t (\S+) \.", readme)
    assert {f for f, _ in builds} == {"docker/Dockerfile.cpu", "docker/Dockerfile.cuda"}
    for f, _ in builds:
        assert (ROOT / f).exists()
    tags = {t for _, t in builds}
    images = re.findall(r"image:\s*(\S+)", readme)
    assert images, "the Kubernetes recipe names an image"
    for image in images:
        assert image.split("/")[-1] in tags, image
    assert "registry.example.org" not in readme
