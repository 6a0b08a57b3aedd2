"""What this installation can run: versions, devices, scan backend and models (`fusion info`)."""

from __future__ import annotations

import platform
import warnings
from typing import Any

import numpy as np
import torch

from fusion_cli import __version__
from fusion_cli.errors import FusionError
from fusion_cli.models.registry import list_models, missing_folder
from fusion_cli.models.scan import resolve_backend
from fusion_cli.paths import weights_location
from fusion_cli.sensors import sensor_rows


def environment_info() -> dict[str, Any]:
    """A JSON-ready summary; never raises for a missing optional part (it is reported instead)."""
    import rasterio

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    device = "cuda" if cuda else "cpu"
    try:
        backend, reason = resolve_backend(None, device)
    except FusionError as exc:  # e.g. a bad $FUSION_SCAN_BACKEND
        backend, reason = "error", str(exc)
    folder, source = weights_location()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cards = list_models(check_weights=True)
    default = next((c.name for c in cards if c.default), None)
    return {
        "versions": {
            "fusion-cli": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "numpy": np.__version__,
        },
        "torch": {
            "cuda_available": cuda,
            "cuda_version": torch.version.cuda,
            "cuda_devices": devices,
            "cpu_threads": torch.get_num_threads(),
            "default_device": device,
        },
        "scan_backend": {"name": backend, "reason": reason, "device": device},
        "weights_dir": str(folder),
        "weights_source": source,  # $FUSION_WEIGHTS_DIR, installed package data or source checkout
        "default_model": default,
        "models": [
            {
                "name": c.name,
                "task": c.task,
                "sensor": c.sensor,
                "bands": c.bands,
                "pan_bands": c.pan_bands,
                "ratio": c.ratio,
                "dn_max": c.dn_max,
                "licence": c.licence,
                "default": c.name == default,
                "status": c.status,
            }
            for c in cards
        ],
        "model_warnings": [str(w.message) for w in caught]
        + ([] if folder.is_dir() else [f"the weights folder {folder} {missing_folder(folder)}"]),
        "sensors": sensor_rows(),
    }
