"""Benchmark: a 40M-tile TSS-stratified selection over the 32 TCGA GDC manifests (~11.8k slides).

Per-slide capacities (candidate cells) are synthetic — lognormal around 5,000 cells, a slide of
~1 cm² of tissue at 0.5 µm/px — because the real ones only exist after tiling 11.8k slides. The run
times the slide split, the count plan and the materialisation of every slide's cell choices (the
work `select_tiles` does besides reading and writing Parquet), and the peak RSS of the process.

The floor, measured in the same run, is the bare per-slide permutation of every slide's candidates
(the draw itself, without planning or split bookkeeping); the ratio says what the rest costs.

    python benchmarks/selection.py [--manifests DIR] [--budget 40000000]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from cytosyn.cohort.inventory import inventory_from_gdc_manifests
from cytosyn.cohort.selection import COUNT_COLUMNS, SPLIT_ORDER, draw_cells, plan_selection, summarise
from cytosyn.cohort.splits import assign_slide_splits
from cytosyn.config import CohortConfig
from cytosyn.io.hashing import slide_rng

DEFAULT_MANIFESTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tcga" / "gdc_manifests"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", type=Path, default=DEFAULT_MANIFESTS)
    parser.add_argument("--budget", type=int, default=40_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = sorted(args.manifests.glob("*.txt"))
    if not files:
        raise SystemExit(f"{args.manifests}: no GDC manifests; pass --manifests DIR")

    slides = inventory_from_gdc_manifests(files)
    rss_start = peak_rss_mb()
    cohort = CohortConfig(budget=args.budget)

    t0 = time.perf_counter()
    split, split_report = assign_slide_splits(slides, cohort, args.seed)
    usable = slides.assign(split=split)
    usable = usable[(usable["status"] == "ok") & usable["split"].notna()].copy()
    rng = np.random.default_rng(12345)
    usable["capacity"] = np.maximum(rng.lognormal(np.log(5000), 0.6, len(usable)).astype(np.int64), 1)
    t1 = time.perf_counter()
    plan = plan_selection(usable, cohort, args.seed)
    t2 = time.perf_counter()
    per_code = np.zeros(len(SPLIT_ORDER), dtype=np.int64)
    flagged = 0
    for row in plan.itertuples(index=False):
        counts = {c: int(getattr(row, c)) for c in COUNT_COLUMNS.values()}
        _, codes, guidance = draw_cells(int(row.capacity), counts, args.seed, row.slide_id, external=False)
        per_code += np.bincount(codes, minlength=len(SPLIT_ORDER))
        flagged += int(guidance.sum())
    drawn = dict(zip(SPLIT_ORDER, per_code.tolist())) | {"guidance": flagged}
    t3 = time.perf_counter()
    splits, _, _ = summarise(plan, cohort)
    t4 = time.perf_counter()

    f0 = time.perf_counter()
    for slide_id, capacity in zip(plan["slide_id"], plan["capacity"]):
        slide_rng(args.seed, slide_id).permutation(int(capacity))
    floor = time.perf_counter() - f0

    total = t4 - t0
    print(f"slides: {len(slides)} listed, {len(plan)} usable; candidates: {int(plan['capacity'].sum()):,}")
    print(f"val_out slides: {split_report.val_out} ({split_report.projects_in_val_out}/{split_report.projects} projects), "
          f"slide-level site TVD {split_report.tvd_tss:.4f} (rounding floor {split_report.tvd_tss_floor:.4f})")
    for name, d in splits.items():
        print(f"{name:>8}: target {d['target']:>11,}  achieved {d['achieved']:>11,}  drawn {drawn[name]:>11,}  "
              f"site TVD {d['tvd_tss']:.5f} (floor {d['tvd_tss_floor']:.5f})  project TVD {d['tvd_project']:.5f}")
    print(f"time: split {t1 - t0:.2f} s, plan {t2 - t1:.2f} s, draw {t3 - t2:.2f} s, report {t4 - t3:.2f} s; total {total:.2f} s")
    print(f"floor (bare per-slide permutations): {floor:.2f} s; ratio total/floor: {total / floor:.2f}x")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (after loading the inventory: {rss_start:.0f} MB)")


if __name__ == "__main__":
    main()
