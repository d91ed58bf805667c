"""The on-disk feature store of one extractor: layout, planning, chunk writes and final assembly.

``features/<extractor>/`` holds

- ``tokens.index.parquet`` (row, tile_id, image_path): every kept tile of the manifest, in manifest order;
  row ``i`` of every other file belongs to the tile of index row ``i``;
- ``tokens.zarr``: (N, 14, 14, D) float16, stored as one Zarr shard file per ``chunk_rows`` rows holding
  one compressed inner chunk per tile, so a single tile is read without decoding its neighbours;
  its attributes record what produced it (backbone, weights hash, manifest hash);
- ``cls.npy``: (N, D) float32, the CLS tokens in row order, for random access by row;
- ``done/chunk-NNNNNNN``: an empty marker per finished chunk — a chunk counts only once its marker exists;
- ``cls.parquet`` (tile_id, cls): written once every chunk is done; its presence means the store is complete.

A chunk's rows are written to disjoint files/byte ranges (its own Zarr shard, its own rows of ``cls.npy``)
before its marker is renamed into place, so any number of processes may fill disjoint chunks at once and a
killed writer costs only the chunks without markers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from cytosyn.io import schema
from cytosyn.io.atomic import TMP_PREFIX, atomic_path, write_bytes_atomic
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import iter_kept_tiles

FORMAT_VERSION = 1
# Chosen by measurement (docs/features.md): byte-shuffled zstd gave the fewest bytes per tile with read
# speed equal to or better than the faster-to-write codecs.
TOKENS_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
INDEX_ROW_GROUP_TARGET = 65536
CLS_ROW_GROUP = 65536
# Attributes that must match for a rerun to reuse existing chunks (the weights' path may move).
IDENTITY_KEYS = (
    "format",
    "extractor",
    "timm_name",
    "timm_overrides",
    "weights_sha256",
    "compute_dtype",
    "num_prefix_tokens",
    "source_grid",
    "token_grid",
    "embed_dim",
    "interpolation",
    "manifest_sha256",
    "rows",
    "chunk_rows",
)


class FeaturesError(ValueError):
    """Features that cannot be computed or read as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class FeatureStore:
    layout: DatasetLayout
    extractor: str

    @property
    def dir(self) -> Path:
        return self.layout.features_dir(self.extractor)

    @property
    def index_path(self) -> Path:
        return self.layout.features_index_path(self.extractor)

    @property
    def tokens_path(self) -> Path:
        return self.layout.features_tokens_path(self.extractor)

    @property
    def cls_path(self) -> Path:
        return self.layout.features_cls_path(self.extractor)

    @property
    def cls_npy_path(self) -> Path:
        return self.layout.features_cls_npy_path(self.extractor)

    @property
    def done_dir(self) -> Path:
        return self.dir / "done"

    def marker(self, chunk: int) -> Path:
        return self.done_dir / f"chunk-{chunk:07d}"

    @property
    def complete(self) -> bool:
        return self.cls_path.exists()


# --------------------------------------------------------------------------- manifest → index


def kept_tile_batches(layout: DatasetLayout) -> Iterator[pa.Table]:
    """The kept tiles of the manifest in order (the rows features are computed for)."""
    try:
        yield from iter_kept_tiles(layout, ["tile_id", "image_path", "image_sha256"])
    except FileNotFoundError as exc:
        raise FeaturesError(str(exc)) from None


def _index_row_group(chunk_rows: int) -> int:
    # Index row groups hold whole chunks, so the rows of one chunk are read from one row group.
    return max(1, INDEX_ROW_GROUP_TARGET // chunk_rows) * chunk_rows


def write_index(layout: DatasetLayout, target: Path, chunk_rows: int) -> tuple[int, str]:
    """Stream the manifest into the index file ``target``; returns (rows, sha256 of the manifest rows used)."""
    digest = hashlib.sha256()
    group = _index_row_group(chunk_rows)
    n = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(target, schema.FEATURES_INDEX, compression="zstd", write_statistics=True, store_schema=False) as writer:
        for table in kept_tile_batches(layout):
            sha = pc.fill_null(table["image_sha256"], "")
            line = pc.binary_join_element_wise(table["tile_id"], table["image_path"], sha, "\t")
            digest.update(("\n".join(line.to_pylist()) + "\n").encode("utf-8"))
            rows = pa.array(np.arange(n, n + table.num_rows, dtype=np.int64))
            pending.append(pa.table([rows, table["tile_id"], table["image_path"]], schema=schema.FEATURES_INDEX))
            pending_rows += table.num_rows
            n += table.num_rows
            while pending_rows >= group:
                merged = pa.concat_tables(pending)
                writer.write_table(merged.slice(0, group), row_group_size=group)
                rest = merged.slice(group)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=group)
    return n, digest.hexdigest()


class IndexReader:
    """Rows [a, b) of the index, reading one row group at a time (bounded memory on 40M-row indexes)."""

    def __init__(self, path: Path):
        self.file = pq.ParquetFile(path)
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, pa.Table] | None = None

    def _group(self, g: int) -> pa.Table:
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self.file.read_row_group(g))
        return self._cached[1]

    def rows(self, a: int, b: int) -> pa.Table:
        parts = []
        g = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            table = self._group(g)
            lo = a - int(self.starts[g])
            take = min(b, int(self.starts[g + 1])) - a
            parts.append(table.slice(lo, take))
            a += take
            g += 1
        return pa.concat_tables(parts) if parts else schema.FEATURES_INDEX.empty_table()


# --------------------------------------------------------------------------- plan


def _create_tokens(path: Path, rows: int, grid: int, dim: int, chunk_rows: int, attributes: dict) -> None:
    """Create the Zarr array's metadata under a temporary name, then rename: readers never see half of it."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}"
    try:
        zarr.create_array(
            store=str(tmp),
            shape=(rows, grid, grid, dim),
            chunks=(1, grid, grid, dim),
            shards=(chunk_rows, grid, grid, dim),
            dtype="float16",
            compressors=[TOKENS_CODEC],
            fill_value=0,
            attributes=attributes,
        )
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            # Another writer created it first; its metadata is validated by the caller.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create_cls_npy(path: Path, rows: int, dim: int) -> None:
    with atomic_path(path) as tmp:
        if rows:
            # A sparse file: untouched rows take no disk space until a chunk writes them.
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim)).flush()
        else:
            with open(tmp, "wb") as fh:  # np.save on a path would append ".npy" to the temporary name
                np.save(fh, np.zeros((0, dim), dtype=np.float32))


def _identity(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in IDENTITY_KEYS}


def plan_store(store: FeatureStore, provenance: dict, chunk_rows: int) -> int:
    """Write the index and create the arrays, or check that existing ones were made from the same inputs.

    ``provenance`` describes the extractor (see ``extract.provenance``); the manifest hash, row count and
    chunking are added here. Returns the number of rows.
    """
    store.dir.mkdir(parents=True, exist_ok=True)
    # The new index replaces the old one only once it is known to describe the same rows.
    with atomic_path(store.index_path) as tmp:
        rows, manifest_sha = write_index(store.layout, tmp, chunk_rows)
        attrs = {**provenance, "format": FORMAT_VERSION, "manifest_sha256": manifest_sha, "rows": rows, "chunk_rows": chunk_rows}
        if store.tokens_path.exists():
            existing = dict(zarr.open_array(str(store.tokens_path), mode="r").attrs)
            if _identity(existing) != _identity(attrs):
                diff = sorted(k for k in IDENTITY_KEYS if existing.get(k) != attrs.get(k))
                raise FeaturesError(
                    f"{store.dir}: computed with different {', '.join(diff)} than asked now "
                    f"(tile manifest, weights or settings changed); delete {store.dir} and rerun `cytosyn data features`"
                )
    shape = (rows, provenance["embed_dim"])
    if not store.cls_npy_path.exists() or np.load(store.cls_npy_path, mmap_mode="r").shape != shape:
        # Absent, or left with another shape by a plan that was killed before tokens.zarr existed.
        _create_cls_npy(store.cls_npy_path, *shape)
    if not store.tokens_path.exists():
        _create_tokens(store.tokens_path, rows, provenance["token_grid"], provenance["embed_dim"], chunk_rows, attrs)
    return rows


def chunk_bounds(chunk: int, chunk_rows: int, rows: int) -> tuple[int, int]:
    return chunk * chunk_rows, min(rows, (chunk + 1) * chunk_rows)


def num_chunks(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)


# --------------------------------------------------------------------------- writes


class ChunkWriter:
    """Writes finished chunks: tokens shard, CLS rows, then the marker (in that order)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.tokens = zarr.open_array(str(store.tokens_path), mode="r+")
        self.cls = np.load(store.cls_npy_path, mmap_mode="r+")
        self.chunk_rows = int(self.tokens.attrs["chunk_rows"])

    def write(self, chunk: int, cls: np.ndarray, tokens: np.ndarray) -> None:
        a, b = chunk_bounds(chunk, self.chunk_rows, self.tokens.shape[0])
        if cls.shape[0] != b - a or tokens.shape[0] != b - a:
            raise ValueError(f"chunk {chunk} holds rows {a}–{b}, got {cls.shape[0]} CLS and {tokens.shape[0]} token rows")
        # Zarr reads an existing shard file even when every row is overwritten, and a killed writer may have
        # left a torn one: remove it so the chunk is written from scratch without reading anything.
        shard_file = self.store.tokens_path / self.tokens.metadata.encode_chunk_key((chunk, 0, 0, 0))
        shard_file.unlink(missing_ok=True)
        self.tokens[a:b] = tokens.astype(np.float16, copy=False)
        self.cls[a:b] = cls
        self.cls.flush()
        write_bytes_atomic(self.store.marker(chunk), b"")


def done_chunks(store: FeatureStore) -> set[int]:
    if not store.done_dir.exists():
        return set()
    return {int(p.name.split("-")[1]) for p in store.done_dir.glob("chunk-*")}


def finalize(store: FeatureStore) -> bool:
    """Write cls.parquet once every chunk has its marker; returns whether the store is complete.

    Safe to call from several processes: each writes identical bytes and renames atomically.
    """
    if store.complete:
        return True
    tokens = zarr.open_array(str(store.tokens_path), mode="r")
    rows, dim, chunk_rows = tokens.shape[0], tokens.shape[-1], int(tokens.attrs["chunk_rows"])
    if len(done_chunks(store)) < num_chunks(rows, chunk_rows):
        return False
    index = IndexReader(store.index_path)
    cls = np.load(store.cls_npy_path, mmap_mode="r")
    cls_schema = schema.features_cls_schema(dim)
    with atomic_path(store.cls_path) as tmp:
        with pq.ParquetWriter(tmp, cls_schema, compression="zstd", write_statistics=["tile_id"]) as writer:
            for a in range(0, rows, CLS_ROW_GROUP):
                b = min(rows, a + CLS_ROW_GROUP)
                values = pa.array(np.ascontiguousarray(cls[a:b]).reshape(-1))
                block = pa.table([index.rows(a, b)["tile_id"], pa.FixedSizeListArray.from_arrays(values, dim)], schema=cls_schema)
                writer.write_table(block, row_group_size=CLS_ROW_GROUP)
    return True


def remove_stale(store: FeatureStore) -> None:
    """Delete what a killed single writer left: temporary files and half-created arrays."""
    if not store.dir.exists():
        return
    for p in store.dir.rglob(TMP_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reads


def _require_complete(store: FeatureStore) -> None:
    if not store.complete:
        raise FeaturesError(
            f"{store.dir}: features are missing or incomplete; run `cytosyn data features {store.layout.root} "
            f"--extractor {store.extractor}` first"
        )


def open_tokens(layout: DatasetLayout, extractor: str = "h0-mini") -> zarr.Array:
    """The (N, 14, 14, D) float16 token array, read-only; row order is that of ``read_index``."""
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    return zarr.open_array(str(store.tokens_path), mode="r")


def read_index(layout: DatasetLayout, extractor: str = "h0-mini") -> pa.Table:
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    return pq.read_table(store.index_path)


def read_cls(layout: DatasetLayout, extractor: str = "h0-mini") -> tuple[list[str], np.ndarray]:
    """(tile ids, (N, D) float32 CLS matrix) in token row order."""
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    table = pq.read_table(store.cls_path)
    column = table["cls"].combine_chunks()
    return table["tile_id"].to_pylist(), column.values.to_numpy().reshape(len(column), column.type.list_size)


def open_cls_rows(layout: DatasetLayout, extractor: str = "h0-mini") -> np.ndarray:
    """The CLS matrix as a read-only memory map, for reading scattered rows without loading it all."""
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    return np.load(store.cls_npy_path, mmap_mode="r")
