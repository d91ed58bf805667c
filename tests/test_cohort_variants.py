"""256 px context and JPEG q70 variants of selected tiles, read from a real (synthetic) SVS."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest_cohort import candidates_frame, cli, slides_frame, tcga_specs
from cytosyn.cohort.selection import select_tiles
from cytosyn.cohort.variants import write_variants
from cytosyn.config import CohortConfig
from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.hashing import sha256_bytes
from cytosyn.io.images import read_png_rgb
from cytosyn.io.layout import DatasetLayout
from cytosyn.slides.reader import open_slide
from cytosyn.slides.synthetic import write_synthetic_slide
from cytosyn.tiling.extract import encode_png

TILE, MPP = 224, 0.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DatasetLayout:
    """Four slides at exactly 0.5 µm/px (so a tile is a plain crop), a cohort selection, and the PNGs."""
    root = tmp_path_factory.mktemp("variants")
    layout = DatasetLayout(root / "ds")
    specs = tcga_specs({"AA": "COAD", "A1": "BRCA"}, patients_per_site=2, nx=4, ny=3)
    slides = slides_frame(specs)
    for i, spec in enumerate(specs):
        path = root / f"{spec.slide_id}.svs"
        write_synthetic_slide(path, width=4 * TILE + 64, height=3 * TILE + 64, mpp=MPP, seed=i)
        slides.loc[i, ["path", "width", "height", "mpp_x", "mpp_y"]] = [str(path), 4 * TILE + 64, 3 * TILE + 64, MPP, MPP]
        cands = candidates_frame(spec.slide_id, spec.nx, spec.ny, read0=TILE, origin=32)
        write_parquet_atomic(layout.candidates_path(spec.slide_id), cands, schema.CANDIDATES)
    write_parquet_atomic(layout.slides_parquet, slides, schema.SLIDES)
    select_tiles(layout, CohortConfig(budget=20, val_out_slides=2, val_in_tiles=6, val_out_tiles=8, guidance_tiles=4), seed=0)
    for spec in specs:
        sel = pd.read_parquet(layout.selection_path(spec.slide_id))
        paths, sums = [], []
        with open_slide(slides.set_index("slide_id").at[spec.slide_id, "path"]) as slide:
            for row in sel.itertuples(index=False):
                data = encode_png(slide.read_region_at_mpp(row.x, row.y, TILE, MPP))
                rel = layout.tile_image_relpath(spec.project, spec.slide_id, row.tile_id)
                layout.resolve(rel).parent.mkdir(parents=True, exist_ok=True)
                layout.resolve(rel).write_bytes(data)
                paths.append(rel)
                sums.append(sha256_bytes(data))
        write_parquet_atomic(layout.tiles_path(spec.slide_id), sel.assign(image_path=paths, image_sha256=sums), schema.TILES)
    return layout


def variant_rows(layout: DatasetLayout, name: str) -> pd.DataFrame:
    files = sorted(layout.variants_dir(name).glob("tiles/*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def tiles_of(layout: DatasetLayout) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted(layout.tiles_dir.glob("*.parquet"))], ignore_index=True)


def test_context_tiles_share_the_centre(dataset):
    report = write_variants(dataset, ["val_out", "guidance"], size_px=256)
    assert report.ok, report.errors
    rows = variant_rows(dataset, "256px-png")
    tiles = tiles_of(dataset)
    wanted = tiles[(tiles["split"] == "val_out") | tiles["guidance"]]
    assert sorted(rows["tile_id"]) == sorted(wanted["tile_id"]) and report.tiles == len(wanted) == 12
    assert rows.columns.tolist() == schema.VARIANT_TILES.names
    assert (rows.loc[rows["guidance"], "split"] == "train").all() and (rows["size_px"] == 256).all()
    source = wanted.set_index("tile_id")["image_path"]
    for row in rows.itertuples(index=False):
        ctx = read_png_rgb(dataset.resolve(row.image_path))
        assert ctx.shape == (256, 256, 3)
        assert np.array_equal(ctx[16:240, 16:240], read_png_rgb(dataset.resolve(source[row.tile_id])))
        assert row.image_sha256 == sha256_bytes(dataset.resolve(row.image_path).read_bytes())


def test_rerun_writes_nothing(dataset):
    write_variants(dataset, ["val_out"], size_px=256, jpeg_quality=70)
    manifests = sorted(dataset.variants_dir("256px-jpeg70").glob("tiles/*.parquet"))
    images = sorted(dataset.variants_dir("256px-jpeg70").rglob("*.jpg"))
    stamps = [p.stat().st_mtime_ns for p in manifests + images]
    again = write_variants(dataset, ["val_out"], size_px=256, jpeg_quality=70)
    assert again.ok and again.tiles == 8
    assert [p.stat().st_mtime_ns for p in manifests + images] == stamps


def test_a_later_request_adds_splits_without_dropping_earlier_ones(dataset):
    assert write_variants(dataset, ["val_out"], size_px=248).ok
    first = variant_rows(dataset, "248px-png")
    images = {row.image_path: dataset.resolve(row.image_path).stat().st_mtime_ns for row in first.itertuples()}
    report = write_variants(dataset, ["val_in"], size_px=248)
    assert report.ok and report.tiles == 6
    rows = variant_rows(dataset, "248px-png")
    assert sorted(rows["split"].value_counts().items()) == [("val_in", 6), ("val_out", 8)]
    assert {p: dataset.resolve(p).stat().st_mtime_ns for p in images} == images
    for f in sorted(dataset.variants_dir("248px-png").glob("tiles/*.parquet")):
        ids = pd.read_parquet(f, columns=["tile_id"])["tile_id"].tolist()
        assert ids == sorted(ids)


def test_rows_of_tiles_no_longer_in_the_dataset_are_dropped(dataset):
    assert write_variants(dataset, ["val_out"], size_px=232).ok
    manifest = next(f for f in sorted(dataset.tiles_dir.glob("*.parquet")) if (pd.read_parquet(f)["split"] == "val_out").any())
    original = pd.read_parquet(manifest)
    gone = original.loc[original["split"] == "val_out", "tile_id"].iloc[0]
    write_parquet_atomic(manifest, original[original["tile_id"] != gone], schema.TILES)
    try:
        assert write_variants(dataset, ["val_out"], size_px=232).ok
        rows = variant_rows(dataset, "232px-png")
        assert gone not in set(rows["tile_id"]) and len(rows) == 7
    finally:
        write_parquet_atomic(manifest, original, schema.TILES)


def test_kept_rows_take_the_split_their_tile_has_now(dataset):
    assert write_variants(dataset, ["val_in"], size_px=236).ok
    manifest = next(f for f in sorted(dataset.tiles_dir.glob("*.parquet")) if (pd.read_parquet(f)["split"] == "val_in").any())
    original = pd.read_parquet(manifest)
    moved = original.loc[original["split"] == "val_in", "tile_id"].iloc[0]
    write_parquet_atomic(manifest, original.assign(split=original["split"].where(original["tile_id"] != moved, "train")), schema.TILES)
    try:
        assert write_variants(dataset, ["val_in"], size_px=236).ok
        rows = variant_rows(dataset, "236px-png").set_index("tile_id")
        assert rows.at[moved, "split"] == "train" and (rows.drop(index=moved)["split"] == "val_in").all()
    finally:
        write_parquet_atomic(manifest, original, schema.TILES)


def test_jpeg_q70_of_the_dataset_pngs(dataset):
    res = cli("data", "variants", dataset.root, "--split", "val_in", "--size", "224", "--jpeg-quality", "70")
    assert res.exit_code == 0, res.output
    rows = variant_rows(dataset, "224px-jpeg70")
    tiles = tiles_of(dataset).set_index("tile_id")
    assert len(rows) == 6 and (rows["split"] == "val_in").all()
    for row in rows.itertuples(index=False):
        data = dataset.resolve(row.image_path).read_bytes()
        assert row.image_path.endswith(".jpg") and data[:3] == b"\xff\xd8\xff"
        jpeg = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        png = read_png_rgb(dataset.resolve(tiles.at[row.tile_id, "image_path"])).astype(int)
        error = np.abs(jpeg - png).mean()
        assert 0 < error < 12  # lossy, but the same picture


def test_a_missing_slide_fails_only_itself(dataset, tmp_path):
    slides = pd.read_parquet(dataset.slides_parquet)
    out_ids = slides.loc[slides["split"] == "val_out", "slide_id"].tolist()
    original = slides.copy()
    slides.loc[slides["slide_id"] == out_ids[0], "path"] = str(tmp_path / "gone.svs")
    slides.to_parquet(dataset.slides_parquet, index=False)
    try:
        res = cli("data", "variants", dataset.root, "--split", "val_out", "--size", "240")
        assert res.exit_code == 1
        assert "gone.svs" in res.output and "1 slide(s) failed" in res.output
        assert not (dataset.variants_dir("240px-png") / "tiles" / f"{out_ids[0]}.parquet").exists()
        assert (dataset.variants_dir("240px-png") / "tiles" / f"{out_ids[1]}.parquet").exists()
    finally:
        original.to_parquet(dataset.slides_parquet, index=False)


def test_bad_requests(dataset):
    with pytest.raises(ValueError, match="unknown split"):
        write_variants(dataset, ["test"])
    with pytest.raises(ValueError, match="outside 1–95"):
        write_variants(dataset, ["val_out"], jpeg_quality=100)
    small = write_variants(dataset, ["val_out"], size_px=200)
    assert not small.ok and "smaller than the tiles" in small.errors[0]
