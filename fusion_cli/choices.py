"""The fixed value sets of user-facing options, importable without torch or GDAL.

The CLI lists them in --help and in shell completion (which runs the program on every TAB, so it must
start fast; the registries that hold the methods, precisions and tasks import torch). The library's
own checks use the registries; tests/test_choices.py keeps these tuples equal to them.
"""

from __future__ import annotations

from fusion_cli.sensors import SENSORS, sensor_aliases

# `--method`: the classical methods (fusion_cli.classical.METHODS, in its order)
METHODS: tuple[str, ...] = (
    "exp", "brovey", "gsa", "pca", "mtf-glp", "mtf-glp-hpm", "mtf-glp-fs", "bdsd-pc", "mtf-glp-hs",
)  # fmt: skip
# `--precision`: inference/training arithmetic (fusion_cli.models.fuser.PRECISIONS)
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
# `--compress`: GTiff compression of the products (fusion_cli.raster)
COMPRESSIONS: tuple[str, ...] = ("deflate", "zstd", "lzw", "none")
# `--device`: these, or cuda:N for the N-th visible GPU
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# `fusion train --task` (fusion_cli.models.registry.TASKS)
TASKS: tuple[str, ...] = ("pansharpening", "hs-pansharpening", "hisr")
# `--ms-phase`: where a georeferenced MS is sampled (fusion_cli.pipeline.FuseOptions.ms_phase)
MS_PHASES: tuple[str, ...] = ("toolbox", "geometric")
# `fusion simulate --dtype`: unrounded float32 (the toolbox's) or rounded to the input's type
SIMULATE_DTYPES: tuple[str, ...] = ("float32", "source")

__all__ = [
    "COMPRESSIONS", "DEVICES", "METHODS", "MS_PHASES", "PRECISIONS", "SENSORS", "SIMULATE_DTYPES", "TASKS",
    "sensor_aliases",
]  # fmt: skip
