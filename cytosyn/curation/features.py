"""Frozen-backbone embeddings of tile PNGs, with the cheap filter measures taken from the same decode.

The backbone is described by a ``BackboneSetup`` whose fingerprint (architecture, overrides,
normalisation, sha256 of the weights or the seed of a random init) keys every cached feature, so
heads, caches and predictions can never silently mix features of two different backbones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cytosyn.curation.filters import MEASURE_NAMES, tile_measures
from cytosyn.errors import one_line
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.hashing import sha256_file, stable_hash
from cytosyn.io.images import read_png_rgb
from cytosyn.nn.backbones import RANDOM_INIT, create_backbone, get_backbone_spec, to_normalised_tensor, with_overrides


class BackboneMismatchError(ValueError):
    """Weights that are not the ones the heads were trained with; the message names the file and the fix."""


@dataclass(frozen=True)
class BackboneSetup:
    """Everything that determines the features, plus where the weights file is on this machine."""

    name: str
    timm_name: str
    timm_overrides: dict = field(default_factory=dict)
    img_size: int = 224
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    weights_sha256: str | None = None
    init_seed: int | None = None  # only for random init (weights_sha256 is None)
    weights: str | None = None  # local path; not part of the identity
    weights_subkey: str | None = None

    @property
    def random_init(self) -> bool:
        return self.weights_sha256 is None

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("weights")
        d.pop("weights_subkey")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @property
    def fingerprint(self) -> str:
        return f"{stable_hash(json.dumps(self.identity(), sort_keys=True)):016x}"

    def describe(self) -> str:
        arch = self.timm_name + "".join(f", {k}={v}" for k, v in sorted(self.timm_overrides.items()))
        source = f"random init (seed {self.init_seed}), no pretrained weights" if self.random_init else f"weights sha256 {self.weights_sha256[:12]}…"
        return f"{self.name} [{arch}], {source}"

    def to_json(self) -> dict:
        return {**self.identity(), "weights": self.weights, "weights_subkey": self.weights_subkey, "fingerprint": self.fingerprint}


def backbone_setup(ccfg, seed: int) -> BackboneSetup:
    """The setup a ``CurationConfig`` asks for; hashes the weights file when there is one.

    ``curation.mean`` / ``curation.std``, when set, replace the registered backbone's normalisation.
    """
    spec = get_backbone_spec(ccfg.backbone)
    timm_name = ccfg.architecture or spec.timm_name
    if ccfg.weights is None:
        raise ValueError(
            "no weights for the curation backbone: set curation.weights (or --weights) to a local file — "
            f"an iBOT/DINO teacher checkpoint works — or to {RANDOM_INIT} for a demo with a random network"
        )
    weights = None if ccfg.weights == RANDOM_INIT else str(ccfg.weights)
    return BackboneSetup(
        name=spec.name,
        timm_name=timm_name,
        timm_overrides=dict(ccfg.timm_overrides),
        img_size=spec.img_size,
        mean=tuple(ccfg.mean or spec.mean),
        std=tuple(ccfg.std or spec.std),
        weights_sha256=_weights_sha256(weights),
        init_seed=None if weights else int(seed),
        weights=weights,
        weights_subkey=ccfg.weights_subkey,
    )


def setup_from_heads(recorded: dict, weights: str | Path | None, weights_subkey: str | None) -> BackboneSetup:
    """The backbone the heads were trained on, with the weights file found on this machine.

    ``weights`` (from the command line or config) wins over the path recorded at training; either way
    its sha256 must match the recorded one.
    """
    fields = {k: recorded[k] for k in ("name", "timm_name", "timm_overrides", "img_size", "weights_sha256", "init_seed")}
    setup = BackboneSetup(**fields, mean=tuple(recorded["mean"]), std=tuple(recorded["std"]))
    if setup.random_init:
        if weights is not None and str(weights) != RANDOM_INIT:
            raise BackboneMismatchError(
                f"{weights}: the heads were trained on a randomly initialised backbone; drop --weights or retrain with these weights"
            )
        return setup
    path = str(weights) if weights is not None else recorded.get("weights")
    if path is None or path == RANDOM_INIT or not Path(path).is_file():
        raise BackboneMismatchError(
            f"{path}: backbone weights not found; pass the file the heads were trained with (sha256 {setup.weights_sha256[:12]}…) with --weights"
        )
    got = sha256_file(path)
    if got != setup.weights_sha256:
        raise BackboneMismatchError(
            f"{path}: sha256 {got[:12]}… differs from the weights the heads were trained with ({setup.weights_sha256[:12]}…); pass those weights or retrain the heads"
        )
    subkey = weights_subkey if weights_subkey is not None else recorded.get("weights_subkey")
    return BackboneSetup(**{**asdict(setup), "weights": path, "weights_subkey": subkey})


def _weights_sha256(weights: str | None) -> str | None:
    if weights is None:
        return None
    if not Path(weights).is_file():
        raise BackboneMismatchError(f"{weights}: weights file not found; pass an existing .safetensors or .pth file")
    return sha256_file(weights)


def load_backbone(setup: BackboneSetup, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The frozen, eval-mode backbone; a random init is seeded so every run gets the same network."""
    spec = with_overrides(get_backbone_spec(setup.name), timm_name=setup.timm_name)
    if setup.random_init:
        model = create_backbone(spec, RANDOM_INIT, init_seed=int(setup.init_seed or 0), **setup.timm_overrides)
    else:
        model = create_backbone(spec, setup.weights, setup.weights_subkey, **setup.timm_overrides)
    return model.to(device)


class LazyBackbone:
    """Builds the backbone on first call and then returns the same model: fully cached runs never load it."""

    def __init__(self, setup: BackboneSetup, device: str | torch.device = "cpu"):
        self.setup = setup
        self.device = device
        self._model: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_backbone(self.setup, self.device)
        return self._model


class _TileReads(Dataset):
    """Normalised tile tensors plus filter measures; an unreadable tile yields its error instead of raising."""

    def __init__(self, paths: Sequence[str], setup: BackboneSetup, white_level: int):
        self.paths = list(paths)
        self.setup = setup
        self.white_level = white_level

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        size = self.setup.img_size
        try:
            rgb = read_png_rgb(self.paths[index])
            if rgb.shape[:2] != (size, size):
                raise ValueError(f"{self.paths[index]}: tile is {rgb.shape[1]}×{rgb.shape[0]} but the backbone takes {size}×{size}; re-extract it at {size} px")
            tensor = to_normalised_tensor(rgb, self.setup.mean, self.setup.std)
            return tensor, index, tile_measures(rgb, self.white_level), ""
        except Exception as exc:  # noqa: BLE001 - one bad tile is reported, never fatal
            text = one_line(exc)
            message = text if self.paths[index] in text else f"{self.paths[index]}: {text[:200]}"
            return torch.zeros(3, size, size), index, np.full(len(MEASURE_NAMES), np.nan, dtype=np.float32), message


@dataclass
class Embedded:
    """Per input tile: features (NaN rows where not embedded), filter measures (NaN where unreadable), errors ("" if none)."""

    features: np.ndarray
    measures: np.ndarray
    errors: list[str]

    @property
    def embedded(self) -> np.ndarray:
        return ~np.isnan(self.features).any(axis=1) if self.features.shape[1] else np.zeros(len(self.features), bool)


Selector = Callable[[np.ndarray], np.ndarray]


def embed_tiles(
    model: torch.nn.Module,
    setup: BackboneSetup,
    paths: Sequence[str | Path],
    white_level: int,
    select: Selector | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "embedding tiles",
    known: np.ndarray | None = None,
) -> Embedded:
    """Decode every tile once, measure it, and run the backbone on the tiles ``select(measures)`` keeps.

    Tiles are forwarded in input order; only selected rows of a batch reach the model, so filtered
    tiles cost a PNG decode but no forward pass. ``known`` (bool per tile) marks tiles whose features
    the caller already has: they are measured but not forwarded, and their feature rows stay NaN.
    """
    n = len(paths)
    dim = int(getattr(model, "num_features"))
    features = np.full((n, dim), np.nan, dtype=np.float32)
    measures = np.full((n, len(MEASURE_NAMES)), np.nan, dtype=np.float32)
    errors = [""] * n
    if n == 0:
        return Embedded(features, measures, errors)
    loader = DataLoader(
        _TileReads([str(p) for p in paths], setup, white_level),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="tile", leave=False) as bar:
        for tensors, index, meas, errs in loader:
            idx = index.numpy()
            meas = meas.numpy().astype(np.float32)
            measures[idx] = meas
            ok = np.array([e == "" for e in errs])
            for i, e in zip(idx[~ok], np.asarray(errs, dtype=object)[~ok]):
                errors[int(i)] = str(e)
            run = ok & (select(meas) if select is not None else True)
            if known is not None:
                run &= ~known[idx]
            if run.any():
                out = model(tensors[torch.from_numpy(run)].to(device, non_blocking=True))
                features[idx[run]] = out.float().cpu().numpy()
            bar.update(len(idx))
    return Embedded(features, measures, errors)


# --- feature cache: one Parquet file per slide (or per annotation set), keyed by the PNG's sha256.
# The features depend only on the PNG and the backbone (the folder's fingerprint); the measures also
# depend on filters.white_level, which is stored with them so that a change re-measures the tile.
class _Cached(NamedTuple):
    feature: np.ndarray | None  # None: the tile was measured but filtered out before the backbone
    measures: np.ndarray
    white_level: int


def _cache_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("image_sha256", pa.string()), ("embedded", pa.bool_()), ("feature", pa.list_(pa.float32(), dim))]
        + [(name, pa.float32()) for name in MEASURE_NAMES]
        + [("white_level", pa.int16())]
    )


def _read_cache(path: Path) -> tuple[int | None, dict[str, _Cached]]:
    """(feature dimension, sha → cached entry); (None, {}) when there is no cache yet."""
    if not path.exists():
        return None, {}
    table = pq.read_table(path)
    n = table.num_rows
    if n == 0:
        return None, {}
    # Written without the Arrow schema, the fixed-size list comes back as a plain list: all rows have dim values.
    flat = table.column("feature").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = len(flat) // n
    feats = flat.reshape(n, dim)
    embedded = table.column("embedded").to_numpy(zero_copy_only=False)
    meas = np.stack([table.column(m).to_numpy(zero_copy_only=False) for m in MEASURE_NAMES], axis=1).astype(np.float32)
    # Caches written before the white level was recorded: -1 matches no level, so their tiles are re-measured.
    levels = table.column("white_level").to_numpy(zero_copy_only=False) if "white_level" in table.column_names else np.full(n, -1)
    shas = table.column("image_sha256").to_pylist()
    return dim, {s: _Cached(feats[i] if embedded[i] else None, meas[i], int(levels[i])) for i, s in enumerate(shas)}


def _write_cache(path: Path, entries: dict[str, _Cached], dim: int) -> None:
    shas = sorted(entries)
    feats = np.full((len(shas), dim), np.nan, dtype=np.float32)
    meas = np.zeros((len(shas), len(MEASURE_NAMES)), dtype=np.float32)
    embedded = np.zeros(len(shas), dtype=bool)
    levels = np.zeros(len(shas), dtype=np.int16)
    for i, s in enumerate(shas):
        entry = entries[s]
        if entry.feature is not None:
            feats[i], embedded[i] = entry.feature, True
        meas[i], levels[i] = entry.measures, entry.white_level
    columns = {
        "image_sha256": pa.array(shas, pa.string()),
        "embedded": pa.array(embedded),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim),
        **{name: pa.array(meas[:, j]) for j, name in enumerate(MEASURE_NAMES)},
        "white_level": pa.array(levels),
    }
    write_parquet_atomic(path, pa.table(columns, schema=_cache_schema(dim)))


def cached_embed(
    cache_path: Path,
    paths: Sequence[str | Path],
    shas: Sequence[str],
    setup: BackboneSetup,
    model_provider: Callable[[], torch.nn.Module],
    white_level: int,
    select: Selector | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "embedding tiles",
) -> Embedded:
    """``embed_tiles`` that only reads tiles the cache at ``cache_path`` does not cover.

    A tile the selector rejected is cached with its measures but no feature; it is embedded later
    only if a caller needs it (training embeds every annotated tile). A tile measured at another
    white level is decoded and measured again, and forwarded only if it has no cached feature. The
    model is built on first need, so a fully cached run never loads the backbone.
    """
    feature_dim, cache = _read_cache(cache_path)
    if feature_dim is None:
        feature_dim = int(model_provider().num_features)
    n = len(paths)
    features = np.full((n, feature_dim), np.nan, dtype=np.float32)
    measures = np.full((n, len(MEASURE_NAMES)), np.nan, dtype=np.float32)
    errors = [""] * n
    known = np.zeros(n, dtype=bool)  # the cache holds the tile's feature
    todo = []
    for i, sha in enumerate(shas):
        hit = cache.get(sha)
        if hit is not None and hit.feature is not None:
            features[i], known[i] = hit.feature, True
        if hit is None or hit.white_level != white_level:
            todo.append(i)
        else:
            measures[i] = hit.measures
            if not known[i] and (select is None or bool(select(hit.measures[None, :])[0])):
                todo.append(i)
    if todo:
        fresh = embed_tiles(
            model_provider(), setup, [paths[i] for i in todo], white_level, select,
            batch_size=batch_size, num_workers=num_workers, device=device, desc=desc, known=known[todo],
        )
        if fresh.features.shape[1] != feature_dim:
            raise BackboneMismatchError(
                f"{cache_path}: cached features are {feature_dim}-d but the backbone gives {fresh.features.shape[1]}-d; delete the cache folder"
            )
        got = fresh.embedded
        for j, i in enumerate(todo):
            measures[i], errors[i] = fresh.measures[j], fresh.errors[j]
            if errors[i]:
                features[i] = np.nan  # an unreadable tile has no feature, cached or not
                continue
            if got[j]:
                features[i] = fresh.features[j]
            cache[shas[i]] = _Cached(features[i].copy() if known[i] or got[j] else None, fresh.measures[j], white_level)
        _write_cache(cache_path, cache, feature_dim)
    return Embedded(features, measures, errors)
