"""Synthetic slides, checked through the real readers (OpenSlide and tiffslide), never mocks."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from cytosyn.slides.synthetic import (
    ARTIFACT_TYPES,
    ArtifactMask,
    demo_cohort,
    load_artifact_mask,
    write_synthetic_slide,
)

TCGA_TABLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga"
GDC_NAME = re.compile(
    r"^TCGA-(?P<tss>[A-Z0-9]{2})-(?P<patient>[A-Z0-9]{4})-(?P<sample>\d{2})(?P<vial>[A-Z])"
    r"-(?P<portion>\d{2})-(?P<slide>DX\d+)\.(?P<uuid>[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12})\.svs$"
)
# Both backends decode with libjpeg-turbo and agree exactly (measured: max |diff| 0 at every
# level); the bound leaves room for a differently built decoder.
BACKEND_MAX_DIFF = 2


def _both(path: Path) -> tuple[openslide.OpenSlide, tiffslide.TiffSlide]:
    return openslide.OpenSlide(str(path)), tiffslide.TiffSlide(path)


def _rgb(region) -> np.ndarray:
    return np.asarray(region)[..., :3].astype(np.int16)  # OpenSlide returns RGBA


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("synthetic")
    write = write_synthetic_slide
    return {
        "40x": write(folder / "he40.svs", width=3000, height=2200, mpp=0.2520, seed=3),
        "20x": write(folder / "he20.svs", width=1600, height=1300, mpp=0.5020, seed=4),
        "artifacts": write(folder / "art.svs", width=3600, height=3000, mpp=0.5020, seed=5, artifacts=ARTIFACT_TYPES),
        "clean_twin": write(folder / "twin.svs", width=3600, height=3000, mpp=0.5020, seed=5),
    }


@pytest.mark.parametrize(
    ("name", "levels", "power"),
    [
        ("40x", [(3000, 2200), (750, 550), (187, 137)], "40"),
        ("20x", [(1600, 1300), (400, 325)], "20"),
    ],
)
def test_both_backends_see_the_aperio_pyramid(slides, name, levels, power):
    slide = slides[name]
    osl, tsl = _both(slide.path)
    downsamples = [4.0**i for i in range(len(levels))]
    assert osl.properties["openslide.vendor"] == "aperio"
    assert tsl.properties["tiffslide.vendor"] == "aperio"
    assert list(osl.level_dimensions) == levels
    assert [tuple(d) for d in tsl.level_dimensions] == levels
    assert osl.level_downsamples == pytest.approx(downsamples, rel=1e-2)
    assert tsl.level_downsamples == pytest.approx(downsamples, rel=1e-2)
    assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(slide.mpp, abs=1e-9)
    assert float(osl.properties["openslide.mpp-y"]) == pytest.approx(slide.mpp, abs=1e-9)
    assert tsl.properties["tiffslide.mpp-x"] == pytest.approx(slide.mpp, abs=1e-9)
    assert osl.properties["openslide.objective-power"] == power
    assert "thumbnail" in osl.associated_images and "thumbnail" in tsl.associated_images


def test_thumbnail_is_the_stripped_second_directory(slides):
    with tifffile.TiffFile(slides["40x"].path) as tif:
        pages = list(tif.pages)
        assert pages[0].is_tiled and not pages[1].is_tiled and all(p.is_tiled for p in pages[2:])
        first = pages[0].description
    assert first.startswith("Aperio Image Library") and "3000x2200 [0,0 3000x2200] (256x256) JPEG/RGB Q=90" in first
    assert "|AppMag = 40|" in first and "|MPP = 0.2520" in first


@pytest.mark.parametrize("name", ["40x", "artifacts"])
def test_backends_return_the_same_pixels(slides, name):
    osl, tsl = _both(slides[name].path)
    for level, size in enumerate(osl.level_dimensions):
        a = _rgb(osl.read_region((0, 0), level, size))
        b = _rgb(tsl.read_region((0, 0), level, size))
        assert np.abs(a - b).max() <= BACKEND_MAX_DIFF, f"level {level}"
    assert np.abs(_rgb(osl.associated_images["thumbnail"]) - _rgb(tsl.associated_images["thumbnail"])).max() <= BACKEND_MAX_DIFF


def test_he_slide_has_glass_pink_stroma_and_purple_nuclei(slides):
    _, tsl = _both(slides["40x"].path)
    rgb = _rgb(tsl.read_region((0, 0), 1, tsl.level_dimensions[1]))
    glass = (rgb.min(axis=2) > 225) & (np.ptp(rgb, axis=2) < 12)
    pink = (rgb[..., 0] > rgb[..., 1] + 40) & (rgb[..., 0] > 150)
    purple = (rgb[..., 2] > rgb[..., 0]) & (rgb[..., 2] > rgb[..., 1] + 30) & (rgb.sum(axis=2) < 450)
    assert 0.15 < glass.mean() < 0.85
    assert pink.mean() > 0.1
    assert purple.mean() > 0.005
    # Glass sits near (240, 240, 240) with a little noise.
    assert np.abs(rgb[glass].mean(axis=0) - 241).max() < 3


def test_same_arguments_write_the_same_bytes(tmp_path):
    args = dict(width=1200, height=900, mpp=0.2520, seed=11, artifacts=("bubble", "pen"))
    first = write_synthetic_slide(tmp_path / "a.svs", **args)
    second = write_synthetic_slide(tmp_path / "b.svs", **args)
    other_seed = write_synthetic_slide(tmp_path / "c.svs", **{**args, "seed": 12})
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes() != other_seed.path.read_bytes()
    assert first.artifact_mask_path.read_bytes() == second.artifact_mask_path.read_bytes()
    meta = [p.with_name(p.stem + ".artifacts.json").read_text() for p in (first.path, second.path)]
    assert meta[0] == meta[1]


def test_without_mpp_no_reader_finds_one(tmp_path):
    slide = write_synthetic_slide(tmp_path / "nompp.svs", width=800, height=600, mpp=0.2520, write_mpp=False)
    osl, tsl = _both(slide.path)
    assert "openslide.mpp-x" not in osl.properties and "openslide.mpp-y" not in osl.properties
    assert tsl.properties["tiffslide.mpp-x"] is None and tsl.properties["tiffslide.mpp-y"] is None
    assert osl.properties["openslide.objective-power"] == "40"  # objective power stays, as on real scans
    with tifffile.TiffFile(slide.path) as tif:
        for page in tif.pages:
            assert "MPP" not in page.description
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE


def _dominant_period(profile: np.ndarray) -> float:
    profile = profile - profile.mean()
    padded = 16 * len(profile)  # zero padding: sub-bin frequency resolution
    spectrum = np.abs(np.fft.rfft(profile * np.hanning(len(profile)), n=padded))
    spectrum[0] = 0
    return padded / int(np.argmax(spectrum))


@pytest.mark.parametrize("mpp", [0.2520, 0.5020])
def test_stripes_have_the_physical_period(tmp_path, mpp):
    slide = write_synthetic_slide(tmp_path / "stripes.svs", width=2048, height=512, mpp=mpp, pattern="stripes",
                                  stripe_period_um=10.0)
    _, tsl = _both(slide.path)
    rgb = _rgb(tsl.read_region((0, 0), 0, (2048, 512))).astype(float)
    columns = rgb.mean(axis=(0, 2))
    assert _dominant_period(columns) == pytest.approx(10.0 / mpp, rel=0.01)
    # Vertical stripes: every row shows the same profile.
    assert np.abs(rgb.mean(axis=2) - rgb.mean(axis=2).mean(axis=0)).mean() < 2


def test_tissue_layout_is_physical(tmp_path):
    """The same seed at 40x and 20x over the same area gives the same tissue outline."""
    masks = []
    for mpp, name in ((0.2520, "fine.svs"), (0.5040, "coarse.svs")):
        slide = write_synthetic_slide(tmp_path / name, width=round(1008 / mpp), height=round(756 / mpp), mpp=mpp, seed=21)
        _, tsl = _both(slide.path)
        rgb = np.ascontiguousarray(tsl.read_region((0, 0), 1, tsl.level_dimensions[1]))
        # 8 µm/px for both, as a tissue mask is made; the fine texture is drawn per MPP and
        # only the outline is expected to match.
        rgb = cv2.resize(rgb, (126, 94), interpolation=cv2.INTER_AREA)
        masks.append(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 25)
    overlap = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
    assert masks[0].mean() > 0.1
    assert overlap > 0.93


def test_fraction_weights_cells_by_overlap():
    mask = ArtifactMask(labels=np.array([[0, 1], [2, 0]], np.uint8), downsample=16, names={1: "pen", 2: "fold"})
    assert mask.fraction(0, 0, 32, 32) == {"pen": 0.25, "fold": 0.25}
    assert mask.fraction(8, 0, 16, 16) == {"pen": 0.5, "fold": 0.0}
    assert mask.fraction(16, 8, 8, 16) == {"pen": 0.5, "fold": 0.0}
    # Beyond the slide counts as artifact-free.
    assert mask.fraction(16, 0, 32, 16) == {"pen": 0.5, "fold": 0.0}
    assert mask.fraction(100, 100, 10, 10) == {"pen": 0.0, "fold": 0.0}


def test_ground_truth_is_written_beside_the_slide(slides):
    slide = slides["artifacts"]
    meta = json.loads(slide.path.with_name("art.artifacts.json").read_text())
    assert slide.artifact_mask_path == slide.path.with_name("art.artifacts.png")
    assert meta == {"downsample": 16, "labels": {"1": "pen", "2": "blur", "3": "fold", "4": "bubble"},
                    "width": 3600, "height": 3000}
    mask = load_artifact_mask(slide.path)
    assert mask.labels.shape == (math.ceil(3000 / 16), math.ceil(3600 / 16))
    assert mask.labels.dtype == np.uint8
    # 3600 x 3000 is not a multiple of 16: take the cells wholly inside the slide.
    inner = mask.fraction(0, 0, 3600 // 16 * 16, 3000 // 16 * 16)
    for code, name in mask.names.items():
        assert inner[name] == pytest.approx((mask.labels[: 3000 // 16, : 3600 // 16] == code).mean(), abs=1e-12)
        assert inner[name] > 0, name
    assert slides["clean_twin"].artifact_mask_path is None
    assert load_artifact_mask(slides["clean_twin"].path) is None


def test_every_artifact_covers_whole_tiles(slides):
    """Each type has somewhere a 224-px tile at 0.5 µm/px (112 µm) lying wholly inside it."""
    slide = slides["artifacts"]
    mask = load_artifact_mask(slide.path)
    tile_px = round(112 / slide.mpp)
    cells = tile_px // mask.downsample + 2
    for code, name in mask.names.items():
        inside = cv2.erode((mask.labels == code).astype(np.uint8), np.ones((cells, cells), np.uint8))
        ys, xs = np.nonzero(inside)
        assert len(ys), f"no whole tile inside {name}"
        x = int(xs[0] - cells // 2) * mask.downsample + mask.downsample
        y = int(ys[0] - cells // 2) * mask.downsample + mask.downsample
        assert mask.fraction(x, y, tile_px, tile_px)[name] == 1.0


def test_pixels_change_exactly_where_the_mask_says(slides):
    """Against a twin rendered without artifacts: labelled cells differ, unlabelled ones far away do not."""
    mask = load_artifact_mask(slides["artifacts"].path)
    images = []
    for name in ("artifacts", "clean_twin"):
        _, tsl = _both(slides[name].path)
        images.append(_rgb(tsl.read_region((0, 0), 0, tsl.dimensions)))
    # Level 0, where a JPEG block (16 px) spans one label cell, so re-encoding cannot smear a
    # change further. Difference first, then average per cell: blur shows only in fine detail.
    pixel_change = np.abs(images[0] - images[1]).mean(axis=2).astype(np.float32)
    change = cv2.resize(pixel_change, (mask.labels.shape[1], mask.labels.shape[0]), interpolation=cv2.INTER_AREA)
    kernel = np.ones((5, 5), np.uint8)
    for code, name in mask.names.items():
        interior = cv2.erode((mask.labels == code).astype(np.uint8), kernel).astype(bool)
        assert np.median(change[interior]) > 4, name
    far = ~cv2.dilate((mask.labels > 0).astype(np.uint8), kernel).astype(bool)
    assert far.mean() > 0.3
    assert change[far].max() < 1


def test_demo_cohort_is_tcga_like_and_idempotent(tmp_path):
    cohort = demo_cohort(tmp_path, n_slides=8, seed=0, size_um=(500, 400))
    names = [GDC_NAME.match(s.path.name) for s in cohort]
    assert all(names), [s.path.name for s in cohort]
    assert len({m["patient"] for m in names}) == 8
    assert {m["sample"] + m["vial"] for m in names} == {"01Z"}
    assert len({m["tss"] for m in names}) >= 6
    assert {s.mpp for s in cohort} == {0.2520, 0.5020}
    assert 3 <= sum(s.artifact_mask_path is not None for s in cohort) <= 5
    magnifications = {kind: set() for kind in ARTIFACT_TYPES}
    for slide in cohort:
        for kind in (load_artifact_mask(slide.path).names.values() if slide.artifact_mask_path else ()):
            magnifications[kind].add(slide.mpp)
    assert all(mpps == {0.2520, 0.5020} for mpps in magnifications.values()), magnifications
    for slide in cohort:
        osl = openslide.OpenSlide(str(slide.path))
        assert osl.dimensions == (slide.width, slide.height) == (round(500 / slide.mpp), round(400 / slide.mpp))

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert demo_cohort(tmp_path, n_slides=8, seed=0, size_um=(500, 400)) == cohort
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_demo_cohort_spans_projects_by_the_tss_table(tmp_path):
    sites, projects = TCGA_TABLES / "tissueSourceSite.csv", TCGA_TABLES / "projects.csv"
    if not (sites.exists() and projects.exists()):
        pytest.skip("TCGA reference tables not present in ../shared/data/tcga")
    with sites.open() as fh:
        study_of_tss = {row["TSS Code"]: row["Study Name"] for row in csv.DictReader(fh)}
    with projects.open() as fh:
        project_of_study = {row["study_name"].lower(): row["project"] for row in csv.DictReader(fh)}
    cohort = demo_cohort(tmp_path, n_slides=8, seed=0, size_um=(300, 250))
    found = [project_of_study[study_of_tss[GDC_NAME.match(s.path.name)["tss"]].lower()] for s in cohort]
    assert len(set(found)) >= 3
    assert set(found) <= {"BRCA", "COAD", "LUAD", "KIRC"}


@pytest.mark.parametrize(
    "bad",
    [{"pattern": "dots"}, {"artifacts": ("smudge",)}, {"tile_size": 100}, {"mpp": 0.0}, {"width": 0}],
)
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        write_synthetic_slide(tmp_path / "bad.svs", **{"width": 256, "height": 256, **bad})
    assert not (tmp_path / "bad.svs").exists()
