"""The per-slide stages, each a function of one picklable job so any worker can run it.

scan:    open the slide, record its metadata, compute the tissue mask and the candidate cells.
extract: write the selected tiles as PNGs, the slide's tile manifest and its QC thumbnail.

Each stage writes its marker file last (candidates/, tiles/), so a killed run resumes where it stopped.
Any failure becomes ``status="error"`` with a one-line reason; it never escapes to stop the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cytosyn.config import PipelineConfig
from cytosyn.errors import one_line
from cytosyn.io.atomic import remove_stale_temporaries, write_bytes_atomic, write_parquet_atomic
from cytosyn.io import schema
from cytosyn.io.layout import DatasetLayout
from cytosyn.slides import Slide, SlideError, open_slide
from cytosyn.tiling.extract import encode_png, extract_tiles
from cytosyn.tiling.grid import candidate_cells
from cytosyn.tiling.qc import qc_thumbnail
from cytosyn.tissue import tissue_mask


@dataclass(frozen=True)
class SlideJob:
    slide_id: str
    path: str  # absolute
    project: str
    root: str
    cfg: PipelineConfig
    mpp: float | None = None  # per-slide override (slide CSV); the config's override wins otherwise


def _open(job: SlideJob) -> Slide:
    s = job.cfg.slides
    return open_slide(job.path, backend=s.backend, mpp=s.mpp or job.mpp, objective_power_fallback=s.objective_power_fallback)


def _level0_to(slide: Slide, mpp: float) -> tuple[float, float]:
    """Scale from level-0 pixels to pixels of an image of the slide at ``mpp``."""
    return slide.mpp_x / mpp, slide.mpp_y / mpp


def _error_message(job: SlideJob, exc: BaseException) -> str:
    return one_line(exc if isinstance(exc, SlideError) else f"{job.path}: {exc.__class__.__name__}: {exc}")


def scan_slide(job: SlideJob) -> dict:
    """Slide metadata (SLIDES columns except the cohort ones) plus ``n_candidates``."""
    layout = DatasetLayout(Path(job.root))
    row: dict = {"slide_id": job.slide_id, "status": "ok", "error": None, "n_candidates": 0}
    try:
        with _open(job) as slide:
            w, h = slide.dimensions
            row.update(
                vendor=slide.vendor, backend=slide.backend, width=w, height=h,
                mpp_x=slide.mpp_x, mpp_y=slide.mpp_y, mpp_source=slide.mpp.source,
            )
            cand_path = layout.candidates_path(job.slide_id)
            done = _row_count(cand_path)
            if done is not None:
                row["n_candidates"] = done
                return row
            tissue, tiling = job.cfg.tissue, job.cfg.tiling
            mask = tissue_mask(slide.read_at_mpp(tissue.mask_mpp), tissue.mask_mpp, tissue)
            write_bytes_atomic(layout.mask_path(job.slide_id), encode_png(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2), 6))
            fp = slide.footprint(tiling.size_px, tiling.mpp)
            cands = candidate_cells(
                job.slide_id, w, h, fp, tiling.size_px, tiling.mpp, mask,
                _level0_to(slide, tissue.mask_mpp), tiling.min_tissue_fraction,
            )
            write_parquet_atomic(cand_path, cands, schema.CANDIDATES)
            row["n_candidates"] = len(cands)
    except Exception as exc:  # noqa: BLE001 - bad input never stops the batch
        row.update(status="error", error=_error_message(job, exc))
    return row


def _row_count(path: Path) -> int | None:
    """Rows of a finished Parquet file; None when it is missing or unreadable (then it is made again)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException):
        return None


def extract_slide(job: SlideJob) -> dict:
    """Tiles of one slide; returns ``n_tiles`` and, on failure, ``status="error"`` with the reason."""
    layout = DatasetLayout(Path(job.root))
    result: dict = {"slide_id": job.slide_id, "status": "ok", "error": None, "n_tiles": 0}
    tiles_path = layout.tiles_path(job.slide_id)
    # The selection stage deletes a slide's tile manifest whenever its selection changes.
    done = _row_count(tiles_path)
    if done is not None:
        result["n_tiles"] = done
        return result
    try:
        remove_stale_temporaries(layout.slide_images_dir(job.project, job.slide_id))
        selection = pd.read_parquet(layout.selection_path(job.slide_id))
        tiling = job.cfg.tiling
        with _open(job) as slide:
            tiles = extract_tiles(slide, selection, layout, job.project, tiling.png_compression)
            mask_png = cv2.imread(str(layout.mask_path(job.slide_id)), cv2.IMREAD_GRAYSCALE)
            if mask_png is None:
                raise FileNotFoundError(
                    f"{layout.mask_path(job.slide_id)}: tissue mask missing; delete "
                    f"{layout.candidates_path(job.slide_id)} and rerun the build to recompute both"
                )
            mask = mask_png > 0
            fp = slide.footprint(tiling.size_px, tiling.mpp)
            # The thumbnail is drawn finer than the mask so that single tiles stay visible.
            w, h = slide.dimensions
            qc_mpp = max(slide.mpp_x, max(w * slide.mpp_x, h * slide.mpp_y) / tiling.qc_thumbnail_px)
            jpeg = qc_thumbnail(
                slide.read_at_mpp(qc_mpp), mask, tiles, _level0_to(slide, qc_mpp),
                (fp.size_level0_x, fp.size_level0_y), tiling.qc_thumbnail_px,
            )
        write_bytes_atomic(layout.qc_path(job.slide_id), jpeg)
        write_parquet_atomic(tiles_path, tiles, schema.TILES)
        result["n_tiles"] = len(tiles)
    except Exception as exc:  # noqa: BLE001
        result.update(status="error", error=_error_message(job, exc))
    return result


def crashed_slide(job: SlideJob, exc: BaseException) -> dict:
    """The result of a slide whose worker process died (the stages catch every Python error themselves)."""
    return {
        "slide_id": job.slide_id, "status": "error",
        "error": one_line(f"{job.path}: the worker process died on this slide ({exc.__class__.__name__}); "
                          "the file is probably corrupt: re-download it, or remove it from the slide list"),
    }


def relative_to_root(path: str, root: str) -> str:
    """Manifest paths are relative to the root when the file lives under it (so the dataset can move)."""
    p, r = os.path.abspath(path), os.path.abspath(root)
    return os.path.relpath(p, r) if p.startswith(r + os.sep) else p
