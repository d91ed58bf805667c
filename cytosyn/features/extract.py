"""Frozen-backbone features of tile PNGs (paper §3.1): one forward yields the CLS token and the patch tokens.

Patch tokens (register tokens dropped) are laid out on their 16×16 grid and resized to the 14×14 grid of
SiT-XL/2's tokens with ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``, computed
channels-first in float32 and stored as float16. Any backbone of the registry in ``cytosyn.nn.backbones``
is used the same way; its spec says how many prefix tokens precede the patch tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cytosyn.config import FeaturesConfig, PipelineConfig
from cytosyn.features.store import (
    ChunkWriter,
    FeaturesError,
    FeatureStore,
    IndexReader,
    chunk_bounds,
    done_chunks,
    finalize,
    num_chunks,
    plan_store,
)
from cytosyn.io.atomic import remove_stale_temporaries
from cytosyn.io.hashing import sha256_file
from cytosyn.io.images import read_png_rgb
from cytosyn.io.layout import DatasetLayout
from cytosyn.nn.backbones import RANDOM_INIT, BackboneSpec, create_backbone, get_backbone_spec, normalise_images
from cytosyn.nn.device import resolve_device

# SiT-XL/2 on the 28×28 latent of a 224 px tile sees 14×14 tokens.
TOKEN_GRID = 14
INTERPOLATION = "bicubic-antialias"


def resize_patch_tokens(patch_tokens: torch.Tensor, grid: int, out_grid: int = TOKEN_GRID) -> torch.Tensor:
    """(B, grid², D) patch tokens → (B, out_grid, out_grid, D) float32, bicubic with anti-aliasing."""
    b, n, d = patch_tokens.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid}×{grid}={grid * grid} patch tokens, got {n}")
    x = patch_tokens.float().reshape(b, grid, grid, d).permute(0, 3, 1, 2)
    if grid != out_grid:
        x = F.interpolate(x, size=(out_grid, out_grid), mode="bicubic", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1)


class TokenExtractor:
    """A frozen backbone on a device: uint8 RGB batches in, (CLS float32, 14×14 tokens float16) out."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, device: torch.device):
        prefix = getattr(model, "num_prefix_tokens", None)
        if prefix != spec.num_prefix_tokens:
            raise FeaturesError(
                f"backbone '{spec.name}': the spec says {spec.num_prefix_tokens} prefix tokens but the timm model "
                f"has {prefix}; fix num_prefix_tokens in its BackboneSpec"
            )
        gh, gw = model.patch_embed.grid_size
        if gh != gw:
            raise FeaturesError(f"backbone '{spec.name}': a square patch grid is needed, got {gh}×{gw}")
        self.spec = spec
        self.grid = int(gh)
        self.dim = int(model.num_features)
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            model = model.to(device, memory_format=torch.channels_last)
        self.model = model

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``images``: (B, 3, S, S) uint8 RGB. Returns CLS (B, D) float32 and tokens (B, 14, 14, D) float16."""
        x = normalise_images(images.to(self.device, non_blocking=True), self.spec.mean, self.spec.std)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model.forward_features(x)
        else:
            out = self.model.forward_features(x)
        p = self.spec.num_prefix_tokens
        expected = (x.shape[0], p + self.grid * self.grid, self.dim)
        if tuple(out.shape) != expected:
            raise FeaturesError(f"backbone '{self.spec.name}' returned tokens of shape {tuple(out.shape)}, expected {expected}")
        cls = out[:, 0].float()
        tokens = resize_patch_tokens(out[:, p:], self.grid).half()
        return cls.cpu().numpy(), tokens.cpu().numpy()


def check_normalisation(spec: BackboneSpec, pretrained_cfg: dict, source: str) -> None:
    """Refuse weights whose own config (``source``'s timm ``pretrained_cfg``) normalises inputs otherwise than the
    spec, which is what the stage applies: features of wrongly normalised tiles would look plausible but differ."""
    theirs = {k: pretrained_cfg.get(k) for k in ("mean", "std")}
    for key, ours in (("mean", spec.mean), ("std", spec.std)):
        value = theirs[key]
        if value is None or len(value) != len(ours) or not np.allclose(value, ours, rtol=0, atol=1e-6):
            raise FeaturesError(
                f"backbone '{spec.name}': {source} normalises with mean {theirs['mean']} std {theirs['std']} but the spec "
                f"says mean {list(spec.mean)} std {list(spec.std)}; fix mean/std in its BackboneSpec"
            )


def load_extractor(fcfg: FeaturesConfig, device: torch.device) -> TokenExtractor:
    spec = get_backbone_spec(fcfg.extractor)
    if fcfg.weights is None:
        raise FeaturesError(
            f"no weights for '{spec.name}': pass --weights FILE (.safetensors or .pth)"
            + (f", or --weights {spec.hf_hub} when online" if spec.hf_hub else "")
            + f" (or --weights {RANDOM_INIT} for a demo with random features)"
        )
    model = create_backbone(spec, weights=fcfg.weights, weights_subkey=fcfg.weights_subkey, **fcfg.timm_overrides)
    if str(fcfg.weights).startswith("hf-hub:"):
        # Local files carry no normalisation; a hub model's config does, and must agree with the spec.
        check_normalisation(spec, dict(getattr(model, "pretrained_cfg", None) or {}), str(fcfg.weights))
    return TokenExtractor(spec, model, device)


def provenance(extractor: TokenExtractor, fcfg: FeaturesConfig) -> dict:
    """What the stored features are a function of (besides the tiles), kept in tokens.zarr's attributes."""
    weights = str(fcfg.weights)
    local = not weights.startswith("hf-hub:") and weights != RANDOM_INIT
    return {
        "extractor": extractor.spec.name,
        "timm_name": extractor.spec.timm_name,
        "timm_overrides": {k: fcfg.timm_overrides[k] for k in sorted(fcfg.timm_overrides)},
        "weights": weights,
        # Identifies the weights: the file's hash, else the hub name or the random init itself.
        "weights_sha256": sha256_file(weights) if local else weights,
        # bf16 autocast on CUDA gives other numbers than fp32 on the CPU: never mix them in one store.
        "compute_dtype": "bfloat16" if extractor.cuda else "float32",
        "num_prefix_tokens": extractor.spec.num_prefix_tokens,
        "source_grid": extractor.grid,
        "token_grid": TOKEN_GRID,
        "embed_dim": extractor.dim,
        "interpolation": INTERPOLATION,
        "mean": list(extractor.spec.mean),
        "std": list(extractor.spec.std),
    }


# --------------------------------------------------------------------------- loading tiles


class _TileImages(Dataset):
    """(row, relative PNG path) → (row, uint8 CHW tensor, error). A bad tile yields zeros and its error."""

    def __init__(self, root: Path, size: int):
        self.root = Path(root)
        self.size = size

    def __getitem__(self, item: tuple[int, str]) -> tuple[int, torch.Tensor, str]:
        row, relpath = item
        path = self.root / relpath
        try:
            rgb = read_png_rgb(path)
        except (OSError, ValueError) as exc:
            return row, torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(exc)
        if rgb.shape[:2] != (self.size, self.size):
            error = f"{path}: tile is {rgb.shape[1]}×{rgb.shape[0]} px but the backbone needs {self.size}×{self.size}; rebuild the tiles with tiling.size_px={self.size}"
            return row, torch.zeros(3, self.size, self.size, dtype=torch.uint8), error
        return row, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), ""


def _collate(items: Sequence[tuple[int, torch.Tensor, str]]) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    rows = np.array([r for r, _, _ in items], dtype=np.int64)
    return rows, torch.stack([img for _, img, _ in items]), [e for _, _, e in items]


class _ChunkBatches:
    """Batches of (row, path) that never cross a chunk, so a rerun forms exactly the same batches."""

    def __init__(self, index: IndexReader, chunks: Sequence[int], chunk_rows: int, rows: int, batch_size: int):
        self.index, self.chunks, self.chunk_rows, self.rows, self.batch_size = index, chunks, chunk_rows, rows, batch_size

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        for chunk in self.chunks:
            a, b = chunk_bounds(chunk, self.chunk_rows, self.rows)
            table = self.index.rows(a, b)
            items = list(zip(table["row"].to_pylist(), table["image_path"].to_pylist()))
            for i in range(0, len(items), self.batch_size):
                yield items[i : i + self.batch_size]


@dataclass
class _OpenChunk:
    chunk: int
    start: int
    cls: np.ndarray
    tokens: np.ndarray
    filled: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.filled == self.cls.shape[0]


@dataclass
class FeaturesResult:
    out_dir: Path
    rows: int
    chunks: int
    computed: int
    skipped: int
    complete: bool
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def extract_features(layout: DatasetLayout, cfg: PipelineConfig, *, progress: bool = True) -> FeaturesResult:
    """The pipeline's features stage: ``compute_features`` with the config's ``features`` section."""
    return compute_features(layout, cfg.features or FeaturesConfig(), progress=progress)


def compute_features(
    layout: DatasetLayout,
    fcfg: FeaturesConfig,
    *,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> FeaturesResult:
    """Compute the features of every kept tile into ``features/<extractor>/`` (docs/features.md).

    Resumable: chunks with a CLS file are skipped. ``part=(i, n)`` makes this process fill only the chunks
    ``c`` with ``c % n == i``, so n processes (or machines sharing the dataset root) can run at once;
    whichever finds every chunk done writes cls.parquet. A tile that cannot be read is reported in
    ``errors`` and leaves its chunk unfinished (no CLS file), so a rerun after the fix recomputes it.
    """
    index_of, parts = part
    if not 0 <= index_of < parts:
        raise ValueError(f"part {index_of}/{parts}: need 0 ≤ i < n")
    device = resolve_device(fcfg.device)
    extractor = load_extractor(fcfg, device)
    store = FeatureStore(layout, extractor.spec.name)
    if parts == 1:
        # Only a lone writer may: the temporaries of concurrent ones look the same.
        remove_stale_temporaries(store.dir)
    rows = plan_store(store, provenance(extractor, fcfg), fcfg.chunk_rows)
    total = num_chunks(rows, fcfg.chunk_rows)
    done = done_chunks(store)
    mine = [c for c in range(total) if c % parts == index_of]
    todo = [c for c in mine if c not in done]
    result = FeaturesResult(store.dir, rows, total, 0, len(mine) - len(todo), store.complete)
    if todo:
        _run_chunks(layout, store, extractor, fcfg, todo, rows, result, progress)
    result.complete = finalize(store)
    return result


def _run_chunks(
    layout: DatasetLayout,
    store: FeatureStore,
    extractor: TokenExtractor,
    fcfg: FeaturesConfig,
    todo: list[int],
    rows: int,
    result: FeaturesResult,
    progress: bool,
) -> None:
    writer = ChunkWriter(store)
    loader = DataLoader(
        _TileImages(layout.root, extractor.spec.img_size),
        batch_sampler=_ChunkBatches(IndexReader(store.index_path), todo, fcfg.chunk_rows, rows, fcfg.batch_size),
        num_workers=fcfg.num_workers,
        collate_fn=_collate,
        pin_memory=extractor.cuda,
        prefetch_factor=4 if fcfg.num_workers > 0 else None,
    )
    n_tiles = sum(b - a for a, b in (chunk_bounds(c, fcfg.chunk_rows, rows) for c in todo))
    open_chunk: _OpenChunk | None = None
    with tqdm(total=n_tiles, unit="tile", desc=f"features {store.extractor}", disable=not progress) as bar:
        for batch_rows, images, errors in loader:
            cls, tokens = extractor(images)
            chunk = int(batch_rows[0]) // fcfg.chunk_rows
            if open_chunk is None or open_chunk.chunk != chunk:
                a, b = chunk_bounds(chunk, fcfg.chunk_rows, rows)
                open_chunk = _OpenChunk(
                    chunk, a, np.empty((b - a, extractor.dim), np.float32), np.empty((b - a, *tokens.shape[1:]), np.float16)
                )
            at = batch_rows - open_chunk.start
            open_chunk.cls[at] = cls
            open_chunk.tokens[at] = tokens
            open_chunk.filled += len(at)
            open_chunk.errors.extend(e for e in errors if e)
            if open_chunk.full:
                if open_chunk.errors:
                    result.errors.extend(open_chunk.errors)
                else:
                    writer.write(chunk, open_chunk.cls, open_chunk.tokens)
                    result.computed += 1
                open_chunk = None
            bar.update(len(batch_rows))
