"""Training shards: the samples of one split, globally shuffled, in Parquet files of ~4,096 samples.

Each shard row holds the tile's PNG file bytes, its CLS (float32) and 14×14 tokens (float16 bytes), and
tile_id, slide_id, project, tss_code. Parquet was chosen by measurement (docs/shards.md): a reader that
does not want tokens skips their bytes entirely (column projection), fixed-size columns decode without
copies, and a shard is one file written atomically.

The sample order is a permutation drawn from (seed, split) over the split's tiles sorted by feature row,
so it does not depend on file order or worker count. Only that permutation (int64) is held in memory: the
split's metadata is streamed once into a memory-mapped scratch file and gathered one shard at a time.
Shard k is complete when its file exists; a rerun writes only the missing ones; several processes may
write disjoint shards (``part``). The index records which features the shards were cut from, and a rerun
against other features is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from cytosyn.config import FeaturesConfig, PipelineConfig, ShardsConfig
from cytosyn.features.store import (
    ClsRows,
    FeatureStore,
    IndexReader,
    features_identity,
    kept_tile_batches,
    update_manifest_digest,
)
from cytosyn.io import schema
from cytosyn.io.atomic import atomic_path, remove_stale_temporaries, temporary_path, write_text_atomic
from cytosyn.io.hashing import sha256_bytes, stable_hash
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides

FORMAT_VERSION = 1
# Small row groups bound a reader's memory (64 × ~350 KB) and make mid-shard resumption cheap.
ROW_GROUP = 64
INDEX_ROW_GROUP = 65536
# Rows per record batch of the scratch file: gathering one shard costs one take per batch, so few large batches.
SCRATCH_BATCH = 131072
_STRINGS = ("tile_id", "slide_id", "project", "tss_code")
# PNG bytes and float16 tokens barely compress with zstd (docs/shards.md): stored plain, read without decoding.
_COMPRESSION = {**{c: "zstd" for c in _STRINGS}, "png": "none", "cls.list.element": "zstd", "tokens": "none"}
# index.parquet's key-value metadata: features_identity() of the store the shards were cut from (JSON).
FEATURES_KEY = b"cytosyn.features"
# The split's rows in feature-row order, as the scratch file holds them.
_SCRATCH = pa.schema(
    [("feature_row", pa.int64()), ("tile_id", pa.string()), ("slide_id", pa.string()), ("image_path", pa.string()), ("image_sha256", pa.string())]
)


class ShardsError(ValueError):
    """Shards that cannot be written or read as asked; the message names the file and the fix."""


@dataclass
class ShardsResult:
    out_dir: Path
    samples: int
    shards: int
    written: int
    skipped: int
    complete: bool
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def write_shards(layout: DatasetLayout, cfg: PipelineConfig, split: str, *, progress: bool = True) -> ShardsResult:
    """The pipeline's shard stage for one split, with the config's ``shards`` and ``features`` sections."""
    scfg = cfg.shards or ShardsConfig()
    extractor = (cfg.features or FeaturesConfig()).extractor
    return build_shards(layout, split, extractor=extractor, shard_size=scfg.shard_size, seed=cfg.seed, progress=progress)


class ShardPlan:
    """Which sample goes where: ``order`` permutes the split's samples (in feature-row order), shard k takes
    positions [starts[k], starts[k+1]) of the permuted sequence. ``members(k)`` gathers shard k's metadata
    from the memory-mapped scratch file, so memory holds the int64 permutation and one shard."""

    def __init__(self, scratch: Path, order: np.ndarray, shard_size: int, slides: pa.Table, features: dict):
        reader = pa.ipc.open_file(pa.memory_map(str(scratch)))
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._batch_starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self.order = order
        self.samples = len(order)
        k = -(-self.samples // shard_size)
        # np.array_split's sizes: the first n mod k shards hold one sample more.
        sizes = [self.samples // k + (1 if i < self.samples % k else 0) for i in range(k)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.slides = slides
        self.features = features

    @property
    def num_shards(self) -> int:
        return len(self.starts) - 1

    def shard_sizes(self) -> list[int]:
        return np.diff(self.starts).tolist()

    def _take(self, rows: np.ndarray) -> pa.Table:
        """Scratch rows ``rows`` in that order, reading each record batch only where a row is taken."""
        by_row = np.argsort(rows, kind="stable")
        wanted = rows[by_row]
        cuts = np.searchsorted(wanted, self._batch_starts)
        parts = [
            self._batches[i].take(pa.array(wanted[cuts[i] : cuts[i + 1]] - self._batch_starts[i]))
            for i in range(len(self._batches))
            if cuts[i] < cuts[i + 1]
        ]
        back = np.empty_like(by_row)
        back[by_row] = np.arange(len(rows))
        return pa.Table.from_batches(parts, schema=_SCRATCH).take(pa.array(back))

    def members(self, k: int) -> pa.Table:
        """Shard k in offset order: SHARDS_INDEX columns + image_path, image_sha256."""
        lo, hi = int(self.starts[k]), int(self.starts[k + 1])
        picked = self._take(self.order[lo:hi])
        at = pc.index_in(picked["slide_id"], value_set=self.slides["slide_id"].combine_chunks())
        columns = {
            "shard": pa.array(np.full(hi - lo, k, np.int32)),
            "offset": pa.array(np.arange(hi - lo, dtype=np.int32)),
            "tile_id": picked["tile_id"],
            "slide_id": picked["slide_id"],
            "project": self.slides["project"].take(at),
            "tss_code": self.slides["tss_code"].take(at),
            "feature_row": picked["feature_row"],
        }
        index = pa.table(columns, schema=schema.SHARDS_INDEX)
        return index.append_column("image_path", picked["image_path"]).append_column("image_sha256", picked["image_sha256"])


def _slides(layout: DatasetLayout) -> pa.Table:
    return pa.Table.from_pandas(
        read_slides(layout)[["slide_id", "project", "tss_code"]],
        schema=pa.schema([(c, pa.string()) for c in ("slide_id", "project", "tss_code")]),
        preserve_index=False,
    )


def _write_scratch(layout: DatasetLayout, split: str, scratch: Path) -> tuple[str, int, int]:
    """Stream the kept tiles into ``scratch`` (the split's rows, _SCRATCH); returns (manifest sha256 as the features
    store computes it, kept tiles, the split's samples)."""
    digest, rows, n = hashlib.sha256(), 0, 0
    pending: list[pa.Table] = []
    with pa.OSFile(str(scratch), "wb") as sink, pa.ipc.new_file(sink, _SCRATCH) as writer:
        # The features' rows are the kept tiles in manifest order: a tile's feature row is its position here.
        for table in kept_tile_batches(layout, ["slide_id", "split"]):
            update_manifest_digest(digest, table)
            mine = pc.fill_null(pc.equal(table["split"], split), False)
            positions = pa.array(np.arange(rows, rows + table.num_rows, dtype=np.int64)).filter(mine)
            rows += table.num_rows
            if not len(positions):
                continue
            picked = table.filter(mine)
            pending.append(pa.table([positions, *(picked[c] for c in _SCRATCH.names[1:])], schema=_SCRATCH))
            n += len(positions)
            if sum(t.num_rows for t in pending) >= SCRATCH_BATCH:
                writer.write_table(pa.concat_tables(pending).combine_chunks())
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending).combine_chunks())
    return digest.hexdigest(), rows, n


@contextlib.contextmanager
def plan_shards(layout: DatasetLayout, split: str, extractor: str, shard_size: int, seed: int) -> Iterator[ShardPlan]:
    """The split's ShardPlan, valid inside the ``with`` block (its scratch file is deleted afterwards).

    Refuses features that are incomplete or were computed from another tile manifest than the current one
    (checked by the manifest hash the features recorded): the shards would pair tiles with wrong features.
    """
    store = FeatureStore(layout, extractor)
    features = features_identity(layout, extractor)
    slides = _slides(layout)
    out = layout.shards_dir(split)
    out.mkdir(parents=True, exist_ok=True)
    scratch = temporary_path(out / "plan.arrow")
    try:
        digest, rows, n = _write_scratch(layout, split, scratch)
        if (digest, rows) != (features["manifest_sha256"], features["rows"]):
            raise ShardsError(
                f"{store.dir}: computed from another tile manifest than the dataset has now (tiles, kept flags, image "
                f"paths or PNG hashes changed since); delete {store.dir}, rerun `cytosyn data features`, then `cytosyn data shards`"
            )
        if n == 0:
            raise ShardsError(f"{layout.tiles_dir}: no kept tile has split '{split}'; nothing to shard (check the split name)")
        order = np.random.default_rng([int(seed), stable_hash("shards", split)]).permutation(n)
        yield ShardPlan(scratch, order, shard_size, slides, features)
    finally:
        scratch.unlink(missing_ok=True)


def _refuse_rerun(layout: DatasetLayout, split: str, why: str) -> ShardsError:
    out = layout.shards_dir(split)
    return ShardsError(f"{out}: {why}; delete {out} and rerun `cytosyn data shards`")


def _check_or_write_index(layout: DatasetLayout, split: str, plan: ShardPlan) -> None:
    """Write index.parquet, or check that the existing one describes this plan and these features."""
    target = layout.shards_index_path(split)
    if not target.exists():
        if any(layout.shards_dir(split).glob("shard-*.parquet")):
            raise _refuse_rerun(layout, split, "shard files without an index.parquet: their features and plan are unknown")
        with atomic_path(target) as tmp:
            with pq.ParquetWriter(tmp, schema.SHARDS_INDEX, compression="zstd", write_statistics=True, store_schema=False) as writer:
                pending: list[pa.Table] = []
                for k in range(plan.num_shards):
                    pending.append(plan.members(k).select(schema.SHARDS_INDEX.names))
                    if k == plan.num_shards - 1 or sum(t.num_rows for t in pending) >= INDEX_ROW_GROUP:
                        # Row groups of whole shards: a shard's rows are read back from at most one row group.
                        block = pa.concat_tables(pending)
                        writer.write_table(block, row_group_size=block.num_rows)
                        pending = []
                writer.add_key_value_metadata({FEATURES_KEY: json.dumps(plan.features, sort_keys=True).encode("utf-8")})
        return
    existing = IndexReader(target)
    recorded_then = (existing.file.schema_arrow.metadata or {}).get(FEATURES_KEY)
    if recorded_then is None:
        raise _refuse_rerun(layout, split, "index.parquet does not record which features the shards were cut from")
    theirs = json.loads(recorded_then)
    if theirs != plan.features:
        diff = sorted(k for k in plan.features if theirs.get(k) != plan.features[k])
        raise _refuse_rerun(layout, split, f"cut from features with other {', '.join(diff)} than features/{plan.features['extractor']} holds now")
    same = existing.file.metadata.num_rows == plan.samples and all(
        existing.rows(int(plan.starts[k]), int(plan.starts[k + 1])).equals(plan.members(k).select(schema.SHARDS_INDEX.names))
        for k in range(plan.num_shards)
    )
    if not same:
        raise _refuse_rerun(layout, split, "the shards were planned from other tiles, seed or shard size than asked now")


class _TokenRows:
    """Scattered rows of the token array, read as few contiguous runs as the rows allow."""

    def __init__(self, store: FeatureStore):
        self.array = zarr.open_array(str(store.tokens_path), mode="r")

    def take(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = np.empty((len(rows), *self.array.shape[1:]), np.float16)
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        for run_positions in np.split(np.arange(len(rows)), breaks):
            if len(run_positions):
                a = int(sorted_rows[run_positions[0]])
                out[order[run_positions]] = self.array[a : a + len(run_positions)]
        return out


def _write_shard(layout: DatasetLayout, split: str, shard: int, members: pa.Table, cls_rows: ClsRows, tokens: _TokenRows) -> None:
    pngs = []
    for relpath, expected in zip(members["image_path"].to_pylist(), members["image_sha256"].to_pylist()):
        path = layout.resolve(relpath)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ShardsError(f"{path}: cannot read the tile PNG ({exc.strerror}); rerun `cytosyn data build` to restore it") from None
        if expected and sha256_bytes(data) != expected:
            raise ShardsError(
                f"{path}: PNG differs from the tile manifest's image_sha256; rerun `cytosyn data build`, then delete the "
                f"features and shards of this dataset and recompute them"
            )
        pngs.append(data)
    feature_rows = members["feature_row"].to_numpy()
    cls = cls_rows.take(feature_rows)
    tok = tokens.take(feature_rows)
    grid, dim = tok.shape[1], tok.shape[-1]
    shard_schema = schema.shard_schema(cls.shape[1], grid, dim)
    table = pa.table(
        [
            *(members[c] for c in _STRINGS),
            pa.array(pngs, pa.binary()),
            pa.FixedSizeListArray.from_arrays(pa.array(cls.reshape(-1)), cls.shape[1]),
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(tok[0].nbytes), len(tok), [None, pa.py_buffer(tok.tobytes())]),
        ],
        schema=shard_schema,
    )
    with atomic_path(layout.shard_path(split, shard)) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=ROW_GROUP,
            compression=_COMPRESSION,
            use_dictionary=list(_STRINGS),
            write_statistics=list(_STRINGS),
        )


def _manifest(layout: DatasetLayout, split: str, plan: ShardPlan, shard_size: int, seed: int, dims: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "seed": int(seed),
        "shard_size": int(shard_size),
        "extractor": plan.features["extractor"],
        "features_manifest_sha256": plan.features["manifest_sha256"],
        "features_weights_sha256": plan.features["weights_sha256"],
        "features_compute_dtype": plan.features["compute_dtype"],
        "num_samples": plan.samples,
        "row_group_size": ROW_GROUP,
        **dims,
        "shards": [{"file": layout.shard_path(split, k).name, "num_samples": c} for k, c in enumerate(plan.shard_sizes())],
    }


def build_shards(
    layout: DatasetLayout,
    split: str,
    *,
    extractor: str = "h0-mini",
    shard_size: int = 4096,
    seed: int = 0,
    part: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> ShardsResult:
    """Write ``shards/<split>/`` (docs/shards.md); ``shards.json`` appears once every shard exists."""
    index_of, parts = part
    if not 0 <= index_of < parts:
        raise ValueError(f"part {index_of}/{parts}: need 0 ≤ i < n")
    out = layout.shards_dir(split)
    if parts == 1:
        # Only a lone writer may: the temporaries of concurrent ones look the same.
        remove_stale_temporaries(out)
    with plan_shards(layout, split, extractor, shard_size, seed) as plan:
        _check_or_write_index(layout, split, plan)
        mine = [k for k in range(plan.num_shards) if k % parts == index_of]
        todo = [k for k in mine if not layout.shard_path(split, k).exists()]
        result = ShardsResult(out, plan.samples, plan.num_shards, 0, len(mine) - len(todo), False)
        store = FeatureStore(layout, extractor)
        cls_rows = ClsRows(store)
        tokens = _TokenRows(store)
        for k in tqdm(todo, unit="shard", desc=f"shards {split}", disable=not progress):
            try:
                _write_shard(layout, split, k, plan.members(k), cls_rows, tokens)
                result.written += 1
            except ShardsError as exc:
                result.errors.append(str(exc))
        if all(layout.shard_path(split, k).exists() for k in range(plan.num_shards)):
            dims = {"cls_dim": cls_rows.shape[1], "token_shape": list(tokens.array.shape[1:]), "token_dtype": "float16"}
            write_text_atomic(layout.shards_manifest_path(split), json.dumps(_manifest(layout, split, plan, shard_size, seed, dims), indent=1) + "\n")
            result.complete = True
    return result


def read_shards_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / "shards.json"
    if not path.exists():
        raise ShardsError(f"{path}: no shard manifest; run `cytosyn data shards DATASET --split {Path(shards_dir).name}` to finish the shards")
    return json.loads(path.read_text())
