"""Curation on this machine's CPU: backbone throughput against the bare model, and training memory at paper scale.

1. Memory (run first, so nothing else has raised the process's peak): 5-fold cross-validated training of
   the standardised logistic-regression heads on 79.5k × 384 synthetic features (the paper's number of
   annotations, ViT-S's feature width), then prediction with the saved-and-reloaded heads. Reported: the
   peak RSS above the process's baseline, against the feature matrix itself (the floor: no training can
   hold less), and the wall time.
2. Backbone: ``embed_tiles`` (PNG decode + filter measures + normalisation in the DataLoader, forward of
   ViT-S, features back to numpy) in tiles/s, against the bare ``model(x)`` forward on tensors already in
   memory at the same batch size. Both run alternately ``--reps`` times; the best of each is kept (other
   load only ever slows a run down). Target: ratio ≥ 0.85.

Tiles are synthetic H&E PNGs at 0.5 µm/px cut from a synthetic slide. The backbone is the real
``vit_small_patch16_224`` with random weights written to a safetensors file first (``--depth`` to shrink).

    python benchmarks/curation.py [--tiles 128] [--batch-size 32] [--num-workers 0] [--depth 12] [--annotations 79500]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _common import report  # noqa: E402

from cytosyn.config import CurationConfig  # noqa: E402
from cytosyn.curation.classifier import HeadEnsemble  # noqa: E402
from cytosyn.curation.features import backbone_setup, embed_tiles, load_backbone  # noqa: E402
from cytosyn.curation.train import cross_validate  # noqa: E402
from cytosyn.io.images import read_png_rgb  # noqa: E402
from cytosyn.nn.backbones import to_normalised_tensor  # noqa: E402
from cytosyn.slides import open_slide  # noqa: E402
from cytosyn.slides.synthetic import write_synthetic_slide  # noqa: E402
from cytosyn.tiling.extract import encode_png  # noqa: E402

MB = 1024 * 1024


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory(n: int, dim: int, work: Path) -> None:
    baseline = psutil.Process().memory_info().rss
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 2000, n).astype(str)  # ~2,000 annotated slides
    labels = (rng.random(n) < 0.2).astype(np.int64)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    features[:, :8] += labels[:, None]
    floor = features.nbytes
    start = time.perf_counter()
    result = cross_validate(features, labels, groups, n_folds=5, C=1.0, max_iter=1000, seed=0, threshold=0.5)
    train_s = time.perf_counter() - start
    result.ensemble.save(work / "heads")
    loaded = HeadEnsemble.load(work / "heads")
    start = time.perf_counter()
    prob = loaded.predict_proba(features)
    predict_s = time.perf_counter() - start
    assert np.array_equal(prob, result.ensemble.predict_proba(features))
    used = peak_rss() - baseline
    print(f"training: {n:,} annotations × {dim}, 5 folds: {train_s:.1f} s; out-of-fold ROC-AUC {result.metrics['roc_auc']:.3f}")
    print(f"prediction with the reloaded heads: {n / predict_s:,.0f} tiles/s (bit-identical to the in-memory heads)")
    print(f"memory: peak RSS {used / MB:.0f} MB above baseline vs the float32 feature matrix {floor / MB:.0f} MB "
          f"-> {used / floor:.2f}x (total peak {peak_rss() / MB:.0f} MB)")


def make_tiles(work: Path, n: int) -> list[Path]:
    slide_path = work / "bench.svs"
    write_synthetic_slide(slide_path, width=224 * 16, height=224 * 16, mpp=0.5, seed=0, artifacts=("pen", "blur"))
    paths = []
    with open_slide(slide_path) as slide:
        for i in range(n):
            x, y = (i % 16) * 224, (i // 16 % 16) * 224
            path = work / "tiles" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(slide.read_region_at_mpp(x, y, 224, 0.5)))
            paths.append(path)
    return paths


def backbone(paths: list[Path], batch_size: int, num_workers: int, depth: int, reps: int, work: Path) -> None:
    overrides = {"depth": depth} if depth != 12 else {}
    torch.manual_seed(0)
    random_weights = load_backbone(backbone_setup(CurationConfig(weights="random-init", timm_overrides=overrides), 0)).state_dict()
    weights = work / "vit_s.safetensors"
    save_file({k: v.contiguous() for k, v in random_weights.items()}, str(weights))
    setup = backbone_setup(CurationConfig(weights=weights, timm_overrides=overrides), 0)
    model = load_backbone(setup)
    images = torch.stack([to_normalised_tensor(read_png_rgb(p), setup.mean, setup.std) for p in paths])

    def bare() -> float:
        with torch.inference_mode():
            model(images[:batch_size])  # warm-up, as the first batch of the real path pays the same
            start = time.perf_counter()
            for i in range(0, len(images), batch_size):
                model(images[i : i + batch_size])
            return len(images) / (time.perf_counter() - start)

    def real() -> float:
        start = time.perf_counter()
        out = embed_tiles(model, setup, paths, 220, batch_size=batch_size, num_workers=num_workers, desc="bench")
        assert out.embedded.all()
        return len(paths) / (time.perf_counter() - start)

    with torch.inference_mode():
        model(images[:batch_size])
    best_bare = best_real = 0.0
    for _ in range(reps):
        best_bare = max(best_bare, bare())
        best_real = max(best_real, real())
    arch = f"ViT-S/16 depth {depth}, batch {batch_size}, {num_workers} loader workers, {torch.get_num_threads()} torch threads"
    report(f"curation backbone ({arch})", best_real, best_bare, "tiles/s", 0.85)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--annotations", type=int, default=79_500)
    ap.add_argument("--dim", type=int, default=384)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cytosyn-bench-curation-"))
    try:
        memory(args.annotations, args.dim, work)
        backbone(make_tiles(work, args.tiles), args.batch_size, args.num_workers, args.depth, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
