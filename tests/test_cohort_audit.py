"""`cytosyn data audit`: passes a clean dataset, fails loudly on deliberately leaked ones."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest_cohort import cli, make_dataset, slides_frame, tcga_specs
from cytosyn.cohort.audit import audit_dataset, overlapping_pairs
from cytosyn.cohort.selection import select_tiles, write_slide_split
from cytosyn.config import CohortConfig
from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.layout import DatasetLayout

SITES = {"AA": "COAD", "AZ": "COAD", "A1": "BRCA", "OR": "ACC"}
COHORT = CohortConfig(budget=200, val_out_slides=4, val_in_tiles=40, val_out_tiles=30, guidance_tiles=20)


@pytest.fixture
def dataset(tmp_path) -> DatasetLayout:
    layout = make_dataset(tmp_path / "ds", tcga_specs(SITES, patients_per_site=4))
    report = select_tiles(layout, COHORT, seed=0)
    assert report.ok
    return layout


def slides_of(layout: DatasetLayout) -> pd.DataFrame:
    return pd.read_parquet(layout.slides_parquet)


def rewrite_slides(layout: DatasetLayout, slides: pd.DataFrame) -> None:
    write_parquet_atomic(layout.slides_parquet, slides, schema.SLIDES.append(schema.SLIDE_SPLIT_COLUMNS.field("split")))


def failing(layout: DatasetLayout) -> dict[str, list[str]]:
    res = cli("data", "audit", layout.root, "--json")
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert report["ok"] is False
    return {c["name"]: c["violations"] for c in report["checks"] if c["violations"]}


def test_clean_dataset_passes(dataset):
    res = cli("data", "audit", dataset.root)
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "FAIL" not in res.output
    report = audit_dataset(dataset)
    assert report.source == "selection" and report.ok
    info = {c.name: c.info for c in report.checks}
    assert info["budget"]["train"] == {"target": 200, "planned": 200, "in_dataset": 200}
    assert info["every project in val_out"] == {"projects": 3, "in_val_out": 3, "single_patient_projects": []}


def test_shared_patient_is_leakage(dataset):
    slides = slides_of(dataset)
    out = slides[slides["split"] == "val_out"].iloc[0]
    train_row = slides.index[slides["split"] == "train"][0]
    slides.loc[train_row, "patient_id"] = out["patient_id"]
    rewrite_slides(dataset, slides)
    violations = failing(dataset)
    assert list(violations) == ["patient leakage"]
    assert out["patient_id"] in violations["patient leakage"][0] and "both sides" in violations["patient leakage"][0]


def test_overlapping_tiles_of_different_splits(dataset):
    slides = slides_of(dataset)
    slide_id = slides.loc[slides["split"] == "train", "slide_id"].iloc[0]
    sel = pd.read_parquet(dataset.selection_path(slide_id))
    vin = sel.index[sel["split"] == "val_in"][0]
    train = sel[sel["split"] == "train"].iloc[0]
    # A val_in tile half a tile away from a training tile: same tissue seen by both.
    sel.loc[vin, ["x", "y"]] = [train["x"] + train["read_size_level0"] // 2, train["y"]]
    write_parquet_atomic(dataset.selection_path(slide_id), sel, schema.SELECTION)
    violations = failing(dataset)
    assert list(violations) == ["spatial overlap between splits"]
    message = violations["spatial overlap between splits"][0]
    assert slide_id in message and "val_in" in message and "train" in message


def test_project_without_val_out(dataset):
    slides = slides_of(dataset)
    acc_out = (slides["project"] == "ACC") & (slides["split"] == "val_out")
    assert acc_out.sum() >= 1
    slides.loc[acc_out, "split"] = "train"
    rewrite_slides(dataset, slides)
    violations = failing(dataset)
    assert violations["every project in val_out"] == ["project ACC has no val_out slide"]
    # Its val_out tiles now sit on a training slide, which the tile check reports too.
    assert any("val_out tiles" in v for v in violations["tile splits"])


def test_lost_tiles_and_guidance_outside_training(dataset):
    slides = slides_of(dataset)
    out_id = slides.loc[slides["split"] == "val_out", "slide_id"].iloc[0]
    sel = pd.read_parquet(dataset.selection_path(out_id))
    sel.loc[sel.index[0], "guidance"] = True
    write_parquet_atomic(dataset.selection_path(out_id), sel.iloc[:-1], schema.SELECTION)
    violations = failing(dataset)
    assert any("val_out: " in v and "were selected" in v for v in violations["budget"])
    assert any("guidance flag on ['val_out']" in v for v in violations["tile splits"])


def test_missing_split_column(tmp_path):
    layout = make_dataset(tmp_path / "raw", tcga_specs(SITES, patients_per_site=2))
    violations = failing(layout)
    assert "no split column" in violations["slide splits"][0]


def test_overlapping_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    x, y, s = rng.integers(0, 4000, 300), rng.integers(0, 4000, 300), rng.integers(50, 400, 300)
    i, j = overlapping_pairs(x, y, s, tolerance=0)
    brute = {(a, b) for a in range(300) for b in range(a + 1, 300)
             if x[a] < x[b] + s[b] and x[b] < x[a] + s[a] and y[a] < y[b] + s[b] and y[b] < y[a] + s[a]}
    assert set(zip(i.tolist(), j.tolist())) == brute and len(brute) > 0
    grid_x, grid_y = np.meshgrid(np.arange(10) * 448, np.arange(10) * 448)
    assert overlapping_pairs(grid_x.ravel(), grid_y.ravel(), np.full(100, 448))[0].size == 0
    # A 443.6 px footprint: cells at round(i · 443.6), 444 px wide, so neighbours share a pixel column.
    starts = np.round(np.arange(10) * 443.6).astype(int)
    gx, gy = np.meshgrid(starts, starts)
    assert overlapping_pairs(gx.ravel(), gy.ravel(), np.full(100, 444))[0].size == 0
    assert overlapping_pairs(gx.ravel(), gy.ravel(), np.full(100, 444), tolerance=0)[0].size > 0
    assert overlapping_pairs(np.array([0, 2]), np.array([0, 2]), np.array([444, 444]))[0].size == 1


@pytest.mark.slow
def test_audit_passes_on_a_curated_dataset_with_top_up(tmp_path):
    """Top-up replacements stand in for removed tiles: the budget check counts the selection, not them."""
    from cytosyn.config import parse_config
    from cytosyn.io.manifests import topup_tile_ids
    from cytosyn.pipeline.build import build_dataset

    cfg = parse_config({
        "slides": {"source": "synthetic-demo", "demo_slides": 6},
        "cohort": {"kind": "tcga", "budget": 120, "val_out_slides": 2, "val_in_tiles": 20, "val_out_tiles": 30, "guidance_tiles": 20},
        # A low threshold removes many tiles, so top-up has work to do.
        "curation": {"weights": "random-init", "timm_overrides": {"depth": 2}, "top_up": True, "threshold": 0.2},
    })
    result = build_dataset(cfg, tmp_path / "ds")
    assert result.ok, result.errors
    layout = DatasetLayout(tmp_path / "ds")
    assert topup_tile_ids(layout), "the threshold should have made curation draw replacements"
    report = audit_dataset(layout)
    assert report.ok, [c.violations for c in report.checks if c.violations]


def capacity_bound_specs():
    # COAD slides have 50 candidate cells, BRCA and ACC slides 10: those cannot supply their sites'
    # share of a large training set, so the selection gives COAD what they cannot take.
    return (tcga_specs({"AA": "COAD", "AZ": "COAD"}, patients_per_site=4, nx=10, ny=5)
            + tcga_specs({"A1": "BRCA", "OR": "ACC"}, patients_per_site=4, nx=2, ny=5))


@pytest.mark.parametrize("budget", [None, 300])
def test_capacity_bound_selections_pass(tmp_path, budget):
    layout = make_dataset(tmp_path / "ds", capacity_bound_specs())
    cohort = CohortConfig(budget=budget, val_out_slides=4, val_in_tiles=10, val_out_tiles=10, guidance_tiles=10)
    report = select_tiles(layout, cohort, seed=0)
    train = report.splits["train"]
    # Far from the slide shares, but exactly as far as the capacities force.
    assert train["tvd_tss"] > 0.2 and train["tvd_tss"] == pytest.approx(train["tvd_tss_floor"])
    assert train["tvd_project"] == pytest.approx(train["tvd_project_floor"])
    audit = audit_dataset(layout)
    assert audit.ok, [c.violations for c in audit.checks if c.violations]
    info = {c.name: c.info for c in audit.checks}
    assert info["distribution fidelity"]["train"] == {k: v for k, v in train.items() if k.startswith("tvd_")}
    if budget is None:
        # Every candidate of the training slides except the val_in cells: nothing falls short.
        slides = slides_of(layout)
        capacity = sum(s.nx * s.ny for s in capacity_bound_specs()
                       if s.slide_id in set(slides.loc[slides["split"] == "train", "slide_id"]))
        assert train["target"] == train["achieved"] == capacity - 10
        assert "shortfall" not in info["budget"]["train"]


def move_train_tiles(layout: DatasetLayout, donors: list[str], receivers: list[str], n: int) -> None:
    """Move ``n`` training tiles (not guidance) from the donor slides to free cells of the receivers."""
    moved = 0
    for slide_id in donors:
        sel = pd.read_parquet(layout.selection_path(slide_id))
        drop = sel.index[(sel["split"] == "train") & ~sel["guidance"]][: n - moved]
        moved += len(drop)
        write_parquet_atomic(layout.selection_path(slide_id), sel.drop(index=drop), schema.SELECTION)
    assert moved == n
    for slide_id in receivers:
        sel = pd.read_parquet(layout.selection_path(slide_id))
        cands = pd.read_parquet(layout.candidates_path(slide_id))
        free = cands[~cands["tile_id"].isin(sel["tile_id"])].iloc[:moved].assign(split="train", guidance=False)
        moved -= len(free)
        write_parquet_atomic(layout.selection_path(slide_id), pd.concat([sel, free], ignore_index=True), schema.SELECTION)
    assert moved == 0


def test_training_tiles_moved_between_sites(dataset):
    slides = slides_of(dataset)
    train = slides[slides["split"] == "train"]
    move_train_tiles(dataset, train.loc[train["tss_code"] == "OR", "slide_id"].tolist(),
                     train.loc[train["project"] == "COAD", "slide_id"].tolist(), 30)
    violations = failing(dataset)
    assert list(violations) == ["distribution fidelity"]
    assert [v.split(" exceeds")[0] for v in violations["distribution fidelity"]] == [
        "train: site TVD 0.1500", "train: project TVD 0.1500"]


def test_val_out_slides_moved_to_one_site(tmp_path):
    """The audit recomputes the slide-level distribution from slides.parquet, not from the report."""
    layout = DatasetLayout(tmp_path / "split")
    specs = tcga_specs({"AA": "COAD", "AZ": "COAD", "A6": "COAD", "CM": "COAD"}, patients_per_site=4)
    write_parquet_atomic(layout.slides_parquet, slides_frame(specs), schema.SLIDES)
    assert write_slide_split(layout, CohortConfig(val_out_slides=4), seed=0).slides.tvd_tss == 0.0
    assert audit_dataset(layout).ok
    reported = layout.cohort_report_json.read_bytes()
    slides = slides_of(layout)
    slides["split"] = np.where(slides["tss_code"] == "AA", "val_out", "train")
    rewrite_slides(layout, slides)
    violations = failing(layout)
    assert violations == {"distribution fidelity": ["val_out slides: site TVD 0.7500 exceeds its best possible 0.0000 by more than 0.05"]}
    assert layout.cohort_report_json.read_bytes() == reported


def test_tiles_without_their_candidates_are_a_violation(dataset):
    slides = slides_of(dataset)
    slide = slides.loc[slides["split"] == "train", "slide_id"].iloc[0]
    dataset.candidates_path(slide).unlink()
    violations = failing(dataset)
    assert list(violations) == ["distribution fidelity"]
    [message] = [v for v in violations["distribution fidelity"] if v.startswith(f"slide {slide}:")]
    assert "0 candidate cells" in message and str(dataset.candidates_path(slide)) in message
