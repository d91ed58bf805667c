"""Decoding tile PNGs (OpenCV, no torch: the cohort and tiling stages use it too)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_png_rgb(path: str | Path) -> np.ndarray:
    """Decode a PNG to an RGB uint8 array; raises with the path when the file is missing or corrupt."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"{path}: not a readable PNG; delete it and rerun the tiling stage")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
