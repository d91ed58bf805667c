"""Reading the manifests of a dataset root. Per-slide Parquet files are read as one dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.layout import DatasetLayout


def read_slides(layout: DatasetLayout) -> pd.DataFrame:
    if not layout.slides_parquet.exists():
        raise FileNotFoundError(
            f"{layout.slides_parquet}: no slide inventory; run `cytosyn data build` on this dataset first"
        )
    return pd.read_parquet(layout.slides_parquet)


def _per_slide_files(folder: Path) -> list[str]:
    # Sorted so that concatenation order (and thus any derived output) never depends on the file system.
    return sorted(str(p) for p in folder.glob("*.parquet")) if folder.exists() else []


def _read_folder(folder: Path, empty_schema: pa.Schema, columns: list[str] | None) -> pd.DataFrame:
    files = _per_slide_files(folder)
    if not files:
        return empty_schema.empty_table().to_pandas() if columns is None else empty_schema.empty_table().select(columns).to_pandas()
    table = ds.dataset(files, format="parquet").to_table(columns=columns)
    return table.to_pandas()


def read_selection(layout: DatasetLayout, columns: list[str] | None = None) -> pd.DataFrame:
    return _read_folder(layout.selection_dir, schema.SELECTION, columns)


def read_tiles(layout: DatasetLayout, columns: list[str] | None = None) -> pd.DataFrame:
    """All tiles of the dataset, ordered by file (slide id) then row; small and medium datasets."""
    return _read_folder(layout.tiles_dir, schema.TILES, columns)


def iter_kept_tiles(layout: DatasetLayout, columns: list[str], split: str | None = None) -> Iterator[pa.Table]:
    """The tile manifest in file order, streamed, without the tiles curation set ``kept=False`` (a null
    counts as kept), and only ``split``'s tiles when one is given. Raises when there is no manifest."""
    files = _per_slide_files(layout.tiles_dir)
    if not files:
        raise FileNotFoundError(f"{layout.tiles_dir}: no tile manifests; run `cytosyn data build` on this dataset first")
    names = set(pq.read_schema(files[0]).names)
    filters = [c for c in ("kept", "split") if c in names and (c == "kept" or split is not None)]
    for batch in ds.dataset(files, format="parquet").to_batches(columns=list(dict.fromkeys(columns + filters))):
        table = pa.Table.from_batches([batch])
        if "kept" in filters:
            table = table.filter(pc.fill_null(table["kept"], True))
        if split is not None:
            table = table.filter(pc.fill_null(pc.equal(table["split"], split), False))
        if table.num_rows:
            yield table.select(columns)


def write_slide_selection(layout: DatasetLayout, slide_id: str, selection: pa.Table | pd.DataFrame) -> bool:
    """Write one slide's selection (cast to the SELECTION schema); returns whether it changed.

    A changed selection invalidates the slide's tile manifest, so the extraction stage redoes that
    slide (PNGs already on disk with the same tile_id are reused, not rewritten).
    """
    changed = write_parquet_atomic(layout.selection_path(slide_id), selection, schema.SELECTION)
    if changed:
        layout.tiles_path(slide_id).unlink(missing_ok=True)
    return changed


def topup_tile_ids(layout: DatasetLayout) -> set[str]:
    """Tiles that curation drew as replacements (top-up): they are not part of the cohort's selection."""
    ids: set[str] = set()
    for path in sorted((layout.curation_dir / "predictions").glob("*.parquet")):
        preds = pd.read_parquet(path, columns=["tile_id", "topup"])
        ids.update(preds.loc[preds["topup"], "tile_id"])
    return ids
