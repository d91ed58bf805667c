"""Tiling throughput on one core: the real extraction path against a bare read→resize→encode loop.

A synthetic 40x slide (0.2520 µm/px, ≥ 20k × 20k px) is tiled at 224 px / 0.5 µm/px to PNG. The floor
reads the same regions with the backend's `read_region`, resizes them with cv2 area interpolation and
encodes them with `cv2.imencode` in a bare loop (no files, no checksums, no manifest). Both run in the
same process, interleaved, three times, and the best of each is kept.

    python benchmarks/tiling.py [--size 20480] [--tiles 800]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from _common import pin_to_one_core, report, timed  # noqa: E402

from cytosyn.io.layout import DatasetLayout  # noqa: E402
from cytosyn.slides import open_slide  # noqa: E402
from cytosyn.slides.synthetic import write_synthetic_slide  # noqa: E402
from cytosyn.tiling.extract import extract_tiles  # noqa: E402
from cytosyn.tiling.grid import candidate_cells, sample_cells  # noqa: E402

MPP, SIZE, PNG_LEVEL = 0.5, 224, 1


def floor_loop(slide, cells: pd.DataFrame) -> int:
    handle = slide._handle  # the backend object itself: the floor must not go through cytosyn's reader
    fp = slide.footprint(SIZE, MPP)
    for x, y in zip(cells.x.tolist(), cells.y.tolist()):
        # The cheapest bare path: one colour conversion straight to the BGR that imencode wants
        # (OpenSlide gives RGBA, tiffslide RGB).
        region = np.asarray(handle.read_region((x, y), fp.read_level, (fp.read_w, fp.read_h)))
        region = cv2.cvtColor(region, cv2.COLOR_RGBA2BGR if region.shape[2] == 4 else cv2.COLOR_RGB2BGR)
        tile = cv2.resize(region, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        ok, _ = cv2.imencode(".png", tile, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
        assert ok
    return len(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20480, help="slide side in level-0 pixels")
    ap.add_argument("--tiles", type=int, default=800, help="tiles per measured pass")
    ap.add_argument("--backend", default="openslide")
    ap.add_argument("--keep", type=Path, help="folder to keep the synthetic slide in between runs")
    args = ap.parse_args()
    pin_to_one_core()

    work = Path(tempfile.mkdtemp(prefix="cytosyn-bench-"))
    slide_dir = args.keep or work
    slide_path = slide_dir / "TCGA-A1-A0SB-01Z-00-DX1.BENCH.svs"
    if not slide_path.exists():
        print(f"writing a {args.size}x{args.size} synthetic 40x slide to {slide_path} ...", flush=True)
        write_synthetic_slide(slide_path, width=args.size, height=args.size, mpp=0.2520, seed=0)
    try:
        with open_slide(slide_path, backend=args.backend) as slide:
            fp = slide.footprint(SIZE, MPP)
            # A tissue-fraction threshold of 0 makes every grid cell a candidate, whatever the mask says.
            cells = candidate_cells("BENCH", *slide.dimensions, fp, SIZE, MPP, np.ones((1, 1), bool), (0.0, 0.0), 0.0)
            cells["split"], cells["guidance"] = "train", False
            cells = sample_cells(cells, args.tiles, seed=0, slide_id="BENCH")
            print(f"slide {slide.dimensions}, level-0 footprint {fp.size_level0_x:.2f} px, read level {fp.read_level}, {len(cells)} tiles/pass")

            best_floor = best_real = 0.0
            for rep in range(3):
                t_floor, n = timed(floor_loop, slide, cells)
                out = work / f"run{rep}"
                t_real, tiles = timed(extract_tiles, slide, cells, DatasetLayout(out), "BRCA", PNG_LEVEL)
                assert len(tiles) == n
                shutil.rmtree(out)
                best_floor, best_real = max(best_floor, n / t_floor), max(best_real, n / t_real)
        report("tiling (one core, 224 px @ 0.5 µm/px from 0.252 µm/px, PNG level 1)", best_real, best_floor, "tiles/s", 0.8)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
