"""Cheap per-tile filters that run before the classifier, so obvious rejects never reach the backbone.

Each filter works on one number measured from the decoded tile (``tile_measures``) and can be switched
off on its own. A tile fails at most one filter: the first in ``FILTER_NAMES`` order that it fails, so
counts add up to the number of tiles removed by filters.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

# Column order of the measures array and of the per-tile prediction manifest.
MEASURE_NAMES = ("white_fraction", "mean_saturation", "laplacian_var")
FILTER_NAMES = ("near_white", "low_saturation", "blur")


def tile_measures(rgb: np.ndarray, white_level: int) -> np.ndarray:
    """float32 [fraction of pixels with every channel ≥ white_level, mean HSV saturation (0–255),
    variance of the Laplacian of the grey image]."""
    white = float((rgb.min(axis=2) >= white_level).mean())
    saturation = float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean())
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_64F).var())
    return np.array([white, saturation, sharpness], dtype=np.float32)


def filter_reasons(measures: np.ndarray, cfg) -> np.ndarray:
    """Per tile, the name of the first filter it fails, or "" when it passes them all.

    ``cfg`` is a ``CurationFiltersConfig``. Rows of NaN (tiles that could not be read) pass: their error
    is reported separately and they never get a probability.
    """
    measures = np.asarray(measures, dtype=np.float32).reshape(-1, len(MEASURE_NAMES))
    white, saturation, sharpness = measures.T
    fails = {
        "near_white": cfg.near_white & (white >= cfg.max_white_fraction),
        "low_saturation": cfg.low_saturation & (saturation < cfg.min_mean_saturation),
        "blur": cfg.blur & (sharpness < cfg.min_laplacian_var),
    }
    reasons = np.full(len(measures), "", dtype=object)
    for name in reversed(FILTER_NAMES):
        reasons[fails[name]] = name
    return reasons


def count_reasons(reasons: np.ndarray) -> dict[str, int]:
    """Tiles removed per filter (every filter listed, zero included)."""
    values, counts = np.unique(np.asarray(reasons, dtype=object).astype(str), return_counts=True)
    found: Mapping[str, int] = dict(zip(values.tolist(), counts.tolist()))
    return {name: int(found.get(name, 0)) for name in FILTER_NAMES}
