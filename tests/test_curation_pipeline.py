"""Curation end to end on a real dataset root built from synthetic slides with ground-truth artifacts:
`cytosyn data curate train` / `predict` through the CLI, top-up, bad input, and the demo's run_demo_curation."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import run_cli
from cytosyn.config import CurationConfig, parse_config
from cytosyn.curation.annotations import annotations_from_ground_truth, read_annotations, resolve_annotations
from cytosyn.curation.classifier import HeadEnsemble
from cytosyn.curation.demo import run_demo_curation
from cytosyn.curation.features import _read_cache
from cytosyn.io import schema
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import topup_tile_ids
from cytosyn.pipeline.build import build_dataset
from cytosyn.slides.synthetic import write_synthetic_slide

SLIDES = [
    ("TCGA-A1-A0SB-01Z-00-DX1", ("pen", "blur")),
    ("TCGA-AA-3516-01Z-00-DX1", ("fold", "bubble")),
    ("TCGA-05-4244-01Z-00-DX1", ("pen", "fold")),
    ("TCGA-B0-4690-01Z-00-DX1", ("blur", "bubble")),
    ("TCGA-A2-A0CM-01Z-00-DX1", ()),
    ("TCGA-A6-2671-01Z-00-DX1", ()),
]
# The real ViT-S layout with two blocks (same feature shape, 6× faster), randomly initialised.
DEPTH = ("--timm-override", "depth=2", "--weights", "random-init")


def _raw_config(slides: Path) -> dict:
    return {
        "name": "curation-test",
        "seed": 0,
        "slides": {"source": "folder", "folder": str(slides)},
        "tiling": {"max_tiles_per_slide": 32},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Six 1.4 mm synthetic slides at 0.5 µm/px (four with artifacts), built into a dataset root."""
    base = tmp_path_factory.mktemp("curation")
    folder = base / "slides"
    folder.mkdir()
    for i, (name, artifacts) in enumerate(SLIDES):
        write_synthetic_slide(folder / f"{name}.svs", width=2800, height=2800, mpp=0.5, seed=i, artifacts=artifacts)
    result = build_dataset(parse_config(_raw_config(folder)), base / "ds")
    assert result.ok, result.errors
    return base / "ds"


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    """A private copy of the built dataset root (tests modify it)."""
    return Path(shutil.copytree(built, tmp_path / "ds"))


def _digest(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern)) if p.is_file()}


def _annotation_file(root: Path, target: Path) -> tuple[Path, pd.DataFrame]:
    """Ground-truth labels written as a user would: relative image paths, plus slide-coordinate rows and two bad rows."""
    layout = DatasetLayout(root)
    gt = annotations_from_ground_truth(layout, 0.25)
    rows = pd.DataFrame(
        {
            "image_path": [str(Path(p).relative_to(root)) for p in gt["image_path"]],
            "label": np.where(gt["label"] == 1, "Artifact", "tissue"),
            "artifact_type": gt["artifact_type"],
        }
    )
    tiles = pd.read_parquet(layout.tiles_path(SLIDES[4][0]))
    cands = pd.read_parquet(layout.candidates_path(SLIDES[4][0]))
    unused = cands.loc[~cands["tile_id"].isin(tiles["tile_id"])].iloc[0]
    extra = pd.DataFrame(
        [
            # a tile the dataset holds, by coordinates
            {"slide_id": tiles.at[0, "slide_id"], "x": tiles.at[0, "x"], "y": tiles.at[0, "y"], "mpp": 0.5, "label": "tissue"},
            # a cell the dataset never extracted: read from the slide
            {"slide_id": unused["slide_id"], "x": unused["x"], "y": unused["y"], "mpp": 0.5, "label": "tissue"},
            {"image_path": rows.at[0, "image_path"], "label": "maybe"},
            {"image_path": "images/nowhere.png", "label": "tissue"},
        ]
    )
    frame = pd.concat([rows, extra], ignore_index=True)
    frame.to_csv(target, index=False)
    return target, gt


def test_annotation_rows_resolve_to_pngs_and_bad_rows_are_reported(dataset, tmp_path):
    path, gt = _annotation_file(dataset, tmp_path / "ann.csv")
    resolved = resolve_annotations(read_annotations(path), path, DatasetLayout(dataset))
    assert len(resolved.table) == len(gt) + 2
    assert len(resolved.errors) == 2
    assert any("label 'maybe' is neither tissue nor artifact" in e for e in resolved.errors)
    assert any("images/nowhere.png does not exist" in e for e in resolved.errors)
    assert all(f"{path} row" in e for e in resolved.errors)
    # The coordinate row of a tile the dataset holds resolves to that tile's PNG under images/.
    layout = DatasetLayout(dataset)
    held = pd.read_parquet(layout.tiles_path(SLIDES[4][0])).iloc[0]
    by_coordinates = resolved.table.iloc[len(gt)]
    assert Path(held["image_path"]).parts[0] == "images"
    assert by_coordinates["image_path"] == str(layout.resolve(held["image_path"]))
    assert by_coordinates["image_sha256"] == held["image_sha256"] and by_coordinates["slide_id"] == held["slide_id"]
    read_from_slide = resolved.table.iloc[-1]
    assert "/curation/annotation_tiles/" in read_from_slide["image_path"]
    png = cv2.imread(read_from_slide["image_path"])
    assert png.shape == (224, 224, 3)
    assert hashlib.sha256(Path(read_from_slide["image_path"]).read_bytes()).hexdigest() == read_from_slide["image_sha256"]
    # Image rows take the slide id from the PNG's folder (images/<project>/<slide_id>/…).
    assert set(resolved.table["slide_id"]) == {name for name, _ in SLIDES}


def test_train_with_no_usable_annotation_row_is_one_error_line_naming_the_file(tmp_path):
    ann = tmp_path / "all-bad.csv"
    pd.DataFrame({"image_path": ["gone.png", "gone.png"], "label": ["tissue", "maybe"]}).to_csv(ann, index=False)
    res = run_cli("data", "curate", "train", "--annotations", ann, "--out", tmp_path / "heads", *DEPTH)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ann}: no usable annotation (2 bad row(s)"), res.stderr
    assert "gone.png does not exist" in lines[0]
    assert not (tmp_path / "heads").exists()


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory) -> tuple[Path, object, pd.DataFrame]:
    """The dataset after `cytosyn data curate train` on an annotation file with two bad rows."""
    base = tmp_path_factory.mktemp("trained")
    root = Path(shutil.copytree(built, base / "ds"))
    ann, gt = _annotation_file(root, base / "ann.csv")
    return root, run_cli("data", "curate", "train", "--annotations", ann, root, *DEPTH), gt


@pytest.fixture
def curated_copy(trained, tmp_path) -> Path:
    """A private copy of the trained dataset (heads and feature cache included)."""
    return Path(shutil.copytree(trained[0], tmp_path / "ds"))


def test_train_reports_out_of_fold_metrics_and_bad_rows(trained):
    dataset, res, gt = trained
    # Two bad annotation rows: reported, skipped, exit 1 — and the heads are still trained on the rest.
    assert res.returncode == 1, res.stderr
    assert "label 'maybe'" in res.stderr and "nowhere.png" in res.stderr
    heads_dir = DatasetLayout(dataset).curation_heads_dir
    report = json.loads((heads_dir / "cv_report.json").read_text())
    assert len(report["folds"]) == 5
    assert report["out_of_fold"]["n"] == len(gt) + 2
    assert report["out_of_fold"]["roc_auc"] is not None
    assert "random init" in report["backbone_description"]
    oof = pd.read_parquet(heads_dir / "oof_predictions.parquet")
    assert (oof.groupby("slide_id")["fold"].nunique() == 1).all()
    assert "ROC-AUC" in (heads_dir / "cv_report.md").read_text()


def test_predict_writes_fold_averaged_probabilities_and_is_idempotent(curated_copy):
    dataset = curated_copy
    layout = DatasetLayout(dataset)
    heads_dir = layout.curation_heads_dir
    res = run_cli("data", "curate", "predict", dataset)
    assert res.returncode == 0, res.stderr
    ensemble = HeadEnsemble.load(heads_dir)
    fingerprint = ensemble.meta["backbone"]["fingerprint"]
    for name, _ in SLIDES:
        tiles = pd.read_parquet(layout.tiles_path(name))
        preds = pd.read_parquet(layout.curation_predictions_path(name))
        assert tiles.columns.tolist() == schema.TILES.names + schema.CURATION_COLUMNS.names
        assert preds["tile_id"].tolist() == tiles["tile_id"].tolist()
        scored = preds["filter"] == ""
        per_head = np.stack(preds.loc[scored, "head_probs"].to_numpy())
        assert per_head.shape[1] == 5
        # The prediction is the mean of the five heads' probabilities, exactly.
        assert np.array_equal(preds.loc[scored, "artifact_prob"].to_numpy(), per_head.mean(axis=1))
        assert np.array_equal(tiles.loc[scored, "artifact_prob"].to_numpy(), per_head.mean(axis=1).astype(np.float32))
        assert tiles.loc[~scored, "artifact_prob"].isna().all()
        assert tiles["kept"].tolist() == (scored & (preds["artifact_prob"] < 0.5)).tolist()
        # Heads loaded from disk, applied to the cached features, give the recorded probabilities bit for bit.
        _, cache = _read_cache(layout.curation_features_path(fingerprint, name))
        feats = np.stack([cache[s][0] for s in preds.loc[scored, "image_sha256"]])
        assert ensemble.predict_proba_per_head(feats).tobytes() == per_head.tobytes()
    summary = json.loads((layout.curation_dir / "predict_report.json").read_text())
    assert summary["totals"]["tiles"] == 6 * 32 and summary["errors"] == []

    # A second run finds every slide done: nothing changes on disk.
    before = _digest(dataset, "tiles/*.parquet") | _digest(dataset, "curation/predictions/*.parquet")
    res = run_cli("data", "curate", "predict", dataset)
    assert res.returncode == 0, res.stderr
    assert _digest(dataset, "tiles/*.parquet") | _digest(dataset, "curation/predictions/*.parquet") == before
    assert {s["status"] for s in json.loads((layout.curation_dir / "predict_report.json").read_text())["slides"]} == {"skipped"}


@pytest.mark.slow
def test_top_up_keeps_each_slide_at_its_budget_or_reports_the_shortfall(curated_copy):
    dataset = curated_copy
    layout = DatasetLayout(dataset)
    selection_before = {name: pd.read_parquet(layout.selection_path(name)) for name, _ in SLIDES}
    # A strict threshold removes many tiles, so some slides run out of unused cells.
    assert run_cli("data", "curate", "predict", dataset, "--threshold", "0.2", "--no-top-up").returncode == 0
    without = _digest(dataset, "tiles/*.parquet") | _digest(dataset, "selection/*.parquet") | _digest(dataset, "images/**/*.png")

    res = run_cli("data", "curate", "predict", dataset, "--threshold", "0.2", "--top-up")
    assert res.returncode == 0, res.stderr
    report = json.loads((layout.curation_dir / "predict_report.json").read_text())
    per_slide = {s["slide_id"]: s for s in report["slides"]}
    assert report["totals"]["topup_drawn"] > 0
    for name, _ in SLIDES:
        tiles = pd.read_parquet(layout.tiles_path(name))
        preds = pd.read_parquet(layout.curation_predictions_path(name))
        cands = pd.read_parquet(layout.candidates_path(name))
        original = selection_before[name]
        topups = tiles.loc[preds["topup"].to_numpy()]
        budget = len(original)
        s = per_slide[name]
        assert s["budget"] == budget and s["n_kept"] == int(tiles["kept"].sum())
        assert s["shortfall"] == budget - s["n_kept"]
        if s["shortfall"]:
            # Every unused cell was drawn before a shortfall is declared.
            assert len(topups) == len(cands) - budget
        else:
            assert s["n_kept"] == budget
            if len(topups):
                assert bool(tiles["kept"].iloc[-1])  # drawing stopped at the tile that filled the budget
        assert not set(topups["tile_id"]) & set(original["tile_id"])
        assert set(topups["tile_id"]) <= set(cands["tile_id"])
        assert tiles["split"].value_counts().to_dict() == {"train": len(tiles)}
        selection = pd.read_parquet(layout.selection_path(name))
        assert selection["tile_id"].tolist() == tiles["tile_id"].tolist()
        for row in topups.itertuples():
            png = layout.resolve(row.image_path)
            assert hashlib.sha256(png.read_bytes()).hexdigest() == row.image_sha256
        pngs = {p.stem for p in (dataset / Path(tiles["image_path"].iloc[0]).parent).glob("*.png")}
        assert pngs == set(tiles["tile_id"])  # no PNG left behind for cells drawn past the stop
    assert report["totals"]["shortfall"] > 0 and "shortfall" in (layout.curation_dir / "predict_report.md").read_text()

    # Turning top-up off again restores exactly the manifests and images of a run that never topped up.
    assert run_cli("data", "curate", "predict", dataset, "--threshold", "0.2", "--no-top-up").returncode == 0
    assert _digest(dataset, "tiles/*.parquet") | _digest(dataset, "selection/*.parquet") | _digest(dataset, "images/**/*.png") == without


def test_an_unreadable_tile_is_reported_and_the_rest_is_curated(curated_copy):
    dataset = curated_copy
    layout = DatasetLayout(dataset)
    name = SLIDES[5][0]
    fingerprint = HeadEnsemble.load(layout.curation_heads_dir).meta["backbone"]["fingerprint"]
    layout.curation_features_path(fingerprint, name).unlink()  # no cached features: the PNGs are read again
    victim = pd.read_parquet(layout.tiles_path(name))["image_path"].iloc[3]
    layout.resolve(victim).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = run_cli("data", "curate", "predict", dataset)
    assert res.returncode == 1
    assert victim in res.stderr and "rerun the tiling stage" in res.stderr
    preds = pd.read_parquet(layout.curation_predictions_path(name))
    assert preds.at[3, "filter"] == "error" and not preds.at[3, "kept"]
    assert (preds.drop(index=3)["filter"] != "error").all()
    assert all(layout.tiles_path(n).exists() for n, _ in SLIDES)


def test_predict_takes_the_weights_from_the_heads_and_an_explicit_option_wins(curated_copy, tmp_path):
    """The heads were trained on a random init: a config naming some weights file does not change that."""
    import timm
    from safetensors.torch import save_file

    dataset = curated_copy
    other = tmp_path / "other.safetensors"
    model = timm.create_model("vit_small_patch16_224", num_classes=0, depth=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other))
    raw = yaml.safe_load((dataset / "pipeline.yaml").read_text())
    config = tmp_path / "with-weights.yaml"
    config.write_text(yaml.safe_dump(raw | {"curation": {"weights": str(other), "timm_overrides": {"depth": 2}}}))
    res = run_cli("data", "curate", "predict", dataset, "--config", config)
    assert res.returncode == 0, res.stderr
    assert "random init" in json.loads((DatasetLayout(dataset).curation_dir / "predict_report.json").read_text())["backbone"]
    res = run_cli("data", "curate", "predict", dataset, "--weights", other)
    assert res.returncode == 2
    assert f"error: {other}: the heads were trained on a randomly initialised backbone" in res.stderr


def test_missing_heads_is_a_clear_error(dataset):
    res = run_cli("data", "curate", "predict", dataset)
    assert res.returncode == 2
    assert "curation/heads: no heads.json + heads.safetensors" in res.stderr and "curate train" in res.stderr


def test_demo_curation_reports_held_out_numbers(dataset):
    raw = _raw_config(dataset.parent / "unused") | {"curation": {"weights": "random-init", "timm_overrides": {"depth": 2}, "top_up": True}}
    cfg = parse_config(raw)
    layout = DatasetLayout(dataset)
    summary = run_demo_curation(layout, cfg)
    assert summary.ok, summary.errors
    assert summary.random_init
    assert set(summary.train_slides).isdisjoint(summary.holdout_slides)
    assert set(summary.train_slides) | set(summary.holdout_slides) == {name for name, _ in SLIDES}
    assert summary.holdout_classifier["n"] > 0 and summary.holdout_classifier["n_artifact"] > 0
    data = json.loads((layout.reports_dir / "curation.json").read_text())
    assert data["holdout_classifier"]["roc_auc"] == summary.holdout_classifier["roc_auc"]
    text = (layout.reports_dir / "curation.md").read_text()
    assert "no pretrained weights" in text and "held-out slides, classifier" in text
    oof = pd.read_parquet(layout.curation_heads_dir / "oof_predictions.parquet")
    assert set(oof["slide_id"]) == set(summary.train_slides)
    for name, _ in SLIDES:
        assert {"artifact_prob", "kept"} <= set(pd.read_parquet(layout.tiles_path(name)).columns)
    assert summary.predict["topup_drawn"] > 0
    # Rerunning gives the same heads and manifests (a pure function of dataset, config and seed), although
    # the manifests now hold the first run's replacement tiles.
    first = _digest(dataset, "curation/heads/heads.safetensors") | _digest(dataset, "tiles/*.parquet") | _digest(dataset, "reports/curation.json")
    run_demo_curation(layout, cfg)
    assert _digest(dataset, "curation/heads/heads.safetensors") | _digest(dataset, "tiles/*.parquet") | _digest(dataset, "reports/curation.json") == first

    # A held-out slide whose curation fails is reported, and the report still comes out without its tiles.
    victim = summary.holdout_slides[0]
    layout.curation_predictions_path(victim).unlink()
    layout.selection_path(victim).write_bytes(b"not parquet")
    gt = annotations_from_ground_truth(layout, cfg.curation.gt_artifact_fraction)
    n_victim = int((gt.loc[~gt["tile_id"].isin(topup_tile_ids(layout)), "slide_id"] == victim).sum())
    broken = run_demo_curation(layout, cfg)
    assert any(e.startswith(f"{victim}: ") and "selection" in e for e in broken.errors)
    assert f"{victim}: curation failed, so its {n_victim} held-out tile(s) are left out" in "\n".join(broken.errors)
    assert broken.holdout_pipeline["n"] == broken.holdout_classifier["n"] - n_victim > 0
    assert "left out of the filters + classifier numbers" in (layout.reports_dir / "curation.md").read_text()


def test_curation_config_section_validates():
    with pytest.raises(Exception, match="threshold"):
        CurationConfig(threshold=1.5)
    cfg = parse_config({"slides": {"source": "synthetic-demo"}, "curation": {"timm_overrides": {"depth": 4}, "filters": {"blur": False}}})
    assert cfg.curation.timm_overrides == {"depth": 4} and cfg.curation.filters.blur is False
