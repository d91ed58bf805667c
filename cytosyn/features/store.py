"""The on-disk feature store of one extractor: layout, planning, chunk writes and final assembly.

``features/<extractor>/`` holds

- ``tokens.index.parquet`` (row, tile_id, image_path): every kept tile of the manifest, in manifest order;
  row ``i`` of every other file belongs to the tile of index row ``i``;
- ``tokens.zarr``: (N, 14, 14, D) float16, stored as one Zarr shard file per ``chunk_rows`` rows holding
  one compressed inner chunk per tile, so a single tile is read without decoding its neighbours;
  its attributes record what produced it (backbone, weights hash, manifest hash);
- ``cls/chunk-NNNNNNN.npy``: (rows of the chunk, D) float32, the CLS tokens of one chunk, written after the
  chunk's token shard: a chunk counts as done only once this file exists;
- ``cls.parquet`` (tile_id, cls): assembled from the chunk files once every chunk is done; its presence means
  the store is complete.

Every file a chunk writes (its Zarr shard, its CLS file) belongs to that chunk alone, so any number of
processes, on one host or several sharing the dataset root, may fill disjoint chunks at once, and a killed
writer costs only the chunks whose CLS file is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from cytosyn.io import schema
from cytosyn.io.atomic import atomic_path, temporary_path
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import iter_kept_tiles

# 2: CLS in per-chunk files (1 had one shared cls.npy and done/ markers).
FORMAT_VERSION = 2
# Chosen by measurement (docs/features.md) for bytes per tile, the cost that scales to terabytes: the fewest of
# the candidates. It is the slowest to write and reads no faster than the other compressed codecs.
TOKENS_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
INDEX_ROW_GROUP_TARGET = 65536
CLS_ROW_GROUP = 65536
# The manifest columns the features depend on; their rows are hashed into manifest_sha256.
MANIFEST_COLUMNS = ("tile_id", "image_path", "image_sha256")
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
    def cls_dir(self) -> Path:
        return self.dir / "cls"

    def cls_chunk_path(self, chunk: int) -> Path:
        return self.cls_dir / f"chunk-{chunk:07d}.npy"

    @property
    def complete(self) -> bool:
        return self.cls_path.exists()


# --------------------------------------------------------------------------- manifest → index


def kept_tile_batches(layout: DatasetLayout, extra_columns: Sequence[str] = ()) -> Iterator[pa.Table]:
    """The kept tiles of the manifest in order (the rows features are computed for): MANIFEST_COLUMNS + extra."""
    try:
        yield from iter_kept_tiles(layout, [*MANIFEST_COLUMNS, *extra_columns])
    except FileNotFoundError as exc:
        raise FeaturesError(str(exc)) from None


def update_manifest_digest(digest: hashlib._Hash, table: pa.Table) -> None:
    """Add the rows of ``table`` (MANIFEST_COLUMNS) to the hash recorded as the store's manifest_sha256."""
    sha = pc.fill_null(table["image_sha256"], "")
    line = pc.binary_join_element_wise(table["tile_id"], table["image_path"], sha, "\t")
    digest.update(("\n".join(line.to_pylist()) + "\n").encode("utf-8"))


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
            update_manifest_digest(digest, table)
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
    """Rows [a, b) of an index file, reading one row group at a time (bounded memory on 40M-row indexes)."""

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
        return pa.concat_tables(parts) if parts else self.file.schema_arrow.empty_table()


# --------------------------------------------------------------------------- plan


def _create_tokens(path: Path, rows: int, grid: int, dim: int, chunk_rows: int, attributes: dict) -> None:
    """Create the Zarr array's metadata under a temporary name, then rename: readers never see half of it."""
    tmp = temporary_path(path)
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
            # Another writer created it first (renaming onto a non-empty folder fails); the caller checks it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _identity(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in IDENTITY_KEYS}


def _tokens_attrs(store: FeatureStore) -> dict:
    return dict(zarr.open_array(str(store.tokens_path), mode="r").attrs)


def plan_store(store: FeatureStore, provenance: dict, chunk_rows: int) -> int:
    """Write the index and create the token array, or check that an existing one was made from the same inputs.

    ``provenance`` describes the extractor (see ``extract.provenance``); the manifest hash, row count and
    chunking are added here. Returns the number of rows.
    """
    store.dir.mkdir(parents=True, exist_ok=True)
    # The new index replaces the old one only once it is known to describe the same rows.
    with atomic_path(store.index_path) as tmp:
        rows, manifest_sha = write_index(store.layout, tmp, chunk_rows)
        attrs = {**provenance, "format": FORMAT_VERSION, "manifest_sha256": manifest_sha, "rows": rows, "chunk_rows": chunk_rows}
        if not store.tokens_path.exists():
            _create_tokens(store.tokens_path, rows, provenance["token_grid"], provenance["embed_dim"], chunk_rows, attrs)
        # Checked even after creating it: a writer started at the same time may have won the race.
        existing = _tokens_attrs(store)
        if _identity(existing) != _identity(attrs):
            diff = sorted(k for k in IDENTITY_KEYS if existing.get(k) != attrs.get(k))
            why = (f"store format {existing.get('format')}, this version reads format {FORMAT_VERSION}" if diff == ["format"]
                   else f"computed with different {', '.join(diff)} than asked now (tile manifest, weights or settings changed)")
            raise FeaturesError(f"{store.dir}: {why}; delete {store.dir} and rerun `cytosyn data features`")
    return rows


def chunk_bounds(chunk: int, chunk_rows: int, rows: int) -> tuple[int, int]:
    return chunk * chunk_rows, min(rows, (chunk + 1) * chunk_rows)


def num_chunks(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)


# --------------------------------------------------------------------------- writes


class ChunkWriter:
    """Writes finished chunks: the chunk's token shard, then its CLS file (which marks it done)."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.tokens = zarr.open_array(str(store.tokens_path), mode="r+")
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
        with atomic_path(self.store.cls_chunk_path(chunk)) as tmp, open(tmp, "wb") as fh:
            # To an open file: np.save on a path would append ".npy" to the temporary name.
            np.save(fh, np.ascontiguousarray(cls, dtype=np.float32))


def done_chunks(store: FeatureStore) -> set[int]:
    if not store.cls_dir.exists():
        return set()
    return {int(p.stem.split("-")[1]) for p in store.cls_dir.glob("chunk-*.npy")}


class ClsRows:
    """The CLS matrix of a store, read by row from its per-chunk files without loading it all."""

    def __init__(self, store: FeatureStore):
        attrs = _tokens_attrs(store)
        self.store = store
        self.shape = (int(attrs["rows"]), int(attrs["embed_dim"]))
        self.chunk_rows = int(attrs["chunk_rows"])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32: the CLS of ``rows`` (any order, repeats allowed), one file open per chunk hit."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        chunks = rows // self.chunk_rows
        order = np.argsort(chunks, kind="stable")
        hit, first = np.unique(chunks[order], return_index=True)
        for c, lo, hi in zip(hit.tolist(), first.tolist(), [*first[1:].tolist(), len(rows)]):
            at = order[lo:hi]
            out[at] = np.load(self.store.cls_chunk_path(c), mmap_mode="r")[rows[at] - c * self.chunk_rows]
        return out


def finalize(store: FeatureStore) -> bool:
    """Write cls.parquet once every chunk is done; returns whether the store is complete.

    Safe to call from several processes: each writes identical bytes and renames atomically.
    """
    if store.complete:
        return True
    cls = ClsRows(store)
    rows, dim = cls.shape
    if len(done_chunks(store)) < num_chunks(rows, cls.chunk_rows):
        return False
    index = IndexReader(store.index_path)
    cls_schema = schema.features_cls_schema(dim)
    with atomic_path(store.cls_path) as tmp:
        with pq.ParquetWriter(tmp, cls_schema, compression="zstd", write_statistics=["tile_id"]) as writer:
            for a in range(0, rows, CLS_ROW_GROUP):
                b = min(rows, a + CLS_ROW_GROUP)
                values = pa.array(cls.take(np.arange(a, b)).reshape(-1))
                block = pa.table([index.rows(a, b)["tile_id"], pa.FixedSizeListArray.from_arrays(values, dim)], schema=cls_schema)
                writer.write_table(block, row_group_size=CLS_ROW_GROUP)
    return True


# --------------------------------------------------------------------------- reads


def _require_complete(store: FeatureStore) -> None:
    if not store.complete:
        raise FeaturesError(
            f"{store.dir}: features are missing or incomplete; run `cytosyn data features {store.layout.root} "
            f"--extractor {store.extractor}` first"
        )
    found = _tokens_attrs(store).get("format")
    if found != FORMAT_VERSION:
        raise FeaturesError(
            f"{store.dir}: store format {found}, this version reads format {FORMAT_VERSION}; delete {store.dir} and "
            f"rerun `cytosyn data features`"
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


def open_cls_rows(layout: DatasetLayout, extractor: str = "h0-mini") -> ClsRows:
    """The CLS matrix for reading scattered rows (``.take(rows)``) without loading it all."""
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    return ClsRows(store)


def features_identity(layout: DatasetLayout, extractor: str = "h0-mini") -> dict:
    """What a complete store's features are a function of (manifest, weights, compute dtype, settings).

    Whoever copies the features elsewhere (the shard writer) records it, to notice features recomputed since.
    """
    store = FeatureStore(layout, extractor)
    _require_complete(store)
    return _identity(_tokens_attrs(store))
