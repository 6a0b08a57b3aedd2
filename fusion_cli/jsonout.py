"""JSON that every parser reads: a NaN or infinite number (PSNR of identical images, an index of a
degenerate scene) is written as null, not as Python's bare `NaN`/`Infinity`, which strict parsers
(JavaScript's JSON.parse, jq) reject."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite_or_null(value)`; anything else not JSON-native is written as `str`."""
    kwargs.setdefault("default", str)
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
