"""Writing selected tiles as lossless PNGs, atomically and resumably, and the per-slide tile manifest."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from cytosyn.io import schema
from cytosyn.io.atomic import write_bytes_atomic
from cytosyn.io.hashing import sha256_bytes
from cytosyn.io.layout import DatasetLayout
from cytosyn.slides.reader import Footprint, Slide


def encode_png(rgb: np.ndarray, compression: int = 1) -> bytes:
    """Lossless PNG bytes of an RGB tile (deterministic for a given OpenCV build)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a PNG")
    return buf.tobytes()


def extract_tiles(
    slide: Slide,
    selection: pd.DataFrame,
    layout: DatasetLayout,
    project: str,
    png_compression: int = 1,
) -> pd.DataFrame:
    """Write every selected tile that is not on disk yet; return TILES rows in selection order.

    A PNG already at its final name is complete (it was renamed into place), so a rerun only reads its
    bytes back for the checksum: resuming a killed build writes nothing twice.
    """
    image_paths, checksums = [], []
    footprints: dict[tuple[int, float], Footprint] = {}
    for row in selection.itertuples(index=False):
        rel = layout.tile_image_relpath(project, row.slide_id, row.tile_id)
        target = layout.resolve(rel)
        if target.exists():
            data = target.read_bytes()
        else:
            key = (int(row.size_px), float(row.mpp))
            if key not in footprints:
                footprints[key] = slide.footprint(*key)
            rgb = slide.read_region_at_mpp(int(row.x), int(row.y), *key, footprint=footprints[key])
            data = encode_png(rgb, png_compression)
            write_bytes_atomic(target, data)
        image_paths.append(rel)
        checksums.append(sha256_bytes(data))
    tiles = selection.copy()
    tiles["image_path"] = image_paths
    tiles["image_sha256"] = checksums
    return tiles[schema.column_names(schema.TILES) + [c for c in tiles.columns if c not in schema.TILES.names]]
