"""Tissue masks, the candidate grid and per-slide sampling."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from cytosyn.config import TissueConfig
from cytosyn.slides import open_slide
from cytosyn.tiling.grid import grid_origins, sample_cells
from cytosyn.tiling.qc import OUTLINE, SPLIT_COLOURS, qc_thumbnail
from cytosyn.tissue import cell_tissue_fractions, pen_mark_mask, tissue_mask


def _pink_blob(h=200, w=300):
    rgb = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 3) ** 2 < 1
    rgb[blob] = (215, 120, 170)  # eosin pink
    return rgb, blob


def test_mask_finds_tissue_and_drops_pen_ink():
    rgb, blob = _pink_blob()
    mask = tissue_mask(rgb, 8.0, TissueConfig())
    assert (mask == blob).mean() > 0.98
    rgb[90:110, 40:260] = (20, 160, 40)  # green marker stroke across the tissue
    assert pen_mark_mask(rgb)[100, 150]
    inked = tissue_mask(rgb, 8.0, TissueConfig())
    assert not inked[95:105, 60:240].any()
    assert not pen_mark_mask(_pink_blob()[0]).any()


def test_glass_only_gives_empty_mask():
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 3, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, 8.0, TissueConfig()).any()


def test_real_slide_mask_is_plausible(cmu_slide):
    with open_slide(cmu_slide) as s:
        rgb = s.read_at_mpp(8.0)
    assert rgb.shape[:2] == (int(np.ceil(2967 * 0.499 / 8)), int(np.ceil(2220 * 0.499 / 8)))
    mask = tissue_mask(rgb, 8.0, TissueConfig())
    # CMU-1-Small-Region is a strip of skin over glass: about a third is tissue.
    assert 0.2 < mask.mean() < 0.6


def test_grid_cells_are_whole_and_do_not_overlap():
    footprint = 224 * 0.5 / 0.2527
    xs = grid_origins(10_000, footprint)
    assert len(xs) == int(10_000 // footprint)
    assert xs[0] == 0 and np.all(np.diff(xs) >= int(footprint)) and xs[-1] + footprint <= 10_000
    # No cumulative drift: the last cell starts where the exact float grid says.
    assert abs(xs[-1] - (len(xs) - 1) * footprint) <= 0.5


def test_cell_fractions_are_exact_on_a_known_mask():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    frac = cell_tissue_fractions(mask, 0.1, 0.1, np.array([0, 30, 50]), np.array([0, 0, 0]), 20, 20)
    np.testing.assert_allclose(frac, [1.0, 1.0, 0.0])
    assert cell_tissue_fractions(mask, 0.1, 0.1, np.array([40]), np.array([0]), 20, 20)[0] == 0.5


def test_sampling_is_deterministic_per_slide_and_ordered():
    cands = pd.DataFrame({"tile_id": [f"t{i}" for i in range(100)], "x": np.arange(100), "y": 0})
    a = sample_cells(cands, 10, seed=3, slide_id="S1")
    b = sample_cells(cands.copy(), 10, seed=3, slide_id="S1")
    c = sample_cells(cands, 10, seed=3, slide_id="S2")
    pd.testing.assert_frame_equal(a, b)
    assert list(a.tile_id) != list(c.tile_id)
    assert list(a.x) == sorted(a.x)
    assert len(sample_cells(cands, 500, 3, "S1")) == 100


def test_qc_thumbnail_draws_the_mask_outline_and_each_tile_in_its_split_colour():
    rgb = np.full((400, 400, 3), 242, np.uint8)
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True  # 8× coarser than the thumbnail: rows/cols 80–320 of it
    # level-0 pixels are 2× the thumbnail's; tiles of 100 level-0 px = 50 thumbnail px
    tiles = pd.DataFrame({"x": [200, 400, 560], "y": [200, 400, 560], "split": ["train", "val_out", "train"],
                          "guidance": [False, False, True]})
    jpeg = qc_thumbnail(rgb, mask, tiles, (0.5, 0.5), (100.0, 100.0), max_px=400)
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert bgr.shape == (400, 400, 3)

    palette = {"grey": (242, 242, 242), "outline": OUTLINE, **SPLIT_COLOURS}

    def near(pixel, colour):
        # 1 px lines lose some colour to JPEG's chroma subsampling: the drawn colour must still be
        # the nearest of the palette's
        distance = {name: np.abs(pixel.astype(int) - np.array(c)).sum() for name, c in palette.items()}
        return palette[min(distance, key=distance.get)] == colour

    assert near(bgr[80, 200], OUTLINE) and near(bgr[200, 80], OUTLINE)  # the mask's top and left edges
    assert near(bgr[100, 125], SPLIT_COLOURS["train"])  # top edge of the first tile box (100–150)
    assert near(bgr[225, 200], SPLIT_COLOURS["val_out"])  # left edge of the second (200–250)
    assert near(bgr[305, 280], SPLIT_COLOURS["guidance"])  # left edge of the third, a guidance tile
    assert np.abs(bgr[125, 125].astype(int) - 242).max() < 10  # inside a box the slide shows through
