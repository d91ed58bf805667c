"""TSS-stratified selection: apportionment, per-slide plans, and the selection files of a dataset root."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest_cohort import SlideSpec, cli, digest, make_dataset, tcga_specs
from cytosyn.cohort.selection import SPLIT_ORDER, draw_cells, plan_selection, select_tiles, write_cohort_selection
from cytosyn.cohort.stratify import apportion, tvd
from cytosyn.config import CohortConfig, parse_config
from cytosyn.io import schema
from cytosyn.io.manifests import read_selection

SITES = {"AA": "COAD", "AZ": "COAD", "A1": "BRCA", "OR": "ACC"}


def test_apportion_is_proportional_capped_and_exact():
    assert apportion(10, np.ones(3), np.full(3, 100), np.arange(3)).tolist() == [4, 3, 3]
    # A slide that cannot supply its share passes the rest on, in proportion to the others' weights;
    # of equal remainders the lower tiebreak wins.
    assert apportion(10, np.ones(3), np.array([1, 100, 100]), np.array([2, 1, 0])).tolist() == [1, 4, 5]
    assert apportion(10, np.ones(3), np.array([1, 100, 100]), np.array([0, 1, 2])).tolist() == [1, 5, 4]
    assert apportion(7, np.array([3.0, 1.0]), np.array([100, 100]), np.arange(2)).tolist() == [5, 2]
    assert apportion(50, np.ones(3), np.array([4, 5, 6]), np.arange(3)).tolist() == [4, 5, 6]
    assert apportion(5, np.array([0.0, 1.0]), np.array([9, 9]), np.arange(2)).tolist() == [0, 5]
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        w, caps, total = rng.integers(0, 9, n).astype(float), rng.integers(0, 60, n), int(rng.integers(0, 900))
        tie = rng.permutation(n)
        got = apportion(total, w, caps, tie)
        usable = (w > 0) & (caps > 0)
        assert got.sum() == min(total, caps[usable].sum()) and (got <= caps).all() and (got[~usable] == 0).all()
        # Uncapped items are within one unit of one common level λ·w.
        free = usable & (got < caps)
        if free.sum() > 1:
            assert ((got[free] - 1) / w[free]).max() < ((got[free] + 1) / w[free]).min()
        perm = rng.permutation(n)
        assert (apportion(total, w[perm], caps[perm], tie[perm]) == got[perm]).all()


def test_tvd():
    assert tvd({"a": 1, "b": 1}, {"a": 5, "b": 5}) == 0.0
    assert tvd({"a": 3}, {"b": 1}) == 1.0
    assert tvd({"a": 3, "b": 1}, {"a": 1, "b": 1}) == pytest.approx(0.25)


def plan_input(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        tss = ["AA", "AZ", "A1", "OR", "B6"][i % 5]
        rows.append(dict(slide_id=f"TCGA-{tss}-{i:04d}-01Z-00-DX1", tss_code=tss, project={"AA": "COAD", "AZ": "COAD"}.get(tss, tss),
                         split="val_out" if i % 6 == 0 else "train", capacity=int(rng.integers(0, 400))))
    return pd.DataFrame(rows)


def test_plan_meets_every_target_within_capacity():
    cohort = CohortConfig(budget=6000, val_in_tiles=500, val_out_tiles=700, guidance_tiles=300)
    plan = plan_selection(plan_input(), cohort, seed=0)
    train, out = plan[plan["split"] == "train"], plan[plan["split"] == "val_out"]
    assert (plan["n_val_in"].sum(), plan["n_train"].sum(), plan["n_guidance"].sum(), plan["n_val_out"].sum()) == (500, 6000, 300, 700)
    assert (train["n_val_in"] + train["n_train"] <= train["capacity"]).all()
    assert (train["n_guidance"] <= train["n_train"]).all() and (train["n_val_out"] == 0).all()
    assert (out[["n_val_in", "n_train", "n_guidance"]] == 0).all().all() and (out["n_val_out"] <= out["capacity"]).all()
    # val_in leaves every slide a cell for training, and is planned before (and independently of) the budget.
    assert (train.loc[train["capacity"] > 0, "n_val_in"] < train.loc[train["capacity"] > 0, "capacity"]).all()
    everything = plan_selection(plan_input(), cohort.model_copy(update={"budget": None}), seed=0)
    assert (everything["n_val_in"] == plan["n_val_in"]).all()
    assert (everything["n_val_in"] + everything["n_train"] == everything["capacity"].where(everything["split"] == "train", 0)).all()
    shuffled = plan_selection(plan_input().sample(frac=1, random_state=4), cohort, seed=0)
    pd.testing.assert_frame_equal(shuffled, plan)


def test_plan_follows_site_shares_of_slides():
    plan = plan_selection(plan_input().assign(capacity=10_000), CohortConfig(budget=50_000), seed=0)
    train = plan[plan["split"] == "train"]
    per_site = train.groupby("tss_code")["n_train"].sum() / 50_000
    share = train["tss_code"].value_counts(normalize=True)
    assert (per_site - share[per_site.index]).abs().max() < 1e-4


def test_draw_cells_segments_are_disjoint():
    counts = {"n_val_in": 5, "n_train": 30, "n_guidance": 7, "n_val_out": 0}
    pos, codes, guidance = draw_cells(50, counts, 0, "s", external=False)
    assert len(set(pos.tolist())) == len(pos) == 35
    names = np.array(SPLIT_ORDER)[codes]
    assert (names == "val_in").sum() == 5 and (names == "train").sum() == 30
    assert guidance.sum() == 7 and (names[guidance] == "train").all()
    again = draw_cells(50, counts, 0, "s", external=False)
    assert (again[0] == pos).all()
    assert not (draw_cells(50, counts, 1, "s", external=False)[0] == pos).all()
    with pytest.raises(ValueError, match="only 20 candidates"):
        draw_cells(20, counts, 0, "s", external=False)


def config(**cohort):
    base = dict(budget=240, val_out_slides=4, val_in_tiles=40, val_out_tiles=30, guidance_tiles=20)
    return parse_config({"slides": {"source": "synthetic-demo"}, "cohort": {**base, **cohort}})


def specs_with_trouble():
    specs = tcga_specs(SITES, patients_per_site=4, slides_per_patient=1)
    specs.append(SlideSpec("TCGA-AA-0099-01Z-00-DX1", "TCGA-AA-0099", "AA", "COAD", status="error"))
    specs.append(SlideSpec("TCGA-A1-0098-01Z-00-DX1", "TCGA-A1-0098", "A1", "BRCA", nx=0, ny=0))
    return specs


@pytest.fixture
def selected(tmp_path):
    layout = make_dataset(tmp_path / "ds", specs_with_trouble())
    report = write_cohort_selection(layout, config())
    return layout, report


def test_selection_files_splits_and_report(selected):
    layout, report = selected
    assert report.ok, report.errors
    slides = pd.read_parquet(layout.slides_parquet)
    assert slides.columns.tolist() == [*schema.SLIDES.names, "split"]
    ok = slides[slides["status"] == "ok"]
    assert sorted(p.stem for p in layout.selection_dir.glob("*.parquet")) == sorted(ok["slide_id"])
    sel = read_selection(layout)
    assert sel.columns.tolist() == schema.SELECTION.names
    counts = sel.groupby("split").size().to_dict()
    assert counts == {"train": 240, "val_in": 40, "val_out": 30}
    assert sel["guidance"].sum() == 20 and (sel.loc[sel["guidance"], "split"] == "train").all()
    assert sel["tile_id"].is_unique
    side = sel["slide_id"].map(dict(zip(slides["slide_id"], slides["split"])))
    assert (side[sel["split"] == "val_out"] == "val_out").all()
    assert (side[sel["split"].isin(["train", "val_in"])] == "train").all()
    assert report.slides_without_candidates == ["TCGA-A1-0098-01Z-00-DX1"]
    assert {k: v["achieved"] for k, v in report.splits.items()} == {"train": 240, "val_in": 40, "guidance": 20, "val_out": 30}
    assert report.slides.projects_in_val_out == 3
    md = layout.cohort_report_md.read_text()
    assert "| train | 240 | 240 |" in md and "Per project" in md
    assert layout.cohort_report_json.exists()


def test_rerun_is_byte_identical_and_input_order_free(selected, tmp_path):
    layout, _ = selected
    before = digest(layout.root, "selection/*.parquet") | digest(layout.root, "slides.parquet")
    mtimes = {p: p.stat().st_mtime_ns for p in layout.selection_dir.glob("*.parquet")}
    write_cohort_selection(layout, config())
    assert digest(layout.root, "selection/*.parquet") | digest(layout.root, "slides.parquet") == before
    assert {p: p.stat().st_mtime_ns for p in layout.selection_dir.glob("*.parquet")} == mtimes
    shuffled = make_dataset(tmp_path / "shuffled", specs_with_trouble(), shuffle_seed=11)
    write_cohort_selection(shuffled, config())
    assert digest(shuffled.root, "selection/*.parquet") == digest(layout.root, "selection/*.parquet")


def test_worker_count_does_not_change_the_selection(selected):
    layout, _ = selected
    before = digest(layout.root, "selection/*.parquet")
    for p in layout.selection_dir.glob("*.parquet"):
        p.unlink()
    write_cohort_selection(layout, config().model_copy(update={"workers": 2}))
    assert digest(layout.root, "selection/*.parquet") == before


def test_stale_selections_go_when_a_slide_leaves(selected):
    layout, _ = selected
    gone = "TCGA-OR-0001-01Z-00-DX1"
    slides = pd.read_parquet(layout.slides_parquet)
    slides.loc[slides["slide_id"] == gone, ["status", "error"]] = ["error", "unreadable now"]
    slides.drop(columns="split").to_parquet(layout.slides_parquet, index=False)
    layout.tiles_dir.mkdir()
    (layout.tiles_dir / f"{gone}.parquet").write_bytes(b"old")
    report = write_cohort_selection(layout, config())
    assert report.stale_removed == 1
    assert not layout.selection_path(gone).exists() and not layout.tiles_path(gone).exists()


def test_budget_none_takes_every_remaining_candidate(tmp_path):
    layout = make_dataset(tmp_path / "ds", tcga_specs(SITES, patients_per_site=3, nx=4, ny=3))
    report = select_tiles(layout, CohortConfig(budget=None, val_out_slides=2, val_in_tiles=10, val_out_tiles=5, guidance_tiles=5), seed=0)
    sel = read_selection(layout)
    # Two val_out slides asked, three given: every project (COAD, BRCA, ACC) needs one.
    assert report.slides.val_out == 3 and report.slides.projects_in_val_out == 3
    train_slides = (pd.read_parquet(layout.slides_parquet)["split"] == "train").sum()
    assert train_slides == 9 and report.splits["train"]["achieved"] == train_slides * 12 - 10
    assert (sel["split"] == "val_in").sum() == 10


def test_external_cohort_conditioning_and_reference_are_disjoint(tmp_path):
    specs = [SlideSpec(f"ibd-{i}", f"P{i // 2}", f"site{i % 2}", "SPARC", nx=3 + i, ny=4) for i in range(6)]
    layout = make_dataset(tmp_path / "ibd", specs)
    report = select_tiles(layout, CohortConfig(kind="external", conditioning_tiles=30, reference_tiles=40), seed=2)
    sel = read_selection(layout)
    assert sel.groupby("split").size().to_dict() == {"guidance": 30, "val_out": 40}
    assert (sel["guidance"] == (sel["split"] == "guidance")).all() and sel["tile_id"].is_unique
    # Uniform over candidate cells: a slide's share follows its candidate count.
    per_slide = sel.groupby("slide_id").size()
    caps = pd.Series({s.slide_id: s.nx * s.ny for s in specs})
    assert (per_slide - 70 * caps / caps.sum()).abs().max() <= 2
    assert report.slides.mode == "external"


def test_splits_command_on_a_built_root(selected, tmp_path):
    layout, _ = selected
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"slides": {"source": "synthetic-demo"}, "cohort": config().cohort.model_dump(mode="json")}))
    res = cli("data", "splits", "--out", layout.root, "--config", pipeline, "--budget", "100")
    assert res.exit_code == 0, res.output
    assert "val_out: 4 of 4 asked" in res.output
    sel = read_selection(layout)
    assert sel.groupby("split").size().to_dict() == {"train": 100, "val_in": 40, "val_out": 30}
    refused = cli("data", "splits", "--out", layout.root, "--gdc-manifest", pipeline)
    assert refused.exit_code == 2 and "built dataset" in refused.output
    bad = cli("data", "splits", "--out", layout.root, "--val-out-slides", "1.5")
    assert bad.exit_code == 2 and "fraction strictly between 0 and 1" in bad.output


def test_a_corrupt_candidate_file_is_that_slides_error(selected):
    layout, _ = selected
    broken = "TCGA-AA-0001-01Z-00-DX1"
    layout.candidates_path(broken).write_bytes(b"garbage")
    report = write_cohort_selection(layout, config())
    assert len(report.errors) == 1 and not report.ok
    error = report.errors[0]
    assert error.startswith(f"{layout.candidates_path(broken)}: ArrowInvalid: ")
    assert error.endswith("; rebuild this slide's candidates (delete the file and rerun the build)")
    # The others are still selected, to the same totals; the broken slide keeps no old selection.
    assert not layout.selection_path(broken).exists()
    assert read_selection(layout).groupby("split").size().to_dict() == {"train": 240, "val_in": 40, "val_out": 30}
    assert broken not in report.slides_without_candidates
    res = cli("data", "splits", "--out", layout.root)
    assert res.exit_code == 1 and str(layout.candidates_path(broken)) in res.output


def test_a_slide_whose_selection_fails_keeps_no_old_selection(selected):
    layout, _ = selected
    slide = "TCGA-AA-0002-01Z-00-DX1"
    path = layout.candidates_path(slide)
    original = path.read_bytes()
    assert write_cohort_selection(layout, config()).ok and layout.selection_path(slide).exists()
    # A readable file (its row count is known) without the columns the draw needs.
    pd.read_parquet(path).drop(columns=["x", "y"]).to_parquet(path, index=False)
    try:
        report = write_cohort_selection(layout, config())
        assert len(report.errors) == 1 and report.errors[0].startswith(str(path))
        assert not layout.selection_path(slide).exists() and not layout.tiles_path(slide).exists()
    finally:
        path.write_bytes(original)
    assert write_cohort_selection(layout, config()).ok and layout.selection_path(slide).exists()


def test_splits_command_keeps_a_null_budget_from_the_config(selected, tmp_path):
    layout, _ = selected
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"slides": {"source": "synthetic-demo"}, "cohort": config(budget=None).cohort.model_dump(mode="json")}))
    res = cli("data", "splits", "--out", layout.root, "--config", pipeline)
    assert res.exit_code == 0, res.output
    train = json.loads(layout.cohort_report_json.read_text())["splits"]["train"]
    slides = pd.read_parquet(layout.slides_parquet)
    capacity = sum(s.nx * s.ny for s in specs_with_trouble() if s.status == "ok"
                   and s.slide_id in set(slides.loc[slides["split"] == "train", "slide_id"]))
    assert train["target"] == train["achieved"] == capacity - 40
    assert (read_selection(layout)["split"] == "train").sum() == capacity - 40
