"""The candidate grid: non-overlapping cells of ``size_px`` at ``mpp`` in level-0 coordinates.

Cell i starts at round(i · footprint), where footprint = size_px · mpp / slide_mpp is kept as a float:
rounding the footprint once would drift by up to half a pixel per cell across a 100k-pixel slide.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cytosyn.io import schema
from cytosyn.io.hashing import slide_rng, tile_id
from cytosyn.slides.reader import Footprint
from cytosyn.tissue import cell_tissue_fractions


def grid_origins(length_level0: int, footprint: float) -> np.ndarray:
    """Top-left coordinates of every whole cell along one axis."""
    n = int(np.floor(length_level0 / footprint + 1e-9))
    origins = np.rint(np.arange(n) * footprint).astype(np.int64)
    return origins[origins + int(np.ceil(footprint - 1e-9)) <= length_level0]


def candidate_cells(
    slide_id: str,
    width: int,
    height: int,
    footprint: Footprint,
    size_px: int,
    mpp: float,
    mask: np.ndarray,
    mask_scale: tuple[float, float],
    min_tissue_fraction: float,
) -> pd.DataFrame:
    """Every grid cell whose tissue fraction reaches the threshold, as CANDIDATES rows in (y, x) order."""
    xs = grid_origins(width, footprint.size_level0_x)
    ys = grid_origins(height, footprint.size_level0_y)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    frac = cell_tissue_fractions(mask, mask_scale[0], mask_scale[1], gx, gy, footprint.size_level0_x, footprint.size_level0_y)
    keep = frac >= min_tissue_fraction
    gx, gy, frac = gx[keep], gy[keep], frac[keep]
    frame = pd.DataFrame(
        {
            "tile_id": [tile_id(slide_id, x, y, size_px, mpp) for x, y in zip(gx.tolist(), gy.tolist())],
            "slide_id": slide_id,
            "x": gx,
            "y": gy,
            "size_px": np.int32(size_px),
            "mpp": float(mpp),
            "read_level": np.int32(footprint.read_level),
            "read_size_level0": np.int64(footprint.read_size_level0),
            "tissue_fraction": frac.astype(np.float32),
        }
    )
    return frame.astype({"size_px": "int32", "read_level": "int32"})[schema.column_names(schema.CANDIDATES)]


def sample_cells(candidates: pd.DataFrame, n: int | None, seed: int, slide_id: str) -> pd.DataFrame:
    """Up to ``n`` candidates drawn without replacement by the slide's own generator, back in (y, x) order."""
    if n is None or len(candidates) <= n:
        return candidates.reset_index(drop=True)
    rng = slide_rng(seed, slide_id)
    picked = np.sort(rng.choice(len(candidates), size=n, replace=False))
    return candidates.iloc[picked].reset_index(drop=True)
