"""Evaluation variants of selected tiles (paper §4.3): 256×256 context tiles and JPEG copies.

A context tile has the same centre as its 224 px tile and ``(size - 224) / 2`` more pixels at the
same µm/px on each side (16 px for 256), read again from the slide. A JPEG variant encodes the
tile (the dataset's PNG at 224 px, or the context read) with Pillow at the given quality (70 is the
DS-MIL default that PixCell's tiles likely went through). Each variant lives in its own folder:

    variants/<name>/images/<project>/<slide_id>/<tile_id>.{png,jpg}
    variants/<name>/tiles/<slide_id>.parquet      (VARIANT_TILES)

with ``name`` such as ``256px-png``, ``256px-jpeg70`` or ``224px-jpeg70``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cytosyn.cohort.splits import split_mask
from cytosyn.errors import one_line
from cytosyn.io import schema
from cytosyn.io.atomic import remove_stale_temporaries, write_bytes_atomic, write_parquet_atomic
from cytosyn.io.hashing import sha256_bytes
from cytosyn.io.images import read_png_rgb
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides
from cytosyn.parallel import map_unordered
from cytosyn.tiling.extract import encode_png

TILE_SOURCE_COLUMNS = ["tile_id", "slide_id", "x", "y", "size_px", "mpp", "split", "guidance"]


def variant_name(size_px: int, jpeg_quality: int | None) -> str:
    return f"{size_px}px-" + ("png" if jpeg_quality is None else f"jpeg{jpeg_quality}")


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


@dataclass(frozen=True)
class _VariantJob:
    root: str
    slide_id: str
    project: str
    slide_path: str
    backend: str
    mpp_override: float | None
    objective_power_fallback: bool
    source: str  # "tiles" or "selection": where the rows (and, at 224 px, the PNGs) come from
    splits: tuple[str, ...]
    size_px: int
    jpeg_quality: int | None
    png_compression: int


def _rows(layout: DatasetLayout, job: _VariantJob) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The slide's tiles now (every split), and those of the requested splits, sorted by tile_id."""
    path = layout.tiles_path(job.slide_id) if job.source == "tiles" else layout.selection_path(job.slide_id)
    cols = TILE_SOURCE_COLUMNS + (["image_path"] if job.source == "tiles" else [])
    frame = pd.read_parquet(path, columns=cols)
    keep = np.zeros(len(frame), dtype=bool)
    for name in job.splits:
        keep |= split_mask(frame, name).to_numpy()
    return frame, frame[keep].sort_values("tile_id", kind="stable").reset_index(drop=True)


def _written(layout: DatasetLayout, name: str, slide_id: str) -> pd.DataFrame:
    """The slide's variant rows written so far (none when the manifest does not exist)."""
    manifest = layout.variant_tiles_path(name, slide_id)
    if not manifest.exists():
        return pd.DataFrame(columns=schema.VARIANT_TILES.names)
    return pd.read_parquet(manifest)


def _variant_slide(job: _VariantJob) -> dict:
    layout = DatasetLayout(job.root)
    name = variant_name(job.size_px, job.jpeg_quality)
    try:
        current, rows = _rows(layout, job)
        # A variant folder is one encoding of the dataset's tiles: asking for more splits later adds
        # their rows, so what an earlier request wrote is kept, unless its image has gone or the tile
        # is no longer in the dataset (a changed selection).
        # A tile keeps its id when a new selection moves it to another split: its labels come from now.
        written = _written(layout, name, job.slide_id)
        on_disk = np.array([layout.resolve(p).exists() for p in written["image_path"]], dtype=bool)
        done = written[written["tile_id"].isin(current["tile_id"]).to_numpy() & on_disk]
        labels = current.set_index("tile_id").loc[done["tile_id"], ["split", "guidance"]]
        relabelled = done.assign(split=labels["split"].to_numpy(), guidance=labels["guidance"].fillna(False).astype(bool).to_numpy())
        todo = rows[~rows["tile_id"].isin(done["tile_id"])].reset_index(drop=True)
        if todo.empty and len(done) == len(written) and relabelled[["split", "guidance"]].equals(done[["split", "guidance"]]):
            return {"slide_id": job.slide_id, "tiles": len(rows), "error": None}
        done = relabelled
        ext = "png" if job.jpeg_quality is None else "jpg"
        remove_stale_temporaries(layout.variant_slide_images_dir(name, job.project, job.slide_id))
        read, slide = _reader(layout, job, todo)
        paths, checksums = [], []
        try:
            for row in todo.itertuples(index=False):
                rgb = read(row)
                data = encode_png(rgb, job.png_compression) if job.jpeg_quality is None else encode_jpeg(rgb, job.jpeg_quality)
                rel = layout.variant_image_relpath(name, job.project, job.slide_id, row.tile_id, ext)
                write_bytes_atomic(layout.resolve(rel), data)
                paths.append(rel)
                checksums.append(sha256_bytes(data))
        finally:
            if slide is not None:
                slide.close()
        new = pd.DataFrame(
            {
                "tile_id": todo["tile_id"],
                "slide_id": todo["slide_id"],
                "split": todo["split"],
                "guidance": todo["guidance"].fillna(False).astype(bool),
                "variant": name,
                "size_px": np.int32(job.size_px),
                "image_path": pd.Series(paths, dtype=object),
                "image_sha256": pd.Series(checksums, dtype=object),
            }
        )
        out = pd.concat([done, new], ignore_index=True) if len(done) else new
        out = out.sort_values("tile_id", kind="stable").reset_index(drop=True)
        write_parquet_atomic(layout.variant_tiles_path(name, job.slide_id), out, schema.VARIANT_TILES)
        return {"slide_id": job.slide_id, "tiles": len(rows), "error": None}
    except Exception as exc:  # one unreadable slide must not stop the others
        text = one_line(exc)
        return {"slide_id": job.slide_id, "tiles": 0, "error": f"{job.slide_path}: {text}"}


def _reader(layout: DatasetLayout, job: _VariantJob, rows: pd.DataFrame):
    """A function row → RGB array (the dataset's own PNG at tile size, a fresh slide read otherwise)
    and the slide it opened, if any, for the caller to close."""
    if rows.empty:
        return None, None
    if (rows["size_px"] == job.size_px).all():
        if job.source != "tiles":
            raise FileNotFoundError(f"{layout.tiles_path(job.slide_id)}: no extracted tiles to re-encode; run `cytosyn data build` first")
        by_id = dict(zip(rows["tile_id"], rows["image_path"]))
        return (lambda row: read_png_rgb(layout.resolve(by_id[row.tile_id]))), None
    if (rows["size_px"] > job.size_px).any():
        raise ValueError(f"variant size {job.size_px} px is smaller than the tiles ({int(rows['size_px'].max())} px)")
    from cytosyn.slides.reader import open_slide

    slide = open_slide(job.slide_path, job.backend, job.mpp_override, job.objective_power_fallback)

    def read(row) -> np.ndarray:
        margin = (job.size_px - row.size_px) / 2
        # The margin is in target pixels; in level-0 pixels it depends on the slide's own resolution.
        x0 = int(round(row.x - margin * row.mpp / slide.mpp_x))
        y0 = int(round(row.y - margin * row.mpp / slide.mpp_y))
        return slide.read_region_at_mpp(x0, y0, job.size_px, row.mpp)

    return read, slide


@dataclass
class VariantReport:
    name: str
    tiles: int = 0
    slides: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def write_variants(
    layout: DatasetLayout,
    splits: list[str],
    size_px: int = 256,
    jpeg_quality: int | None = None,
    workers: int = 1,
    dask_address: str | None = None,
    png_compression: int = 1,
) -> VariantReport:
    """Write one variant of every tile in ``splits`` (``guidance`` = the flagged subset)."""
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 95:
        raise ValueError(f"JPEG quality {jpeg_quality} is outside 1–95")
    unknown = sorted(set(splits) - set(schema.SPLITS))
    if unknown or not splits:
        raise ValueError(f"unknown split(s) {unknown or splits}; choose from {', '.join(schema.SPLITS)}")
    slides = read_slides(layout)
    source = "tiles" if layout.tiles_dir.exists() and any(layout.tiles_dir.glob("*.parquet")) else "selection"
    folder = layout.tiles_dir if source == "tiles" else layout.selection_dir
    have = {p.stem for p in folder.glob("*.parquet")} if folder.exists() else set()
    jobs = []
    for r in slides[slides["status"] == "ok"].sort_values("slide_id").itertuples(index=False):
        if r.slide_id not in have:
            continue
        path = Path(r.path) if Path(r.path).is_absolute() else layout.resolve(r.path)
        mpp_source = getattr(r, "mpp_source", None)
        jobs.append(
            _VariantJob(
                str(layout.root), r.slide_id, r.project or "generic", str(path), r.backend or "auto",
                float(r.mpp_x) if mpp_source == "override" else None, mpp_source == "objective-power",
                source, tuple(splits), int(size_px), jpeg_quality, png_compression,
            )
        )
    name = variant_name(size_px, jpeg_quality)
    remove_stale_temporaries(layout.variants_dir(name) / "tiles", recursive=False)
    report = VariantReport(name)
    for res in sorted(map_unordered(_variant_slide, jobs, workers=workers, dask_address=dask_address, desc=name),
                      key=lambda r: r["slide_id"]):
        report.slides += 1
        report.tiles += res["tiles"]
        if res["error"]:
            report.errors.append(res["error"])
    return report
