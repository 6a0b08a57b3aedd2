"""Which files make a scene: PAN/MS pairing by file-name patterns or a manifest, and output names.

`group_by_role` is the one pairing rule of the package (`fusion train` pairs its folders with it too,
with role words instead of patterns): files grouped by the key their role's naming rule gives them.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fusion_cli.errors import FusionError
from fusion_cli.raster import check_product_name, file_identity, is_complete_output, is_gdal_path

K = TypeVar("K", bound=Hashable)

# Naming conventions tried, in order, when the user gives no --pan/--ms patterns. Matching is
# case-insensitive and `.tif` also matches `.tiff`; each `*` captures part of the shared stem.
DEFAULT_CONVENTIONS: tuple[tuple[str, str], ...] = (
    ("*_PAN.tif", "*_MS.tif"),
    ("*_P.tif", "*_MS.tif"),
    ("*_PAN.tif", "*_MUL.tif"),
    ("PAN_*.tif", "MS_*.tif"),  # wv2_spacenet6: pan_1.tif / ms_1.tif
    ("PAN_*.tif", "MUL_*.tif"),  # SpaceNet: PAN_AOI_..._img1.tif / MUL_AOI_..._img1.tif
    ("*-P?AS-*.tif", "*-M?AS-*.tif"),  # Maxar ordering: ...-P2AS-..._P001.TIF / ...-M2AS-...
    ("IMG_*_P_*.tif", "IMG_*_MS_*.tif"),  # Pleiades / SPOT DIMAP image names
    ("*_B8.tif", "*_MS.tif"),  # Landsat 7/8/9 PAN band + a stacked MS of the same product id
    ("*_B8.tif", "*_stack.tif"),
)
DEFAULT_OUT_PATTERN = "{stem}_fused.tif"


@dataclass(frozen=True)
class Scene:
    """One unit of work: a PAN (or MSI) file, its MS (or HSI) partner and the output path. An input
    is a Path, or a str for a GDAL virtual path (/vsizip/..., s3://...) from a manifest, which Path
    would fold."""

    id: str
    pan: Path | str
    ms: Path | str
    out: Path

    def to_dict(self) -> dict[str, str]:
        return {"scene": self.id, "pan": str(self.pan), "ms": str(self.ms), "out": str(self.out)}


@dataclass(frozen=True)
class Unpaired:
    """An input that could not be turned into a scene; reported as a failure, never ignored."""

    path: Path
    reason: str


@dataclass
class Plan:
    """What a batch will do, before doing it (`--dry-run` prints it)."""

    scenes: list[Scene]
    unpaired: list[Unpaired] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)  # files matching neither pattern (listed only)
    source: str = ""  # how pairs were found: the patterns or the manifest
    shard: tuple[int, int] | None = None  # (index 0-based, count) when sharded
    total_scenes: int = 0  # before sharding

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shard": None if self.shard is None else f"{self.shard[0]}/{self.shard[1]}",
            "total_scenes": self.total_scenes,
            "scenes": [s.to_dict() for s in self.scenes],
            "unpaired": [{"path": str(u.path), "reason": u.reason} for u in self.unpaired],
            "ignored": [str(p) for p in self.ignored],
        }


# --------------------------------------------------------------------------------------------
# Pairing


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex where each `*` is a capture group (the stem); `?` matches one character.

    `*` does not cross `/`, `**` does; a trailing `.tif` also accepts `.tiff`.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    regex = "".join(out)
    if pattern.lower().endswith(".tif"):
        regex += "f?"
    return re.compile(regex + r"\Z", re.IGNORECASE)


def _literal_length(pattern: str) -> int:
    return len(pattern.replace("*", "").replace("?", ""))


def _list_files(in_dir: Path, recursive: bool, exclude: Path | None) -> list[str]:
    """Relative posix paths of the non-hidden files in `in_dir`, sorted (stable plans); recursive:
    through symlinked folders too, each real folder once and by its own path where it has one in
    `in_dir` (a link `latest -> 2020-05` does not rename that scene), but not into `exclude` (OUT_DIR,
    resolved). A folder that cannot be listed stops the plan (its scenes would be left out)."""

    def stop(exc: OSError) -> None:
        raise exc

    def key(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_dev, st.st_ino

    def listed(here: Path, dirs: list[str]) -> list[str]:
        # hidden folders (ours, .git, a trash) and OUT_DIR are neither inputs nor read
        return sorted(
            d for d in dirs if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )

    # the real folders listed (not through links), which links to them must not stand in for
    real: set[tuple[int, int]] = set()
    for top, dirs, _ in os.walk(in_dir, onerror=stop) if recursive else ():
        real.add(key(Path(top)))
        dirs[:] = listed(Path(top), dirs)
    rel: list[str] = []
    seen: set[tuple[int, int]] = set()
    for top, dirs, names in os.walk(in_dir, followlinks=recursive, onerror=stop):
        here = Path(top)
        if key(here) in seen:
            dirs[:] = []  # a folder reached twice through links
            continue
        seen.add(key(here))
        keep = listed(here, dirs) if recursive else []
        # a link to a folder that is listed by its own path is left to that path
        dirs[:] = [d for d in keep if not ((here / d).is_symlink() and key(here / d) in real)]
        for name in names:
            path = here / name
            if not name.startswith(".") and path.is_file():  # hidden files: our own temporaries
                rel.append(path.relative_to(in_dir).as_posix())
    return sorted(rel)


def escapes(out_dir: Path, out: str | Path) -> str | None:
    """Why output `out` (as the user wrote it, relative to `out_dir`) would be written outside
    `out_dir`, or None: outputs, their lock and temporary files are confined to OUT_DIR, so a
    manifest or pattern can never overwrite or clean up files elsewhere."""
    given = Path(out)
    if given.is_absolute():
        return f"output {out} is an absolute path; outputs must be relative to OUT_DIR {out_dir}"
    if ".." in given.parts:
        return f"output {out} climbs out of OUT_DIR with '..'; write it inside {out_dir}"
    root = os.path.realpath(out_dir)
    # the folder it lands in, with every symlink followed, must be OUT_DIR or below it
    if os.path.commonpath([root, os.path.realpath(Path(out_dir) / given.parent)]) != root:
        return f"output {out} leaves OUT_DIR {out_dir} through a symlink; write it elsewhere inside OUT_DIR"
    if (Path(out_dir) / given).is_symlink():
        return f"output {out} is a symlink; remove it or choose another name"
    return None


def out_path_for(out_dir: Path, stem: str, out_pattern: str = DEFAULT_OUT_PATTERN) -> Path:
    """Output of a scene: `out_pattern` with `{stem}` filled, under `out_dir`."""
    if "{stem}" not in out_pattern:
        raise FusionError(
            f"--out-pattern must contain {{stem}} (e.g. {DEFAULT_OUT_PATTERN}), got {out_pattern!r}"
        )
    check_product_name(out_pattern, "--out-pattern")  # every scene would fail on it, one by one
    if Path(out_pattern).is_absolute() or ".." in Path(out_pattern).parts:  # so would this
        raise FusionError(
            f"--out-pattern {out_pattern!r} writes outside OUT_DIR; give a name inside it, without '..'"
        )
    name = out_pattern.replace("{stem}", stem) if stem else out_pattern.replace("{stem}", "fused").lstrip("_")
    return out_dir / name


def pattern_key(pattern: str) -> Callable[[str], tuple[str, ...] | None]:
    """A naming rule from a glob: a file's key is what the pattern's `*`s capture (`_pattern_regex`)."""
    regex = _pattern_regex(pattern)

    def key(name: str) -> tuple[str, ...] | None:
        m = regex.match(name)
        return m.groups() if m else None

    return key


def token_key(tokens: Sequence[str]) -> Callable[[str], str | None]:
    """A naming rule from role words: a file's key is its stem with one of `tokens` removed as a whole
    `_`/`-`/`.`-separated word, lower-cased (`3_PAN.tif` -> `3_<>`, `pan.tif` -> `<>`), else None."""

    def key(name: str) -> str | None:
        parts = re.split(r"([_.\-])", Path(name).stem)
        for i, p in enumerate(parts):
            if p.lower() in tokens:
                return "".join(parts[:i] + ["<>"] + parts[i + 1 :]).lower()
        return None

    return key


def group_by_role(
    files: Iterable[str], hi_key: Callable[[str], K | None], lo_key: Callable[[str], K | None], hi_wins: bool
) -> tuple[dict[K, list[str]], dict[K, list[str]]]:
    """The one pairing rule: files of the high-resolution role (PAN, or MSI) and of the low-resolution
    one (MS, or HSI) grouped by the key their role's naming rule gives them, in `files` order; the
    files of one key pair when each role has exactly one (several: the key is ambiguous). A file both
    rules name counts for the high-resolution role if `hi_wins` (the more specific rule), else the other.
    """
    his: dict[K, list[str]] = {}
    los: dict[K, list[str]] = {}
    for f in files:
        kh, kl = hi_key(f), lo_key(f)
        if kh is not None and kl is not None:  # e.g. '*.tif' and '*_ms.tif': the more specific wins
            kh, kl = (kh, None) if hi_wins else (None, kl)
        if kh is not None:
            his.setdefault(kh, []).append(f)
        elif kl is not None:
            los.setdefault(kl, []).append(f)
    return his, los


def _match_files(
    files: Sequence[str], pan_pattern: str, ms_pattern: str
) -> tuple[dict[tuple[str, ...], list[str]], dict[tuple[str, ...], list[str]]]:
    pan_first = _literal_length(pan_pattern) >= _literal_length(ms_pattern)
    return group_by_role(files, pattern_key(pan_pattern), pattern_key(ms_pattern), pan_first)


def pair_by_patterns(
    in_dir: Path,
    out_dir: Path,
    pan_pattern: str | None = None,
    ms_pattern: str | None = None,
    out_pattern: str = DEFAULT_OUT_PATTERN,
    check_outputs: bool = True,
) -> Plan:
    """Pair files of `in_dir` whose names share the stem captured by the patterns' `*`.

    Without patterns, the naming convention of `DEFAULT_CONVENTIONS` that pairs the most files
    is used. A pattern containing `/` matches paths below `in_dir` (e.g. `*/pan.tif`).
    `check_outputs` as for `read_manifest`.
    """
    if is_gdal_path(in_dir):
        raise FusionError(
            f"IN_DIR {in_dir} is a GDAL virtual path, which batch does not list: give its files in a "
            "--manifest (pan,ms columns accept /vsizip/... paths)"
        )
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FusionError(f"input folder not found: {in_dir}")
    if (pan_pattern is None) != (ms_pattern is None):
        raise FusionError(
            "give both --pan and --ms patterns (e.g. --pan '*_PAN.tif' --ms '*_MS.tif'), or neither"
        )
    if pan_pattern is not None and ms_pattern is not None:
        for name, pat in (("--pan", pan_pattern), ("--ms", ms_pattern)):
            if "*" not in pat:
                raise FusionError(f"{name} pattern {pat!r} needs a '*' for the stem that pairs files")
        conventions: Sequence[tuple[str, str]] = [(pan_pattern, ms_pattern)]
    else:
        conventions = DEFAULT_CONVENTIONS
    recursive = any("/" in p for conv in conventions for p in conv)
    files = _list_files(in_dir, recursive, out_dir.resolve() if out_dir.exists() else None)
    if out_dir.exists() and out_dir.resolve() == in_dir.resolve():
        # a rerun into the input folder: its products (named by --out-pattern, complete) are not inputs
        # (`{stem}_fused_MS.tif` matched `*_MS.tif` and failed as an MS without a PAN)
        own = re.compile(re.escape(out_pattern).replace(re.escape("{stem}"), ".+") + r"\Z")
        files = [f for f in files if not (own.match(f) and is_complete_output(in_dir / f))]

    best: tuple[int, str, str] | None = None
    for pan_p, ms_p in conventions:
        pans, mss = _match_files(files, pan_p, ms_p)
        n = len(set(pans) & set(mss))
        if best is None or n > best[0]:
            best = (n, pan_p, ms_p)
    assert best is not None
    n, pan_p, ms_p = best
    if n == 0 and pan_pattern is None and files:
        tried = ", ".join(f"{p}+{m}" for p, m in DEFAULT_CONVENTIONS)
        raise FusionError(
            f"no PAN/MS pairs found in {in_dir} with the default naming conventions ({tried}); "
            "pass --pan and --ms patterns or --manifest"
        )
    pans, mss = _match_files(files, pan_p, ms_p)
    scenes: list[Scene] = []
    unpaired: list[Unpaired] = []
    for key in sorted(set(pans) | set(mss)):
        p_list, m_list = pans.get(key, []), mss.get(key, [])
        stem = "_".join(k for k in key)
        if len(p_list) > 1 or len(m_list) > 1:
            # a complete product of this tool beside its inputs (`--out-pattern '{stem}_PAN.tif'` into
            # IN_DIR, then a batch of IN_DIR elsewhere) is not an input: every scene failed as ambiguous
            p_list, m_list = (
                [f for f in lst if not is_complete_output(in_dir / f)] or lst for lst in (p_list, m_list)
            )
        if len(p_list) > 1 or len(m_list) > 1:
            for f in p_list + m_list:
                unpaired.append(
                    Unpaired(in_dir / f, f"stem {stem!r} is ambiguous: {', '.join(p_list + m_list)}")
                )
        elif not m_list:
            unpaired.append(
                Unpaired(in_dir / p_list[0], f"no MS partner matching {ms_p!r} for stem {stem!r}")
            )
        elif not p_list:
            unpaired.append(
                Unpaired(in_dir / m_list[0], f"no PAN partner matching {pan_p!r} for stem {stem!r}")
            )
        else:
            out = out_path_for(out_dir, stem, out_pattern)
            why = escapes(out_dir, out_path_for(Path(), stem, out_pattern))
            if why is not None:
                unpaired.append(Unpaired(in_dir / p_list[0], why))
            else:
                scenes.append(Scene(stem or out.stem, in_dir / p_list[0], in_dir / m_list[0], out))
    matched = {f for lst in (*pans.values(), *mss.values()) for f in lst}
    ignored = [in_dir / f for f in files if f not in matched]
    if pan_pattern is None:  # a file another convention names is an input left out, not noise
        for path in ignored:
            other = _convention_of(path.relative_to(in_dir).as_posix())
            if other is not None:
                unpaired.append(
                    Unpaired(
                        path,
                        f"is named as {other} names inputs, but this folder pairs by {pan_p!r} + {ms_p!r} "
                        "(the convention that pairs the most files): rename it, or give --pan and --ms",
                    )
                )
        ignored = [p for p in ignored if p not in {u.path for u in unpaired}]
    if not scenes and not unpaired:  # an unmounted folder or a mistyped pattern is not "nothing to do"
        what = "holds no files" if not files else f"has no file matching --pan {pan_p!r} or --ms {ms_p!r}"
        raise FusionError(f"no PAN/MS pairs: {in_dir} {what}; check IN_DIR and the patterns")
    plan = Plan(scenes, unpaired, ignored, source=f"--pan {pan_p!r} --ms {ms_p!r}", total_scenes=len(scenes))
    if check_outputs:
        _check_outputs(plan)
    return plan


def _convention_of(name: str) -> str | None:
    """The default convention ("'*_PAN.tif' + '*_MS.tif'") whose PAN or MS pattern `name` matches."""
    for pan_p, ms_p in DEFAULT_CONVENTIONS:
        if pattern_key(pan_p)(name) is not None or pattern_key(ms_p)(name) is not None:
            return f"{pan_p!r} + {ms_p!r}"
    return None


def _stem_of(pan_name: str) -> str:
    """Scene stem of a PAN file name: what a default convention's `*` captures (`A_PAN.tif` -> `A`),
    else the name without extension."""
    for pan_p, _ in DEFAULT_CONVENTIONS:
        m = _pattern_regex(pan_p).match(pan_name)
        if m:
            return "_".join(m.groups())
    return pan_name.split(".")[0]


def read_manifest(
    manifest: Path,
    in_dir: Path,
    out_dir: Path,
    out_pattern: str = DEFAULT_OUT_PATTERN,
    check_outputs: bool = True,
) -> Plan:
    """Scenes from a CSV with a header: `pan,ms[,out][,id]`.

    Relative `pan`/`ms` paths are taken from `in_dir`, relative `out` paths from `out_dir`;
    without `out`, the output is named from the PAN file's stem and `out_pattern`. GDAL virtual
    paths (`/vsizip//data/a.zip/pan.tif`, `/vsis3/...`) are kept as written. `check_outputs=False`
    for a caller that writes no outputs of its own (`fusion evaluate`: scenes, not products).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FusionError(f"manifest not found: {manifest}")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            # each row with the file line it ends on (blank lines are skipped, quoted fields may span lines)
            rows = [(row, reader.line_num) for row in reader]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise FusionError(f"manifest {manifest} is not a readable CSV: {exc}") from None
    if not {"pan", "ms"} <= set(header):
        raise FusionError(
            f"manifest {manifest} needs a header with 'pan' and 'ms' columns (and optionally 'out', 'id')"
        )
    scenes: list[Scene] = []
    refused: list[Unpaired] = []
    for row, n in rows:
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not r.get("pan") or not r.get("ms"):
            raise FusionError(f"manifest {manifest} line {n}: empty 'pan' or 'ms'")
        # absolute paths stay absolute; GDAL paths stay strings (Path would fold their `//`)
        pan, ms = (r[k] if is_gdal_path(r[k]) else in_dir / r[k] for k in ("pan", "ms"))
        stem = _stem_of(Path(r["pan"]).name)
        out = out_dir / r["out"] if r.get("out") else out_path_for(out_dir, stem, out_pattern)
        why = escapes(out_dir, r.get("out") or out_path_for(Path(), stem, out_pattern))
        if why is not None:  # this row fails with its reason; the other rows go on
            refused.append(
                Unpaired(Path(r.get("id") or r.get("out") or r["pan"]), f"manifest line {n}: {why}")
            )
            continue
        scenes.append(Scene(r.get("id") or Path(out).stem, pan, ms, out))
    plan = Plan(scenes, refused, source=f"--manifest {manifest}", total_scenes=len(scenes))
    if check_outputs:
        _check_outputs(plan)
    return plan


def _check_outputs(plan: Plan) -> None:
    """Two scenes writing one file, or an output that is an input (the same path, a symlink or a hard
    link to it: raster.same_file's rule, keyed for a set), is a bad invocation."""
    seen: dict[Path, str] = {}
    for s in plan.scenes:
        key = s.out.resolve()
        if key in seen:
            raise FusionError(
                f"scenes {seen[key]!r} and {s.id!r} would both write {s.out}; fix the names or --out-pattern"
            )
        seen[key] = s.id
    inputs = {file_identity(p) for s in plan.scenes for p in (s.pan, s.ms) if isinstance(p, Path)}
    for s in plan.scenes:
        if file_identity(s.out) in inputs:
            raise FusionError(f"output {s.out} of scene {s.id!r} is an input file; choose another OUT_DIR")
