"""Shared fixtures: the real test slides in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CYTOSYN_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_SLIDES = SHARED_DATA / "slides"
SHARED_TCGA = SHARED_DATA / "tcga"

# Tests never reach a model hub, and never phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def shared_file(relpath: str) -> Path:
    path = SHARED_DATA / relpath
    if not path.exists():
        pytest.skip(f"{path} is absent: the real test data lives in ../shared/data beside the repository")
    return path


@pytest.fixture
def cmu_slide() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")
