"""open_slide and reads at an exact MPP, on the real Aperio slide and on the shared bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_file
from cytosyn.slides import SlideError, open_slide
from cytosyn.slides.mpp import resolve_mpp
from cytosyn.slides.synthetic import write_synthetic_slide


def test_cmu_metadata_in_both_backends(cmu_slide):
    for backend in ("openslide", "tiffslide"):
        with open_slide(cmu_slide, backend=backend) as s:
            assert s.backend == backend
            assert s.vendor == "aperio"
            assert s.dimensions == (2220, 2967)
            assert s.mpp_x == pytest.approx(0.499)
            assert s.mpp.source == f"{backend}-property"
            assert s.objective_power == 20


def test_tile_is_exact_size_and_footprint(cmu_slide):
    with open_slide(cmu_slide) as s:
        fp = s.footprint(224, 0.5)
        assert abs(fp.read_size_level0 - 224 * 0.5 / 0.499) <= 1
        assert fp.read_level == 0 and (fp.read_w, fp.read_h) == (224, 224)
        tile = s.read_region_at_mpp(500, 700, 224, 0.5)
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
        # 224 · 0.5 / 0.499 = 224.45 px rounds to a 224 px read: the tile is those pixels, unresampled.
        assert np.array_equal(tile, s.read_region(500, 700, 0, 224, 224))


def test_backends_return_the_same_pixels(cmu_slide):
    with open_slide(cmu_slide, backend="openslide") as a, open_slide(cmu_slide, backend="tiffslide") as b:
        diffs = [
            np.abs(a.read_region_at_mpp(x, y, 224, 0.5).astype(int) - b.read_region_at_mpp(x, y, 224, 0.5).astype(int))
            # inside, and across the left/top and right/bottom edges (256 px context reads do that)
            for x, y in [(0, 0), (600, 900), (1500, 2000), (-16, -16), (2100, 2850)]
        ]
        outside = b.read_region_at_mpp(-16, -16, 224, 0.5)[:16, :16]
        assert (outside == 255).all()  # white beyond the image, as OpenSlide's transparent pixels
    # Measured: both decode the same JPEG tiles with libjpeg-turbo; mean |Δ| 0.0, max 0 on this slide.
    # The bound leaves room for a different IDCT in another libjpeg build.
    assert max(d.mean() for d in diffs) < 1.0
    assert max(d.max() for d in diffs) <= 8


def test_override_wins_and_is_never_rounded(cmu_slide):
    with open_slide(cmu_slide, mpp=0.2527) as s:
        assert s.mpp.source == "override" and s.mpp_x == 0.2527
        fp = s.footprint(224, 0.5)
        assert fp.read_level == 0 and abs(fp.size_level0_x - 224 * 0.5 / 0.2527) < 1e-9
        assert fp.read_size_level0 == 443


def test_missing_mpp_says_how_to_give_one():
    path = shared_file("slides/boxes.tiff")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and "--mpp" in msg and "mpp` column" in msg and "\n" not in msg
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp.source == "override"


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_broken_slides_fail_with_one_line_naming_the_file(name):
    path = shared_file(f"slides/{name}")
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_text_file_named_svs_fails_cleanly(tmp_path):
    fake = tmp_path / "TCGA-A1-A0SB-01Z-00-DX1.svs"
    fake.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="cannot be opened"):
        open_slide(fake)


def test_dicom_opens_with_openslide():
    path = shared_file("slides/boxes_0.dcm")
    with open_slide(path) as s:
        assert s.backend == "openslide" and s.vendor == "dicom"


def test_mpp_resolution_order():
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "aperio.MPP": "0.3", "tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}
    assert resolve_mpp(props).source == "openslide-property"
    del props["openslide.mpp-x"]
    assert resolve_mpp(props).source == "aperio-mpp"
    del props["aperio.MPP"]
    mpp = resolve_mpp(props)
    assert mpp.source == "tiff-resolution" and mpp.x == pytest.approx(0.25)
    # 72 dpi is a placeholder, not a microscope: it must not be taken as an MPP.
    with pytest.raises(ValueError, match="no MPP"):
        resolve_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"})
    with pytest.raises(ValueError, match="objective power 40x"):
        resolve_mpp({"aperio.AppMag": "40"})
    fallback = resolve_mpp({"aperio.AppMag": "40"}, objective_power_fallback=True)
    assert fallback.source == "objective-power" and fallback.x == pytest.approx(0.25)


def test_alpha_is_composited_on_white():
    from cytosyn.slides.reader import composite_on_white

    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 128]]], np.uint8)
    out = composite_on_white(rgba)
    assert out.tolist() == [[[10, 20, 30], [255, 255, 255], [127, 177, 227]]]


def test_a_dicom_series_is_one_slide():
    from cytosyn.cohort.inventory import inventory_from_folder

    folder = shared_file("slides")
    inv = inventory_from_folder(folder, kind="generic", extensions=[".dcm"])
    # one slide for boxes_0.dcm and boxes_1.dcm (its two levels), named after the series' folder
    assert inv["slide_id"].tolist() == [folder.name]
    with open_slide(inv.loc[0, "path"]) as s:
        assert s.vendor == "dicom" and s.level_count >= 1


@pytest.mark.parametrize(
    ("mpp", "level", "read_px"),
    [
        (0.125, 1, 224),  # the 4× level is exactly 0.5 µm/px
        (0.12502, 1, 224),  # 0.50008 µm/px: within the rounding of stored downsamples
        (0.1254, 0, 893),  # 0.5016 µm/px is coarser than the target: read level 0 and reduce
    ],
)
def test_the_read_level_is_never_coarser_than_the_target(tmp_path, mpp, level, read_px):
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, width=2048, height=2048, mpp=mpp, seed=0)
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as s:
            assert s.level_downsamples[:2] == (1.0, 4.0)
            fp = s.footprint(224, 0.5)
            assert (fp.read_level, fp.read_w, fp.read_h) == (level, read_px, read_px)
            assert s.mpp_x * s.level_downsamples[fp.read_level] <= 0.5 * 1.001
            assert s.read_region_at_mpp(300, 300, 224, 0.5).shape == (224, 224, 3)
