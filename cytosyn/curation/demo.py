"""Curation inside the demo build: labels from the synthetic slides' ground truth, honest held-out numbers.

The demo has no human annotations and no downloadable iBOT weights, so it labels its own tiles from
the artifact masks the synthetic slides were drawn with, holds out some slides entirely, trains the
fold heads on the others, curates every slide, and reports how the heads did on the held-out slides
they never saw. With ``curation.weights`` unset the backbone is a randomly initialised ViT-S and the
report says so: the numbers measure the pipeline, not iBOT features.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytosyn.config import CurationConfig, PipelineConfig
from cytosyn.curation.annotations import annotations_from_ground_truth
from cytosyn.curation.features import LazyBackbone, backbone_setup
from cytosyn.nn.device import resolve_device
from cytosyn.curation.predict import predict_dataset
from cytosyn.curation.train import (
    TrainingError,
    classification_metrics,
    embed_annotations,
    metrics_table,
    per_type_recall,
    train_heads,
)
from cytosyn.io.atomic import write_text_atomic
from cytosyn.io.hashing import stable_hash
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import topup_tile_ids

REPORT_JSON = "curation.json"
REPORT_MD = "curation.md"


@dataclass
class CurationSummary:
    """What the demo's curation did and how well it did it; mirrored in reports/curation.{json,md}."""

    backbone: str
    random_init: bool
    n_annotations: int
    n_artifact: int
    train_slides: list[str]
    holdout_slides: list[str]
    n_folds: int
    out_of_fold: dict
    holdout_classifier: dict  # fold-averaged heads on the held-out slides' annotations
    holdout_pipeline: dict  # filters + heads (`kept`) against the ground truth on held-out slides
    holdout_recall_by_type: dict
    predict: dict  # PredictSummary totals over all slides
    heads_dir: str  # relative to the dataset root, like every path the dataset records
    report_json: str
    report_md: str
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def split_slides(annotations: pd.DataFrame, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) slide ids, deterministic in (slides, seed).

    Slides with and without artifacts are split separately so both sides see both labels; within each
    group the order is a stable hash of the slide id, independent of file order.
    """
    has_artifact = annotations.groupby("slide_id")["label"].max()
    train, holdout = [], []
    for flag in (1, 0):
        ids = sorted(has_artifact.index[has_artifact == flag], key=lambda s: stable_hash(seed, "curation-holdout", s))
        n_out = max(1, round(holdout_fraction * len(ids))) if len(ids) >= 2 else 0
        holdout += ids[:n_out]
        train += ids[n_out:]
    return sorted(train), sorted(holdout)


def run_demo_curation(layout: DatasetLayout, cfg: PipelineConfig) -> CurationSummary:
    """Label from ground truth, train on some slides, curate all, report the held-out numbers.

    Needs synthetic slides with ground-truth artifact masks (``write_synthetic_slide(..., artifacts=…)``,
    as ``demo_cohort`` writes them); raises ``TrainingError`` when no tile overlaps an artifact.

    Writes the heads and their cross-validation report to ``curation/heads/``, curates every slide
    (tiles/ gets ``artifact_prob`` and ``kept``), and writes ``reports/curation.json`` and ``.md``.
    """
    ccfg = cfg.curation or CurationConfig()
    annotations = annotations_from_ground_truth(layout, ccfg.gt_artifact_fraction)
    # Only the build's own tiles: replacements drawn by an earlier run would change the training set on a rerun.
    annotations = annotations.loc[~annotations["tile_id"].isin(topup_tile_ids(layout))].reset_index(drop=True)
    if annotations.empty or annotations["label"].sum() == 0:
        raise TrainingError(
            f"{layout.root}: no tile overlaps a ground-truth artifact mask. Curation inside the build learns from the "
            "synthetic slides' ground truth (the demo); for real slides train heads with `cytosyn data curate train "
            "--annotations FILE` and apply them with `cytosyn data curate predict DATASET`"
        )
    train_ids, holdout_ids = split_slides(annotations, ccfg.demo_holdout_fraction, cfg.seed)
    if len(train_ids) < 2:
        raise TrainingError(f"{layout.root}: {len(train_ids)} training slide(s) after holding out {len(holdout_ids)}; the demo needs at least 2 (add slides)")
    n_folds = min(ccfg.folds, len(train_ids))
    setup = backbone_setup(ccfg, cfg.seed)

    def cache_for(slide_id: str) -> Path:
        return layout.curation_features_path(setup.fingerprint, slide_id)

    in_train = annotations["slide_id"].isin(train_ids).to_numpy()
    trained = train_heads(
        annotations.loc[in_train].reset_index(drop=True), setup, ccfg, cfg.seed, layout.curation_heads_dir, cache_for,
        n_folds=n_folds, context={"demo_ground_truth_min_fraction": ccfg.gt_artifact_fraction},
    )
    summary = predict_dataset(layout, trained.result.ensemble, setup, cfg, layout.curation_heads_dir)

    # Held-out slides: the ensemble on every annotated tile (classifier alone), then `kept` (filters + classifier).
    held = annotations.loc[~in_train].reset_index(drop=True)
    features, errors = embed_annotations(held, setup, ccfg, LazyBackbone(setup, resolve_device(ccfg.device)), cache_for)
    readable = np.array([not e for e in errors], dtype=bool)
    held, features = held.loc[readable].reset_index(drop=True), features[readable]
    prob = trained.result.ensemble.predict_proba(features)
    failed = {s.slide_id for s in summary.slides if s.status == "error"}
    removed, counted, left_out = _removed_by_curation(layout, held, failed)
    # `kept` is a yes/no decision: a ROC-AUC of it would only restate the balanced accuracy.
    pipeline = {**classification_metrics(held["label"].to_numpy()[counted], removed[counted].astype(np.float64), 0.5), "roc_auc": None}

    summary_out = CurationSummary(
        backbone=setup.describe(),
        random_init=setup.random_init,
        n_annotations=int(len(annotations)),
        n_artifact=int(annotations["label"].sum()),
        train_slides=train_ids,
        holdout_slides=holdout_ids,
        n_folds=n_folds,
        out_of_fold=trained.result.metrics,
        holdout_classifier=classification_metrics(held["label"].to_numpy(), prob, ccfg.threshold),
        holdout_pipeline=pipeline,
        holdout_recall_by_type=per_type_recall(held, prob, ccfg.threshold),
        predict=summary.totals(),
        heads_dir=str(layout.curation_heads_dir.relative_to(layout.root)),
        report_json=f"reports/{REPORT_JSON}",
        report_md=f"reports/{REPORT_MD}",
        errors=trained.errors + [e for e in errors if e] + summary.errors + left_out,
    )
    write_text_atomic(layout.reports_dir / REPORT_JSON, json.dumps(asdict(summary_out), indent=2, sort_keys=True) + "\n")
    write_text_atomic(layout.reports_dir / REPORT_MD, demo_markdown(summary_out, ccfg))
    return summary_out


def _removed_by_curation(layout: DatasetLayout, annotations: pd.DataFrame, failed: set[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per annotation, whether curation removed its tile (not kept), read back from the predictions files,
    and whether it counts: tiles of slides whose curation ``failed`` (already reported) have no
    trustworthy predictions and are left out, with one message per such slide."""
    removed = np.zeros(len(annotations), dtype=bool)
    counted = np.ones(len(annotations), dtype=bool)
    left_out = []
    for slide_id, rows in annotations.groupby("slide_id").indices.items():
        if slide_id in failed:
            counted[rows] = False
            left_out.append(f"{slide_id}: curation failed, so its {len(rows)} held-out tile(s) are left out of the filters + classifier numbers")
            continue
        preds = pd.read_parquet(layout.curation_predictions_path(slide_id), columns=["image_sha256", "kept"])
        kept = dict(zip(preds["image_sha256"], preds["kept"]))
        removed[rows] = [not kept.get(s, True) for s in annotations["image_sha256"].to_numpy()[rows]]
    return removed, counted, left_out


def demo_markdown(s: CurationSummary, ccfg: CurationConfig) -> str:
    t = s.predict
    lines = [
        "# Artifact curation (demo)",
        "",
        f"- backbone: {s.backbone}",
    ]
    if s.random_init:
        lines.append(
            "- **no pretrained weights**: the paper's iBOT ViT-S weights are in-house and none are downloadable, so the demo "
            "uses a randomly initialised network; these numbers measure the pipeline on synthetic artifacts, not iBOT features"
        )
    lines += [
        f"- labels from the synthetic slides' ground-truth masks: artifact when ≥ {ccfg.gt_artifact_fraction:.0%} of the tile is covered, "
        f"tissue when none of it is, ambiguous tiles left out: {s.n_annotations} tiles, {s.n_artifact} artifact",
        f"- trained on {len(s.train_slides)} slides ({s.n_folds}-fold cross-validation grouped by slide); "
        f"held out {len(s.holdout_slides)} slides: {', '.join(s.holdout_slides)}",
        "",
        "| evaluation | n | artifacts | ROC-AUC | balanced acc. | precision | recall | TP | FP | TN | FN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = metrics_table(
        [
            ("out-of-fold, training slides", s.out_of_fold),
            ("held-out slides, classifier", s.holdout_classifier),
            ("held-out slides, filters + classifier (removed vs artifact)", s.holdout_pipeline),
        ]
    )
    lines += table.splitlines()[2:]
    if s.holdout_recall_by_type:
        lines += ["", "Held-out recall by artifact type: " + ", ".join(f"{k} {v['recall']:.2f} (n={v['n']})" for k, v in s.holdout_recall_by_type.items())]
    lines += [
        "",
        f"All slides: {t['tiles']} tiles, {t['kept']} kept; removed by near-white {t['filtered']['near_white']}, "
        f"low saturation {t['filtered']['low_saturation']}, blur {t['filtered']['blur']}, classifier {t['classifier_removed']}; "
        f"top-up drew {t['topup_drawn']} ({t['topup_kept']} kept), shortfall {t['shortfall']}.",
    ]
    if s.errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in s.errors]
    return "\n".join(lines) + "\n"
