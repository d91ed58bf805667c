"""QC thumbnail per slide: the slide at low resolution, the tissue outline, and the selected tiles."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

# BGR colours per split so a reviewer sees where each split's tiles came from.
SPLIT_COLOURS = {"train": (40, 160, 40), "val_in": (200, 120, 0), "val_out": (0, 0, 220), "guidance": (160, 0, 160)}
OUTLINE = (255, 200, 0)


def qc_thumbnail(
    rgb: np.ndarray,
    mask: np.ndarray,
    tiles: pd.DataFrame,
    level0_scale: tuple[float, float],
    footprint_level0: tuple[float, float],
    max_px: int = 1024,
) -> bytes:
    """JPEG bytes of the thumbnail with mask outline and tile boxes drawn.

    ``level0_scale`` maps level-0 pixels to pixels of ``rgb``; the mask may be at any resolution.
    """
    scale = min(1.0, max_px / max(rgb.shape[:2]))
    size = (max(1, int(round(rgb.shape[1] * scale))), max(1, int(round(rgb.shape[0] * scale))))
    canvas = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), size, interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, OUTLINE, 2)
    sx, sy = level0_scale[0] * scale, level0_scale[1] * scale
    for row in tiles.itertuples(index=False):
        # guidance tiles are training tiles flagged for the guidance set: drawn in their own colour
        flagged = getattr(row, "guidance", False)
        split = "guidance" if pd.notna(flagged) and bool(flagged) else getattr(row, "split", "train")
        colour = SPLIT_COLOURS.get(split, (0, 0, 0))
        x0, y0 = int(row.x * sx), int(row.y * sy)
        x1, y1 = int((row.x + footprint_level0[0]) * sx), int((row.y + footprint_level0[1]) * sy)
        cv2.rectangle(canvas, (x0, y0), (max(x0 + 1, x1), max(y0 + 1, y1)), colour, 1)
    ok, buf = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("OpenCV failed to encode the QC thumbnail")
    return buf.tobytes()
