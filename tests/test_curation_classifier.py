"""Artifact heads: fold averaging, bit-exact reload, slide-grouped folds, out-of-fold metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cytosyn.curation.classifier import HEADS_FORMAT, HeadEnsemble, HeadsError, LinearHead, fit_head
from cytosyn.curation.train import TrainingError, classification_metrics, cross_validate, make_folds, rows_by_cache


def _annotations(seed: int, n_slides: int = 12, per_slide: int = 40, dim: int = 32, shift: float = 1.5):
    """Features where artifacts differ from tissue along a few directions, plus a per-slide offset."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"slide-{i:02d}" for i in range(n_slides)], per_slide)
    labels = (rng.random(len(groups)) < 0.25).astype(np.int64)
    slide_offset = rng.normal(0, 0.5, (n_slides, dim)).repeat(per_slide, axis=0)
    features = rng.normal(0, 1, (len(groups), dim)) + slide_offset
    features[:, :4] += shift * labels[:, None]
    return features.astype(np.float32), labels, groups


def test_ensemble_probability_is_the_mean_of_the_fold_heads():
    x, y, g = _annotations(0)
    result = cross_validate(x, y, g, n_folds=5, C=1.0, max_iter=1000, seed=0, threshold=0.5)
    ensemble = result.ensemble
    assert len(ensemble.heads) == 5
    per_head = np.stack([head.predict_proba(x) for head in ensemble.heads], axis=1)
    assert np.array_equal(ensemble.predict_proba(x), per_head.mean(axis=1))
    # The heads differ (each saw other slides), so the mean is not any single head.
    assert not np.allclose(per_head[:, 0], per_head[:, 1])
    # Each head is a standardised logistic regression: check against the formula written out here.
    h = ensemble.heads[2]
    z = ((x.astype(np.float64) - h.mean) / h.scale) @ h.coef + h.intercept
    assert np.allclose(h.predict_proba(x), 1.0 / (1.0 + np.exp(-z)), rtol=0, atol=1e-12)


def test_heads_reloaded_from_disk_give_the_same_probabilities_bit_for_bit(tmp_path):
    x, y, g = _annotations(1)
    ensemble = cross_validate(x, y, g, 5, 0.5, 1000, 0, 0.5).ensemble
    ensemble.meta["threshold"] = 0.5
    ensemble.save(tmp_path / "heads")
    loaded = HeadEnsemble.load(tmp_path / "heads")
    fresh = np.random.default_rng(7).normal(0, 2, (500, x.shape[1])).astype(np.float32)
    for before, after in zip(ensemble.heads, loaded.heads):
        assert before.predict_proba(fresh).tobytes() == after.predict_proba(fresh).tobytes()
    assert ensemble.predict_proba(fresh).tobytes() == loaded.predict_proba(fresh).tobytes()
    meta = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert meta["format"] == HEADS_FORMAT and meta["n_heads"] == 5 and meta["feature_dim"] == x.shape[1]
    # Saving the loaded heads again writes the same tensor bytes: nothing drifts through a round trip.
    loaded.save(tmp_path / "again")
    assert (tmp_path / "heads" / "heads.safetensors").read_bytes() == (tmp_path / "again" / "heads.safetensors").read_bytes()


def test_heads_folder_holds_no_pickle(tmp_path):
    x, y, g = _annotations(2)
    cross_validate(x, y, g, 5, 1.0, 1000, 0, 0.5).ensemble.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]
    assert b"\x80\x04" not in (tmp_path / "heads.safetensors").read_bytes()[:8]  # not a pickle protocol header


def test_modified_heads_are_refused_with_the_file_named(tmp_path):
    x, y, g = _annotations(3)
    cross_validate(x, y, g, 5, 1.0, 1000, 0, 0.5).ensemble.save(tmp_path)
    data = bytearray((tmp_path / "heads.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "heads.safetensors").write_bytes(bytes(data))
    with pytest.raises(HeadsError, match="heads.safetensors: checksum differs"):
        HeadEnsemble.load(tmp_path)
    with pytest.raises(HeadsError, match="curate train"):
        HeadEnsemble.load(tmp_path / "missing")


@pytest.mark.parametrize("seed", range(8))
def test_folds_never_put_one_slide_on_both_sides(seed):
    rng = np.random.default_rng(seed)
    n_slides = int(rng.integers(5, 30))
    sizes = rng.integers(1, 60, n_slides)
    groups = np.repeat([f"s{i}" for i in range(n_slides)], sizes)
    labels = (rng.random(len(groups)) < rng.uniform(0.05, 0.5)).astype(np.int64)
    labels[:2] = [0, 1]
    folds = make_folds(labels, groups, 5, seed)
    assert set(np.unique(folds)) == set(range(5))
    for slide in np.unique(groups):
        assert len(np.unique(folds[groups == slide])) == 1, f"{slide} is split across folds"
    for k in range(5):
        assert not set(groups[folds == k]) & set(groups[folds != k])


def test_out_of_fold_predictions_come_from_the_head_that_never_saw_the_slide():
    x, y, g = _annotations(4)
    result = cross_validate(x, y, g, 5, 1.0, 1000, 0, 0.5)
    for k, head in enumerate(result.ensemble.heads):
        rows = result.folds == k
        assert np.array_equal(result.oof_prob[rows], head.predict_proba(x[rows]))
    assert result.metrics["roc_auc"] > 0.9  # separable signal is found out of fold


def test_head_k_is_trained_on_every_fold_but_k():
    x, y, g = _annotations(7)
    result = cross_validate(x, y, g, 5, 1.0, 1000, 0, 0.5)
    for k, head in enumerate(result.ensemble.heads):
        train = result.folds != k
        refit = fit_head(x[train], y[train], C=1.0, max_iter=1000, seed=0)
        assert np.array_equal(refit.mean, head.mean) and np.array_equal(refit.scale, head.scale)
        assert np.array_equal(refit.coef, head.coef) and refit.intercept == head.intercept
    # Fold k's slides change the fit: a head that had seen them would not be head k.
    seen_all = fit_head(x, y, C=1.0, max_iter=1000, seed=0)
    assert not any(np.array_equal(seen_all.coef, h.coef) for h in result.ensemble.heads)


def test_annotation_rows_are_grouped_by_cache_file():
    """The paper's scale: 79.5k annotations over 2,000 slides, grouped in one pass over the rows."""
    slide_ids = np.array([f"slide-{i:04d}" for i in np.random.default_rng(0).integers(0, 2000, 79_500)])
    groups = rows_by_cache(slide_ids, lambda s: Path("features") / f"{s}.parquet")
    assert len(groups) == len(set(slide_ids))
    assert np.array_equal(np.sort(np.concatenate(list(groups.values()))), np.arange(len(slide_ids)))
    for cache, rows in groups.items():
        assert (np.diff(rows) > 0).all() and set(slide_ids[rows]) == {cache.stem}
    # Annotations outside a dataset share one cache file whatever their slide.
    shared = rows_by_cache(slide_ids[:100], lambda s: Path("annotations.parquet"))
    assert list(shared) == [Path("annotations.parquet")] and shared[Path("annotations.parquet")].tolist() == list(range(100))


def test_out_of_fold_metrics_do_not_invent_signal():
    x, y, g = _annotations(5, shift=0.0)
    result = cross_validate(x, y, g, 5, 1.0, 1000, 0, 0.5)
    assert 0.35 < result.metrics["roc_auc"] < 0.65


def test_fewer_slides_than_folds_or_a_missing_label_is_a_clear_error():
    x, y, g = _annotations(6, n_slides=4)
    with pytest.raises(TrainingError, match="at least 5 slides; got 4"):
        make_folds(y, g, 5, 0)
    with pytest.raises(TrainingError, match="no 'artifact' annotations"):
        make_folds(np.zeros_like(y), g, 2, 0)


def test_classification_metrics_on_a_worked_example():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    prob = np.array([0.1, 0.6, 0.2, 0.9, 0.4, 0.3, 0.7, 0.05])
    m = classification_metrics(labels, prob, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 4, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["roc_auc"] == pytest.approx(14 / 15)


def test_a_head_refuses_features_of_the_wrong_width():
    head = LinearHead(np.zeros(4), np.ones(4), np.ones(4), 0.0)
    with pytest.raises(HeadsError, match="do not fit a head of dimension 4"):
        head.predict_proba(np.zeros((3, 5)))
