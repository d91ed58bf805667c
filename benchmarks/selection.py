"""Benchmark: a 40M-tile TSS-stratified selection over the 32 TCGA GDC manifests (~11.8k slides).

Per-slide capacities (candidate cells) are synthetic — lognormal around 5,000 cells, a slide of
~1 cm² of tissue at 0.5 µm/px — because the real ones only exist after tiling 11.8k slides.

1. In memory, all slides: the slide split, the count plan, the materialisation of every slide's cell
   choices and the achieved-vs-target report (what `select_tiles` computes), and the peak RSS. The
   floor, measured in the same run, is the bare per-slide permutation of every slide's candidates;
   the ratio says what the rest costs.
2. With files, a sample of slides: `select_tiles` itself on a dataset root holding the sample's
   candidate files (written beforehand, not timed), with the budget and split sizes scaled to the
   sample: counting the candidate files, reading them, drawing, writing the selection files and the
   report; in one process, ``--repeats`` times on a fresh selection folder. 71M candidate rows for
   all slides would take far longer to write than to select, so the all-slide time with files is
   estimated against the 60 s target: phase 1's all-slide work besides the draw (split, plan,
   report), plus every slide at the sample's cost per slide: its select_tiles time less its slide
   split, plan and report, timed apart on the same slides because their cost depends on the cohort
   rather than on the files. With ``--workers N`` the sample is selected on a local Dask cluster of N
   processes (its start-up included; slides go 64 to a task): use a sample of a few thousand slides
   so that start-up does not dominate.

    python benchmarks/selection.py [--manifests DIR] [--budget 40000000] [--io-slides 200] [--repeats 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cytosyn.cohort.inventory import inventory_from_gdc_manifests
from cytosyn.cohort.selection import COUNT_COLUMNS, SPLIT_ORDER, candidate_counts, draw_cells, plan_selection, select_tiles, summarise
from cytosyn.cohort.splits import assign_slide_splits
from cytosyn.config import CohortConfig
from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.hashing import slide_rng
from cytosyn.io.layout import DatasetLayout
from cytosyn.pipeline.build import write_slides_manifest
from cytosyn.slides.reader import Footprint
from cytosyn.tiling.grid import candidate_cells

TARGET_S = 60
DEFAULT_MANIFESTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tcga" / "gdc_manifests"
CELL_PX = 448  # level-0 footprint of a 224 px tile at 0.5 µm/px on a 0.25 µm/px slide


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synthetic_candidates(slide_id: str, capacity: int) -> pd.DataFrame:
    """``capacity`` CANDIDATES rows of an all-tissue slide, from the tiling stage's own grid."""
    nx = int(np.ceil(np.sqrt(capacity)))
    ny = int(np.ceil(capacity / nx))
    footprint = Footprint(read_level=0, size_level0_x=CELL_PX, size_level0_y=CELL_PX, read_w=CELL_PX, read_h=CELL_PX)
    mask = np.ones((ny, nx), dtype=bool)
    cells = candidate_cells(slide_id, nx * CELL_PX, ny * CELL_PX, footprint, 224, 0.5, mask, (1 / CELL_PX, 1 / CELL_PX), 0.5)
    return cells.iloc[:capacity]


def in_memory(slides: pd.DataFrame, cohort: CohortConfig, seed: int) -> tuple[pd.DataFrame, float]:
    """Phase 1; returns the usable slides with their synthetic capacities, and the time of its work
    besides the draw (which phase 2 counts per slide)."""
    t0 = time.perf_counter()
    split, split_report = assign_slide_splits(slides, cohort, seed)
    usable = slides.assign(split=split)
    usable = usable[(usable["status"] == "ok") & usable["split"].notna()].copy()
    rng = np.random.default_rng(12345)
    usable["capacity"] = np.maximum(rng.lognormal(np.log(5000), 0.6, len(usable)).astype(np.int64), 1)
    t1 = time.perf_counter()
    plan = plan_selection(usable, cohort, seed)
    t2 = time.perf_counter()
    per_code = np.zeros(len(SPLIT_ORDER), dtype=np.int64)
    flagged = 0
    for row in plan.itertuples(index=False):
        counts = {c: int(getattr(row, c)) for c in COUNT_COLUMNS.values()}
        _, codes, guidance = draw_cells(int(row.capacity), counts, seed, row.slide_id, external=False)
        per_code += np.bincount(codes, minlength=len(SPLIT_ORDER))
        flagged += int(guidance.sum())
    drawn = dict(zip(SPLIT_ORDER, per_code.tolist())) | {"guidance": flagged}
    t3 = time.perf_counter()
    splits, _, _ = summarise(plan, cohort)
    t4 = time.perf_counter()

    f0 = time.perf_counter()
    for slide_id, capacity in zip(plan["slide_id"], plan["capacity"]):
        slide_rng(seed, slide_id).permutation(int(capacity))
    floor = time.perf_counter() - f0

    total = t4 - t0
    print(f"slides: {len(slides)} listed, {len(plan)} usable; candidates: {int(plan['capacity'].sum()):,}")
    print(f"val_out slides: {split_report.val_out} ({split_report.projects_in_val_out}/{split_report.projects} projects), "
          f"slide-level site TVD {split_report.tvd_tss:.4f} (rounding floor {split_report.tvd_tss_floor:.4f})")
    for name, d in splits.items():
        print(f"{name:>8}: target {d['target']:>11,}  achieved {d['achieved']:>11,}  drawn {drawn[name]:>11,}  "
              f"site TVD {d['tvd_tss']:.5f} (best possible {d['tvd_tss_floor']:.5f})  "
              f"project TVD {d['tvd_project']:.5f} (best possible {d['tvd_project_floor']:.5f})")
    print(f"in memory: split {t1 - t0:.2f} s, plan {t2 - t1:.2f} s, draw {t3 - t2:.2f} s, report {t4 - t3:.2f} s; total {total:.2f} s")
    print(f"floor (bare per-slide permutations): {floor:.2f} s; ratio total/floor: {total / floor:.2f}x")
    return usable, total - (t3 - t2)


def with_files(slides: pd.DataFrame, usable: pd.DataFrame, all_slide_s: float, cohort: CohortConfig, seed: int, n: int,
               repeats: int, workers: int) -> None:
    """Phase 2: ``select_tiles`` on a sample of ``n`` slides, extrapolated to all usable slides."""
    pick = np.sort(np.random.default_rng(7).choice(len(usable), size=min(n, len(usable)), replace=False))
    sample = usable.iloc[pick]
    scale = len(sample) / len(usable)
    scaled = cohort.model_copy(update={
        "budget": round(cohort.budget * scale), "val_out_slides": max(round(1012 * scale), 1),
        **{k: round(getattr(cohort, k) * scale) for k in ("val_in_tiles", "val_out_tiles", "guidance_tiles")},
    })
    with tempfile.TemporaryDirectory(prefix="cytosyn-selection-bench-") as tmp:
        layout = DatasetLayout(Path(tmp))
        for slide_id, capacity in zip(sample["slide_id"], sample["capacity"]):
            write_parquet_atomic(layout.candidates_path(slide_id), synthetic_candidates(slide_id, int(capacity)), schema.CANDIDATES)
        sample_slides = slides[slides["slide_id"].isin(set(sample["slide_id"]))]
        write_slides_manifest(layout, sample_slides)
        cohort_runs = []
        for _ in range(repeats):
            s0 = time.perf_counter()
            split, _ = assign_slide_splits(sample_slides, scaled, seed)
            members = sample.drop(columns="split").merge(sample_slides.assign(split=split)[["slide_id", "split"]])
            summarise(plan_selection(members[members["split"].notna()], scaled, seed), scaled)
            cohort_runs.append(time.perf_counter() - s0)
        # The fastest run: subtracting it errs towards a higher cost per slide.
        cohort_s = min(cohort_runs)
        c0 = time.perf_counter()
        candidate_counts(layout, sample["slide_id"].tolist())
        count_s = time.perf_counter() - c0
        print(f"with files ({len(sample)} slides, {int(sample['capacity'].sum()):,} candidates): its slide split, plan and report "
              f"{cohort_s:.2f} s; counting the candidate files alone {1000 * count_s / len(sample):.2f} ms a slide")
        per_slide = []
        for _ in range(repeats):
            shutil.rmtree(layout.selection_dir, ignore_errors=True)
            t0 = time.perf_counter()
            report = select_tiles(layout, scaled, seed, workers=workers)
            per_slide.append((time.perf_counter() - t0 - cohort_s) / len(sample))
            if not report.ok:
                raise SystemExit(f"the sample's selection failed: {report.errors[:3]}")
    tiles = sum(d["achieved"] for name, d in report.splits.items() if name != "guidance")
    lo, hi = min(per_slide), max(per_slide)
    estimate = [all_slide_s + p * len(usable) for p in (lo, hi)]
    verdict = "met" if estimate[1] < TARGET_S else "not met" if estimate[0] >= TARGET_S else "met in some runs"
    print(f"select_tiles on the sample ({tiles:,} tiles, {repeats} runs): {1000 * lo:.1f}–{1000 * hi:.1f} ms a slide besides")
    where = "one process" if workers == 1 else f"{workers} worker processes"
    print(f"estimate for all {len(usable)} slides with files, {where}: {estimate[0]:.0f}–{estimate[1]:.0f} s "
          f"(target < {TARGET_S} s: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", type=Path, default=DEFAULT_MANIFESTS)
    parser.add_argument("--budget", type=int, default=40_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--io-slides", type=int, default=200, help="slides in the with-files sample (0 skips it)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the with-files selection (the range is reported)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the with-files selection")
    args = parser.parse_args()
    if not args.manifests.is_dir():
        raise SystemExit(f"{args.manifests}: no such folder of GDC manifests; pass --manifests DIR")

    slides = inventory_from_gdc_manifests([args.manifests])
    rss_start = peak_rss_mb()
    cohort = CohortConfig(budget=args.budget)
    usable, all_slide_s = in_memory(slides, cohort, args.seed)
    rss_memory = peak_rss_mb()
    if args.io_slides > 0:
        with_files(slides, usable, all_slide_s, cohort, args.seed, args.io_slides, args.repeats, args.workers)
    print(f"peak RSS: {peak_rss_mb():.0f} MB (after loading the inventory: {rss_start:.0f} MB; after the in-memory phase: {rss_memory:.0f} MB)")


if __name__ == "__main__":
    main()
