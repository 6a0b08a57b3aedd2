"""Shared fixtures: real imagery from ../shared/data, read at run time (never copied in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusion_cli.paths import shared_data_dir

SHARED = shared_data_dir()


def need_shared(*parts: str) -> Path:
    """Path inside the shared data folder, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared real data not found: {path} (the ../shared/data folder is missing)")
    return path


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared real data folder not found: {SHARED}")
    return SHARED
