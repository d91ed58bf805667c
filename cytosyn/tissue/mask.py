"""Tissue masks at ~8–16 µm/px: saturation, median blur, Otsu, closing, hole filling, small-object removal.

H&E tissue is coloured (eosin pink, haematoxylin purple) while glass is grey-white, so saturation
separates them better than brightness does. Pen marks are saturated too, which is why their hues are
removed explicitly.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from cytosyn.config import TissueConfig


def pen_mark_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink (green, blue, black) that H&E stain never produces."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0].astype(np.int16), hsv[..., 1], hsv[..., 2]
    # OpenCV hue is 0..179: green ≈ 35–85, blue ≈ 90–125. H&E lives in pink/purple (≈125–179 and 0–10).
    green = (h >= 35) & (h <= 85) & (s > 50) & (v > 30)
    blue = (h > 85) & (h <= 125) & (s > 60) & (v > 30)
    black = v < 40
    return green | blue | black


def _disk(radius_px: int) -> np.ndarray:
    size = 2 * radius_px + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def tissue_mask(rgb: np.ndarray, mask_mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB image at ``mask_mpp`` µm/px."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    k = cfg.median_blur_px | 1  # median blur needs an odd aperture
    saturation = cv2.medianBlur(saturation, k)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # On a slide that is nearly all tissue or all glass Otsu splits noise; the floor keeps glass out.
    mask = saturation > max(otsu, cfg.min_saturation)
    if cfg.exclude_pen_marks:
        mask &= ~pen_mark_mask(rgb)
    if cfg.closing_px > 0:
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disk(cfg.closing_px)).astype(bool)
    px_area_um2 = mask_mpp * mask_mpp
    mask = _fill_small_holes(mask, int(cfg.max_hole_area_um2 / px_area_um2))
    mask = _remove_small_objects(mask, int(cfg.min_object_area_um2 / px_area_um2))
    if cfg.exclude_pen_marks:
        # Closing and hole filling may bridge over ink; take it out once more.
        mask &= ~pen_mark_mask(rgb)
    return mask


def _remove_small_objects(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    if min_area_px <= 1:
        return mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_area_px
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area_px: int) -> np.ndarray:
    if max_area_px <= 0:
        return mask
    holes = ~mask
    labels, n = ndimage.label(holes)
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    # Background touching the border is glass, never a hole.
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = areas <= max_area_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def cell_tissue_fractions(
    mask: np.ndarray,
    scale_x: float,
    scale_y: float,
    xs: np.ndarray,
    ys: np.ndarray,
    w0: float,
    h0: float,
) -> np.ndarray:
    """Fraction of each level-0 rectangle (x, y, w0, h0) covered by tissue.

    ``scale_x``/``scale_y`` map level-0 pixels to mask pixels. Rectangles are snapped to mask pixels; a
    summed-area table makes this O(1) per cell, which matters with hundreds of thousands of cells.
    """
    if len(xs) == 0:
        return np.zeros(0, dtype=np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x0 = np.clip(np.rint(xs * scale_x).astype(np.int64), 0, mask.shape[1])
    y0 = np.clip(np.rint(ys * scale_y).astype(np.int64), 0, mask.shape[0])
    x1 = np.clip(np.rint((xs + w0) * scale_x).astype(np.int64), 0, mask.shape[1])
    y1 = np.clip(np.rint((ys + h0) * scale_y).astype(np.int64), 0, mask.shape[0])
    area = (x1 - x0) * (y1 - y0)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, covered / np.maximum(area, 1), 0.0)
    return frac.astype(np.float32)
