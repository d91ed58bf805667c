"""Cheap filters before the classifier: near-white, low saturation, blur; each switchable and counted."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cytosyn.config import CurationFiltersConfig
from cytosyn.curation.filters import count_reasons, filter_reasons, tile_measures
from cytosyn.slides import open_slide
from cytosyn.slides.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def he_tile(tmp_path_factory) -> np.ndarray:
    """A 224 px tile of synthetic H&E at 0.5 µm/px, from the middle of the tissue."""
    path = tmp_path_factory.mktemp("slide") / "s.svs"
    write_synthetic_slide(path, width=1600, height=1600, mpp=0.5, seed=4)
    with open_slide(path) as slide:
        return slide.read_region_at_mpp(688, 688, 224, 0.5)


def test_measures_follow_their_definitions(he_tile):
    white = np.full((224, 224, 3), 250, np.uint8)
    assert tile_measures(white, 220).tolist() == [1.0, 0.0, 0.0]
    half = white.copy()
    half[:112] = (120, 60, 140)
    w, s, lap = tile_measures(half, 220)
    assert w == pytest.approx(0.5)
    assert s == pytest.approx(cv2.cvtColor(half, cv2.COLOR_RGB2HSV)[..., 1].mean())
    assert lap > 0
    grey = cv2.cvtColor(he_tile, cv2.COLOR_RGB2GRAY)
    assert tile_measures(he_tile, 220)[2] == pytest.approx(cv2.Laplacian(grey, cv2.CV_64F).var(), rel=1e-6)


def test_each_filter_catches_its_own_failure(he_tile):
    cfg = CurationFiltersConfig()
    background = np.full((224, 224, 3), 242, np.uint8)
    background[100:110, 100:110] = (150, 80, 160)  # a speck of tissue on glass
    grey = np.repeat(cv2.cvtColor(he_tile, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)  # unstained-looking
    blurred = cv2.GaussianBlur(he_tile, (0, 0), 3.0)  # ~1.5 µm out of focus
    tiles = [he_tile, background, grey, blurred]
    reasons = filter_reasons(np.stack([tile_measures(t, cfg.white_level) for t in tiles]), cfg)
    assert reasons.tolist() == ["", "near_white", "low_saturation", "blur"]
    assert count_reasons(reasons) == {"near_white": 1, "low_saturation": 1, "blur": 1}


def test_filters_can_be_switched_off_one_by_one(he_tile):
    blurred = cv2.GaussianBlur(he_tile, (0, 0), 3.0)
    background = np.full((224, 224, 3), 242, np.uint8)
    measures = np.stack([tile_measures(t, 220) for t in (blurred, background)])
    assert filter_reasons(measures, CurationFiltersConfig()).tolist() == ["blur", "near_white"]
    # Without near-white, the empty tile is caught by the next filter it fails (flat glass has no colour).
    assert filter_reasons(measures, CurationFiltersConfig(near_white=False)).tolist() == ["blur", "low_saturation"]
    assert filter_reasons(measures, CurationFiltersConfig(blur=False)).tolist() == ["", "near_white"]
    off = CurationFiltersConfig(near_white=False, low_saturation=False, blur=False)
    assert filter_reasons(measures, off).tolist() == ["", ""]
    assert count_reasons(filter_reasons(measures, off)) == {"near_white": 0, "low_saturation": 0, "blur": 0}


def test_an_unreadable_tile_is_not_a_filter_verdict():
    reasons = filter_reasons(np.full((2, 3), np.nan, np.float32), CurationFiltersConfig())
    assert reasons.tolist() == ["", ""]
