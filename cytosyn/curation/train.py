"""Cross-validated training of the artifact heads: StratifiedGroupKFold by slide, out-of-fold metrics.

Every annotation is predicted once by the head that did not see its slide; those out-of-fold
probabilities give honest metrics. The K fold heads are then kept as the ensemble (paper §3.2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from cytosyn.config import CurationConfig
from cytosyn.curation.classifier import HeadEnsemble, fit_head
from cytosyn.curation.features import BackboneSetup, LazyBackbone, cached_embed
from cytosyn.nn.device import resolve_device
from cytosyn.io.atomic import write_parquet_atomic, write_text_atomic
from cytosyn.io.hashing import sha256_file

CV_REPORT_JSON = "cv_report.json"
CV_REPORT_MD = "cv_report.md"
OOF_FILE = "oof_predictions.parquet"


class TrainingError(ValueError):
    """Annotations that cannot train heads; the message says what is missing."""


def make_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..K−1) of every annotation; all annotations of one slide share a fold."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise TrainingError(f"{n_folds}-fold cross-validation needs annotations from at least {n_folds} slides; got {n_groups}")
    for cls_value, cls_name in ((0, "tissue"), (1, "artifact")):
        if not (labels == cls_value).any():
            raise TrainingError(f"no '{cls_name}' annotations; both labels are needed to train")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(labels), -1, dtype=np.int64)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = k
    return folds


def classification_metrics(labels: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    """ROC-AUC, balanced accuracy, precision and recall of 'artifact' at ``threshold``, and the counts."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = (np.asarray(prob) >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, pred, labels=[0, 1]).ravel())
    both = len(np.unique(labels)) == 2
    return {
        "n": int(len(labels)),
        "n_artifact": int(labels.sum()),
        "threshold": float(threshold),
        "roc_auc": float(roc_auc_score(labels, prob)) if both else None,
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if both else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


@dataclass
class CVResult:
    ensemble: HeadEnsemble
    folds: np.ndarray  # (N,) fold of each annotation
    oof_prob: np.ndarray  # (N,) probability from the head that did not train on the annotation's slide
    metrics: dict  # pooled out-of-fold metrics
    fold_metrics: list[dict]


def cross_validate(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    n_folds: int,
    C: float,
    max_iter: int,
    seed: int,
    threshold: float,
) -> CVResult:
    """Fit one head per fold on the other folds' slides; predict the fold's own slides out of fold."""
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    folds = make_folds(labels, groups, n_folds, seed)
    oof = np.full(len(labels), np.nan, dtype=np.float64)
    heads, per_fold = [], []
    for k in tqdm(range(n_folds), desc="training fold heads", leave=False):
        train, test = folds != k, folds == k
        if len(np.unique(labels[train])) < 2:
            raise TrainingError(f"fold {k}: its training slides hold only one label; annotate more slides with both labels")
        head = fit_head(features[train], labels[train], C=C, max_iter=max_iter, seed=seed)
        heads.append(head)
        oof[test] = head.predict_proba(features[test])
        per_fold.append({"fold": k, "n_slides": int(len(np.unique(np.asarray(groups)[test]))), **classification_metrics(labels[test], oof[test], threshold)})
    return CVResult(HeadEnsemble(heads), folds, oof, classification_metrics(labels, oof, threshold), per_fold)


def per_type_recall(annotations: pd.DataFrame, prob: np.ndarray, threshold: float) -> dict[str, dict]:
    """Recall per artifact type (rows with label 'artifact' and a type)."""
    out: dict[str, dict] = {}
    if "artifact_type" not in annotations:
        return out
    types = annotations["artifact_type"].to_numpy(dtype=object)
    labels = annotations["label"].to_numpy()
    for t in sorted({str(t) for t, l in zip(types, labels) if l == 1 and isinstance(t, str) and t}):
        rows = (labels == 1) & (types == t)
        out[t] = {"n": int(rows.sum()), "recall": float((prob[rows] >= threshold).mean())}
    return out


def write_cv_report(folder: Path, result: CVResult, annotations: pd.DataFrame, context: dict) -> tuple[Path, Path]:
    """cv_report.json, cv_report.md and the out-of-fold predictions (Parquet) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    threshold = result.metrics["threshold"]
    report = {
        **context,
        "out_of_fold": result.metrics,
        "folds": result.fold_metrics,
        "recall_by_artifact_type": per_type_recall(annotations, result.oof_prob, threshold),
    }
    json_path, md_path = folder / CV_REPORT_JSON, folder / CV_REPORT_MD
    write_text_atomic(json_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_text_atomic(md_path, cv_markdown(report))
    oof = pd.DataFrame(
        {
            "image_path": annotations["image_path"].astype(str).to_numpy(),
            "slide_id": annotations["slide_id"].astype(str).to_numpy(),
            "label": annotations["label"].astype(np.int8).to_numpy(),
            "fold": result.folds.astype(np.int8),
            "oof_prob": result.oof_prob.astype(np.float32),
        }
    )
    write_parquet_atomic(folder / OOF_FILE, oof)
    return json_path, md_path


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    head = "| set | n | artifacts | ROC-AUC | balanced acc. | precision | recall | TP | FP | TN | FN |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {name} | {m['n']} | {m['n_artifact']} | {_fmt(m['roc_auc'])} | {_fmt(m['balanced_accuracy'])} | "
        f"{_fmt(m['precision'])} | {_fmt(m['recall'])} | {m['tp']} | {m['fp']} | {m['tn']} | {m['fn']} |\n"
        for name, m in rows
    )
    return head + body


def cv_markdown(report: dict) -> str:
    m = report["out_of_fold"]
    lines = [
        "# Artifact classifier: cross-validation",
        "",
        f"- backbone: {report['backbone_description']}",
        f"- annotations: {m['n']} ({m['n_artifact']} artifact) from {report['n_slides']} slides; {len(report['folds'])} folds grouped by slide",
        f"- logistic regression C={report['C']}, balanced class weights; threshold {m['threshold']}",
        "",
        "Out-of-fold metrics: every annotation is scored by the head that never saw its slide.",
        "",
        metrics_table([("out-of-fold (pooled)", m)] + [(f"fold {f['fold']} ({f['n_slides']} slides)", f) for f in report["folds"]]),
    ]
    if report["recall_by_artifact_type"]:
        lines += ["", "| artifact type | n | recall |", "|---|---|---|"]
        lines += [f"| {t} | {v['n']} | {v['recall']:.4f} |" for t, v in report["recall_by_artifact_type"].items()]
    return "\n".join(lines) + "\n"


def rows_by_cache(slide_ids: np.ndarray, cache_path_for: Callable[[str], Path]) -> dict[Path, np.ndarray]:
    """Row indices (ascending) per cache file; slides that share a cache file share one group.

    One pass over the rows (a groupby), not one per cache file: 79.5k annotations from 2,000 slides
    would otherwise compare every row with every cache path.
    """
    parts: dict[Path, list[np.ndarray]] = {}
    for slide_id, rows in pd.Series(slide_ids).groupby(slide_ids, sort=True).indices.items():
        parts.setdefault(cache_path_for(str(slide_id)), []).append(rows)
    return {cache: np.sort(np.concatenate(chunks)) for cache, chunks in parts.items()}


def embed_annotations(
    table: pd.DataFrame,
    setup: BackboneSetup,
    ccfg: CurationConfig,
    backbone: LazyBackbone,
    cache_path_for: Callable[[str], Path],
) -> tuple[np.ndarray, list[str]]:
    """Features of every annotated tile (no filter: the classifier learns from every annotation).

    Rows are grouped by ``cache_path_for(slide_id)`` so each cache file is read and written once.
    Returns (features, per-row error or "").
    """
    shas = [s if isinstance(s, str) and s else sha256_file(p) for s, p in zip(table["image_sha256"], table["image_path"])]
    paths = table["image_path"].astype(str).tolist()
    features: np.ndarray | None = None
    errors = [""] * len(table)
    groups = rows_by_cache(table["slide_id"].astype(str).to_numpy(), cache_path_for)
    for cache in sorted(groups):
        rows = groups[cache]
        emb = cached_embed(
            cache, [paths[i] for i in rows], [shas[i] for i in rows], setup, backbone, ccfg.filters.white_level,
            batch_size=ccfg.batch_size, num_workers=ccfg.num_workers, device=backbone.device, desc="embedding annotations",
        )
        if features is None:
            features = np.full((len(table), emb.features.shape[1]), np.nan, dtype=np.float32)
        features[rows] = emb.features
        for i, e in zip(rows, emb.errors):
            errors[i] = e
    return (features if features is not None else np.zeros((0, 0), np.float32)), errors


@dataclass
class TrainOutcome:
    result: CVResult
    annotations: pd.DataFrame  # the rows actually used, in feature order
    features: np.ndarray
    heads_json: Path
    report_json: Path
    report_md: Path
    errors: list[str]


def train_heads(
    annotations: pd.DataFrame,
    setup: BackboneSetup,
    ccfg: CurationConfig,
    seed: int,
    out_dir: Path,
    cache_path_for: Callable[[str], Path],
    n_folds: int | None = None,
    errors: list[str] | None = None,
    context: dict | None = None,
) -> TrainOutcome:
    """Embed the annotations, cross-validate, save the fold heads and the report under ``out_dir``.

    Unreadable annotated tiles are reported in ``errors`` and left out; the rest still train.
    """
    errors = list(errors or [])
    backbone = LazyBackbone(setup, resolve_device(ccfg.device))
    features, row_errors = embed_annotations(annotations, setup, ccfg, backbone, cache_path_for)
    usable = np.array([not e for e in row_errors], dtype=bool)
    errors += [e for e in row_errors if e]
    used = annotations.loc[usable].reset_index(drop=True)
    features = features[usable]
    folds = n_folds or ccfg.folds
    result = cross_validate(
        features, used["label"].to_numpy(), used["slide_id"].astype(str).to_numpy(), folds, ccfg.C, ccfg.max_iter, seed, ccfg.threshold
    )
    result.ensemble.meta.update(
        {
            "backbone": setup.to_json(),
            "threshold": ccfg.threshold,
            "C": ccfg.C,
            "seed": seed,
            "n_annotations": int(len(used)),
            "n_artifact": int(used["label"].sum()),
            "n_slides": int(used["slide_id"].nunique()),
        }
    )
    heads_json = result.ensemble.save(out_dir)
    report_context = {
        "backbone_description": setup.describe(),
        "backbone": setup.to_json(),
        "n_slides": int(used["slide_id"].nunique()),
        "C": ccfg.C,
        "seed": seed,
        "errors": errors,
        **(context or {}),
    }
    report_json, report_md = write_cv_report(out_dir, result, used, report_context)
    return TrainOutcome(result, used, features, heads_json, report_json, report_md, errors)
