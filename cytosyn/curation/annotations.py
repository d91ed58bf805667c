"""Tile annotations for the artifact classifier: file formats, resolution to PNGs, demo ground truth.

An annotation file is CSV or Parquet, one row per tile, with
  - ``label``: ``tissue`` or ``artifact`` (case-insensitive),
  - either ``image_path`` (a PNG; relative paths resolve against the dataset root when one is given,
    else against the annotation file's folder) or ``slide_id`` + ``x`` + ``y`` + ``mpp`` (level-0
    top-left of a tile of ``size_px`` pixels, 224 by default, at ``mpp`` µm/px),
  - optionally ``artifact_type`` (pen, blur, fold, bubble, dust, …) and ``slide_id`` for image rows.
Folds are grouped by slide: an image row without ``slide_id`` takes its PNG's parent folder name,
which is the slide id for tiles under ``images/<project>/<slide_id>/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytosyn.curation.reread import open_recorded_slide
from cytosyn.errors import one_line
from cytosyn.io.atomic import write_bytes_atomic
from cytosyn.io.hashing import sha256_bytes, sha256_file, tile_id
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides, read_tiles
from cytosyn.slides.synthetic import load_artifact_mask
from cytosyn.tiling.extract import encode_png

LABELS = {"tissue": 0, "artifact": 1}
COORDINATE_COLUMNS = ("slide_id", "x", "y", "mpp")
DEFAULT_SIZE_PX = 224


class AnnotationsError(ValueError):
    """An annotation file that cannot be used at all; the message names the file and the fix."""


@dataclass
class ResolvedAnnotations:
    """Usable annotations (absolute ``image_path``, ``slide_id``, ``label`` 0/1, ``artifact_type``,
    ``image_sha256``) and one message per row that could not be used."""

    table: pd.DataFrame
    errors: list[str] = field(default_factory=list)


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Read and check an annotation file's columns; labels are normalised to lower case."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationsError(f"{path}: no such annotation file; pass an existing CSV or Parquet file")
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in {".parquet", ".pq"} else pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any parser failure means the same thing to the user
        raise AnnotationsError(f"{path}: not a readable CSV/Parquet file ({exc.__class__.__name__}); check its format") from None
    if "label" not in frame:
        raise AnnotationsError(f"{path}: no 'label' column; add one with values tissue/artifact")
    has_images = "image_path" in frame
    has_coords = all(c in frame for c in COORDINATE_COLUMNS)
    if not has_images and not has_coords:
        raise AnnotationsError(f"{path}: needs an 'image_path' column or all of {', '.join(COORDINATE_COLUMNS)}")
    frame = frame.copy()
    frame["label"] = frame["label"].astype(str).str.strip().str.lower()
    if "artifact_type" not in frame:
        frame["artifact_type"] = None
    return frame


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and str(value).strip() != ""


def resolve_annotations(frame: pd.DataFrame, source: str | Path, layout: DatasetLayout | None = None) -> ResolvedAnnotations:
    """Turn annotation rows into PNG paths with slide ids and 0/1 labels.

    Coordinate rows are looked up in the dataset's tile manifest; a tile the dataset never extracted is
    read from its slide into ``curation/annotation_tiles/``. Rows that cannot be used are reported
    (file, row number, reason, fix) and skipped.
    """
    source = Path(source)
    base = layout.root if layout is not None else source.parent
    errors: list[str] = []
    rows: list[dict] = []
    pending: list[dict] = []  # coordinate rows not found among the dataset's tiles
    tiles = _tile_lookup(layout) if layout is not None and all(c in frame for c in COORDINATE_COLUMNS) else {}
    for i, rec in enumerate(frame.to_dict("records")):
        where = f"{source} row {i + 2 if source.suffix.lower() == '.csv' else i}"
        label = LABELS.get(rec["label"])
        if label is None:
            errors.append(f"{where}: label '{rec['label']}' is neither tissue nor artifact; fix the row")
            continue
        out = {"label": label, "artifact_type": str(rec["artifact_type"]) if _present(rec.get("artifact_type")) else None}
        if _present(rec.get("image_path")):
            p = Path(str(rec["image_path"]))
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                errors.append(f"{where}: image {p} does not exist; fix the path (relative paths resolve against {base})")
                continue
            out.update(image_path=str(p), slide_id=str(rec["slide_id"]) if _present(rec.get("slide_id")) else p.parent.name, image_sha256=None)
            rows.append(out)
            continue
        if not all(_present(rec.get(c)) for c in COORDINATE_COLUMNS):
            errors.append(f"{where}: neither image_path nor all of slide_id, x, y, mpp is set; complete the row")
            continue
        if layout is None:
            errors.append(f"{where}: a slide-coordinate annotation needs the dataset; pass DATASET")
            continue
        size = int(rec["size_px"]) if _present(rec.get("size_px")) else DEFAULT_SIZE_PX
        key = (str(rec["slide_id"]), int(rec["x"]), int(rec["y"]), size, round(float(rec["mpp"]), 6))
        out.update(slide_id=key[0])
        hit = tiles.get(key)
        if hit is not None:
            out.update(image_path=str(layout.resolve(hit[0])), image_sha256=hit[1])
            rows.append(out)
        else:
            pending.append({**out, "_key": key, "_where": where})
    if pending:
        rows += _read_from_slides(layout, pending, errors)
    table = pd.DataFrame(rows, columns=["image_path", "slide_id", "label", "artifact_type", "image_sha256"])
    table["label"] = table["label"].astype(np.int64)
    return ResolvedAnnotations(table, errors)


def _tile_lookup(layout: DatasetLayout) -> dict[tuple, tuple[str, str]]:
    tiles = read_tiles(layout, columns=["slide_id", "x", "y", "size_px", "mpp", "image_path", "image_sha256"])
    return {
        (s, int(x), int(y), int(sz), round(float(m), 6)): (p, h)
        for s, x, y, sz, m, p, h in zip(tiles.slide_id, tiles.x, tiles.y, tiles.size_px, tiles.mpp, tiles.image_path, tiles.image_sha256)
    }


def _read_from_slides(layout: DatasetLayout, pending: list[dict], errors: list[str]) -> list[dict]:
    """Read annotated tiles the dataset does not hold from their slides (one open per slide)."""
    slides = read_slides(layout).set_index("slide_id")
    rows = []
    by_slide: dict[str, list[dict]] = {}
    for rec in pending:
        by_slide.setdefault(rec["slide_id"], []).append(rec)
    for slide_id, recs in sorted(by_slide.items()):
        if slide_id not in slides.index:
            errors += [f"{r['_where']}: slide {slide_id} is not in {layout.slides_parquet}; fix the slide_id" for r in recs]
            continue
        try:
            slide = open_recorded_slide(layout, slides.loc[slide_id])
        except Exception as exc:  # noqa: BLE001 - one unreadable slide skips its rows only
            errors += [f"{r['_where']}: cannot open slide {slide_id}: {one_line(exc)}" for r in recs]
            continue
        with slide:
            for r in recs:
                _, x, y, size, mpp = r["_key"]
                target = layout.curation_annotation_tile_path(slide_id, tile_id(slide_id, x, y, size, mpp))
                try:
                    if target.exists():
                        sha = sha256_file(target)
                    else:
                        data = encode_png(slide.read_region_at_mpp(x, y, size, mpp))
                        write_bytes_atomic(target, data)
                        sha = sha256_bytes(data)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{r['_where']}: cannot read the tile from slide {slide_id}: {one_line(exc)}")
                    continue
                rows.append({k: v for k, v in r.items() if not k.startswith("_")} | {"image_path": str(target), "image_sha256": sha})
    return rows


def annotations_from_ground_truth(layout: DatasetLayout, artifact_min_fraction: float) -> pd.DataFrame:
    """Labels for a dataset built from synthetic slides, from their ground-truth artifact masks.

    A tile is ``artifact`` when artifacts cover at least ``artifact_min_fraction`` of its level-0
    footprint (its ``artifact_type`` is the type covering most of it), ``tissue`` when none of it is
    covered, and left out in between: a sliver of pen at a tile's edge is neither a clean example nor
    a convincing artifact. A slide with no ground-truth file has no artifacts (``demo_cohort`` writes
    none for its clean slides). Returns resolved annotations (absolute ``image_path``) plus
    ``tile_id``, ``x``, ``y``, ``artifact_fraction``.
    """
    slides = read_slides(layout)
    slides = slides.loc[slides["status"] == "ok"].set_index("slide_id")
    tiles = read_tiles(layout, columns=["tile_id", "slide_id", "x", "y", "read_size_level0", "image_path", "image_sha256"])
    frames = []
    for slide_id, group in tiles.groupby("slide_id", sort=True):
        if slide_id not in slides.index:
            continue
        path = Path(str(slides.at[slide_id, "path"]))
        mask = load_artifact_mask(path if path.is_absolute() else layout.resolve(str(path)))
        fractions = [
            mask.fraction(int(x), int(y), int(s), int(s)) if mask is not None else {}
            for x, y, s in zip(group["x"], group["y"], group["read_size_level0"])
        ]
        covered = np.array([sum(f.values()) for f in fractions], dtype=np.float64)
        kinds = [max(f, key=f.get) if c > 0 else None for f, c in zip(fractions, covered)]
        frame = pd.DataFrame(
            {
                "image_path": [str(layout.resolve(p)) for p in group["image_path"]],
                "slide_id": slide_id,
                "label": (covered >= artifact_min_fraction).astype(np.int64),
                "artifact_type": [k if c >= artifact_min_fraction else None for k, c in zip(kinds, covered)],
                "image_sha256": group["image_sha256"].to_numpy(),
                "tile_id": group["tile_id"].to_numpy(),
                "x": group["x"].to_numpy(),
                "y": group["y"].to_numpy(),
                "artifact_fraction": covered,
            }
        )
        frames.append(frame.loc[(covered == 0) | (covered >= artifact_min_fraction)])
    columns = ["image_path", "slide_id", "label", "artifact_type", "image_sha256", "tile_id", "x", "y", "artifact_fraction"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
