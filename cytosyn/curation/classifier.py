"""The artifact classifier: one standardised logistic regression per fold, averaged at inference.

scikit-learn fits each head; from then on a head is four float64 arrays (mean, scale, coef,
intercept) and probabilities are computed here with numpy. The arrays are stored as safetensors
beside a JSON description, so a reloaded head gives the same probabilities bit for bit and
nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cytosyn.io.atomic import atomic_path, write_text_atomic
from cytosyn.io.hashing import sha256_file

HEADS_FORMAT = "cytosyn-curation-heads/1"
TENSORS_FILE = "heads.safetensors"
META_FILE = "heads.json"
CLASSES = ("tissue", "artifact")


class HeadsError(ValueError):
    """Heads that cannot be loaded or used; the message names the file and the fix."""


@dataclass(frozen=True)
class LinearHead:
    """p(artifact | x) = sigmoid(((x − mean) / scale) · coef + intercept)."""

    mean: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64
    coef: np.ndarray  # (D,) float64
    intercept: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """float64 (N,) probabilities of the artifact class."""
        x = np.array(features, dtype=np.float64)  # a private copy, standardised in place: one N×D buffer at most
        if x.ndim != 2 or x.shape[1] != self.coef.shape[0]:
            raise HeadsError(f"features of shape {x.shape} do not fit a head of dimension {self.coef.shape[0]}")
        x -= self.mean
        x /= self.scale
        return expit(x @ self.coef + self.intercept)


def fit_head(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int, seed: int) -> LinearHead:
    """Standardise, then fit an L2 logistic regression with balanced class weights.

    Balanced weights because annotation sets are enriched for artifacts in unknown proportion: the
    decision at 0.5 then trades errors on both classes evenly (balanced accuracy is what we report).
    """
    x = np.asarray(features, dtype=np.float64)
    scaler = StandardScaler().fit(x)
    # In place: at 79.5k × 384 a second float64 copy is 240 MB we do not need.
    x -= scaler.mean_
    x /= scaler.scale_
    model = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    model.fit(x, np.asarray(labels, dtype=np.int64))
    return LinearHead(
        mean=scaler.mean_.astype(np.float64),
        scale=scaler.scale_.astype(np.float64),
        coef=model.coef_[0].astype(np.float64),
        intercept=float(model.intercept_[0]),
    )


@dataclass
class HeadEnsemble:
    """The fold heads and what they were trained on (``meta``: backbone, threshold, training summary)."""

    heads: list[LinearHead]
    meta: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.heads[0].coef.shape[0])

    def predict_proba_per_head(self, features: np.ndarray) -> np.ndarray:
        """float64 (N, K): column k is head k's probability."""
        if len(features) == 0:
            return np.zeros((0, len(self.heads)), dtype=np.float64)
        return np.stack([h.predict_proba(features) for h in self.heads], axis=1)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """float64 (N,): the mean of the heads' probabilities (paper §3.2: folds averaged)."""
        return average_heads(self.predict_proba_per_head(features))

    def save(self, folder: str | Path) -> Path:
        """Write heads.safetensors then heads.json (which records the tensors' sha256); returns the JSON path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": np.stack([h.mean for h in self.heads]),
            "scale": np.stack([h.scale for h in self.heads]),
            "coef": np.stack([h.coef for h in self.heads]),
            "intercept": np.array([h.intercept for h in self.heads], dtype=np.float64),
        }
        target = folder / TENSORS_FILE
        with atomic_path(target) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        meta = {
            "format": HEADS_FORMAT,
            "classes": list(CLASSES),
            "n_heads": len(self.heads),
            "feature_dim": self.feature_dim,
            "tensors": TENSORS_FILE,
            "tensors_sha256": sha256_file(target),
            **{k: v for k, v in self.meta.items() if k not in {"format", "classes", "n_heads", "feature_dim", "tensors", "tensors_sha256"}},
        }
        write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return folder / META_FILE

    @classmethod
    def load(cls, folder: str | Path) -> HeadEnsemble:
        folder = Path(folder)
        meta_path, tensors_path = folder / META_FILE, folder / TENSORS_FILE
        if not meta_path.is_file() or not tensors_path.is_file():
            raise HeadsError(f"{folder}: no {META_FILE} + {TENSORS_FILE}; run `cytosyn data curate train` first or pass --heads")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise HeadsError(f"{meta_path}: not valid JSON ({exc.msg}); retrain the heads") from None
        if meta.get("format") != HEADS_FORMAT:
            raise HeadsError(f"{meta_path}: format {meta.get('format')!r} is not {HEADS_FORMAT!r}; retrain the heads")
        if sha256_file(tensors_path) != meta.get("tensors_sha256"):
            raise HeadsError(f"{tensors_path}: checksum differs from {META_FILE}; the heads were modified or half-copied — copy the folder again")
        t = load_file(str(tensors_path))
        k = int(meta["n_heads"])
        expected = {"mean": (k, meta["feature_dim"]), "scale": (k, meta["feature_dim"]), "coef": (k, meta["feature_dim"]), "intercept": (k,)}
        for key, shape in expected.items():
            if key not in t or tuple(t[key].shape) != tuple(shape) or t[key].dtype != np.float64:
                got = "missing" if key not in t else f"{t[key].dtype} {tuple(t[key].shape)}"
                raise HeadsError(f"{tensors_path}: tensor '{key}' is {got}, expected float64 {tuple(shape)}; retrain the heads")
        heads = [LinearHead(t["mean"][i].copy(), t["scale"][i].copy(), t["coef"][i].copy(), float(t["intercept"][i])) for i in range(k)]
        return cls(heads=heads, meta=meta)


def average_heads(per_head: np.ndarray) -> np.ndarray:
    """The ensemble probability from per-head probabilities (N, K) → (N,)."""
    return np.asarray(per_head, dtype=np.float64).mean(axis=1)
