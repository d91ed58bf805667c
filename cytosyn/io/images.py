"""Decoding tile PNGs (OpenCV, no torch: the cohort and tiling stages use it too)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

RETILE_FIX = "delete it and rerun the tiling stage"


def decode_png_rgb(data: bytes, where: str, fix: str = RETILE_FIX) -> np.ndarray:
    """Decode PNG bytes to an RGB uint8 array; raises ValueError naming ``where`` and ``fix`` when they do not decode."""
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ValueError(f"{where}: not a readable PNG; {fix}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_png_rgb(path: str | Path) -> np.ndarray:
    """Decode a PNG file to an RGB uint8 array; raises with the path when the file is missing or corrupt."""
    return decode_png_rgb(Path(path).read_bytes(), str(path))
