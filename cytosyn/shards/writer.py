"""Training shards: the samples of one split, globally shuffled, in Parquet files of ~4,096 samples.

Each shard row holds the tile's PNG file bytes, its CLS (float32) and 14×14 tokens (float16 bytes), and
tile_id, slide_id, project, tss_code. Parquet was chosen by measurement (docs/shards.md): a reader that
does not want tokens skips their bytes entirely (column projection), fixed-size columns decode without
copies, and a shard is one file written atomically.

The sample order is a permutation drawn from (seed, split) over the split's tiles sorted by feature row,
so it does not depend on file order or worker count. Shard k is complete when its file exists; a rerun
writes only the missing ones; several processes may write disjoint shards (``part``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from cytosyn.config import FeaturesConfig, PipelineConfig, ShardsConfig
from cytosyn.features.store import FeatureStore
from cytosyn.io import schema
from cytosyn.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from cytosyn.io.hashing import sha256_bytes, stable_hash
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import iter_kept_tiles, read_slides

FORMAT_VERSION = 1
# Small row groups bound a reader's memory (64 × ~350 KB) and make mid-shard resumption cheap.
ROW_GROUP = 64
_STRINGS = ("tile_id", "slide_id", "project", "tss_code")
# PNG bytes and float16 tokens barely compress with zstd (docs/shards.md): stored plain, read without decoding.
_COMPRESSION = {**{c: "zstd" for c in _STRINGS}, "png": "none", "cls.list.element": "zstd", "tokens": "none"}


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


def _split_tiles(layout: DatasetLayout, split: str) -> pa.Table:
    columns = ["tile_id", "slide_id", "image_path", "image_sha256"]
    try:
        parts = list(iter_kept_tiles(layout, columns, split))
    except FileNotFoundError as exc:
        raise ShardsError(str(exc)) from None
    return pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in columns})


def plan_shards(layout: DatasetLayout, split: str, extractor: str, shard_size: int, seed: int) -> pa.Table:
    """Every sample of the split with its shard and offset: SHARDS_INDEX columns + image_path, image_sha256."""
    store = FeatureStore(layout, extractor)
    if not store.complete:
        raise ShardsError(
            f"{store.dir}: features are missing or incomplete; run `cytosyn data features {layout.root} --extractor {extractor}` first"
        )
    tiles = _split_tiles(layout, split)
    if tiles.num_rows == 0:
        raise ShardsError(f"{layout.tiles_dir}: no kept tile has split '{split}'; nothing to shard (check the split name)")
    index = pq.read_table(store.index_path, columns=["tile_id", "row"]).rename_columns(["tile_id", "feature_row"])
    tiles = tiles.join(index, "tile_id", join_type="left outer")
    missing = pc.sum(pc.is_null(tiles["feature_row"])).as_py() or 0
    if missing:
        first = tiles.filter(pc.is_null(tiles["feature_row"]))["tile_id"][0].as_py()
        raise ShardsError(
            f"{store.dir}: {missing} tile(s) of split '{split}' have no features (first: {first}); the tile manifest changed "
            f"after features were computed: delete {store.dir} and rerun `cytosyn data features`"
        )
    slides = pa.Table.from_pandas(
        read_slides(layout)[["slide_id", "project", "tss_code"]],
        schema=pa.schema([(c, pa.string()) for c in ("slide_id", "project", "tss_code")]),
        preserve_index=False,
    )
    tiles = tiles.join(slides, "slide_id", join_type="left outer")
    # Joins do not keep row order: sort by feature row, the manifest's order, before drawing the permutation.
    tiles = tiles.sort_by("feature_row")
    n = tiles.num_rows
    order = np.random.default_rng([int(seed), stable_hash("shards", split)]).permutation(n)
    shards = np.empty(n, np.int32)
    offsets = np.empty(n, np.int32)
    for k, members in enumerate(np.array_split(np.arange(n), -(-n // shard_size))):
        shards[members] = k
        offsets[members] = np.arange(len(members))
    shuffled = tiles.take(pa.array(order))
    columns = {
        "shard": pa.array(shards),
        "offset": pa.array(offsets),
        **{c: shuffled[c].cast(pa.string()) for c in _STRINGS},
        "feature_row": shuffled["feature_row"].cast(pa.int64()),
    }
    plan = pa.table(columns, schema=schema.SHARDS_INDEX)
    return plan.append_column("image_path", shuffled["image_path"]).append_column("image_sha256", shuffled["image_sha256"])


def _check_or_write_index(layout: DatasetLayout, split: str, plan: pa.Table) -> None:
    target = layout.shards_index_path(split)
    index = plan.select(schema.column_names(schema.SHARDS_INDEX))
    if target.exists():
        if not pq.read_table(target).equals(index):
            raise ShardsError(
                f"{target}: the shards were planned from other tiles, seed or shard size than asked now; "
                f"delete {layout.shards_dir(split)} and rerun `cytosyn data shards`"
            )
        return
    with atomic_path(target) as tmp:
        pq.write_table(index, tmp, compression="zstd", write_statistics=True, store_schema=False)


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


def _write_shard(layout: DatasetLayout, split: str, shard: int, members: pa.Table, cls_rows: np.ndarray, tokens: _TokenRows) -> None:
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
    cls = np.ascontiguousarray(cls_rows[feature_rows], dtype=np.float32)
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


def _manifest(layout: DatasetLayout, split: str, plan: pa.Table, extractor: str, shard_size: int, seed: int, dims: dict) -> dict:
    counts = np.bincount(plan["shard"].to_numpy(), minlength=0)
    store = FeatureStore(layout, extractor)
    features = dict(zarr.open_array(str(store.tokens_path), mode="r").attrs)
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "seed": int(seed),
        "shard_size": int(shard_size),
        "extractor": extractor,
        "features_manifest_sha256": features.get("manifest_sha256"),
        "features_weights_sha256": features.get("weights_sha256"),
        "num_samples": int(plan.num_rows),
        "row_group_size": ROW_GROUP,
        **dims,
        "shards": [{"file": layout.shard_path(split, k).name, "num_samples": int(c)} for k, c in enumerate(counts)],
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
    out.mkdir(parents=True, exist_ok=True)
    if parts == 1:
        remove_stale_temporaries(out)
    plan = plan_shards(layout, split, extractor, shard_size, seed)
    _check_or_write_index(layout, split, plan)
    n_shards = int(pc.max(plan["shard"]).as_py()) + 1
    mine = [k for k in range(n_shards) if k % parts == index_of]
    todo = [k for k in mine if not layout.shard_path(split, k).exists()]
    result = ShardsResult(out, plan.num_rows, n_shards, 0, len(mine) - len(todo), False)
    store = FeatureStore(layout, extractor)
    cls_rows = np.load(store.cls_npy_path, mmap_mode="r")
    tokens = _TokenRows(store)
    by_shard = plan.sort_by([("shard", "ascending"), ("offset", "ascending")])
    starts = np.concatenate([[0], np.cumsum(np.bincount(by_shard["shard"].to_numpy(), minlength=n_shards))])
    for k in tqdm(todo, unit="shard", desc=f"shards {split}", disable=not progress):
        members = by_shard.slice(int(starts[k]), int(starts[k + 1] - starts[k]))
        try:
            _write_shard(layout, split, k, members, cls_rows, tokens)
            result.written += 1
        except ShardsError as exc:
            result.errors.append(str(exc))
    if all(layout.shard_path(split, k).exists() for k in range(n_shards)):
        dims = {"cls_dim": int(cls_rows.shape[1]), "token_shape": list(tokens.array.shape[1:]), "token_dtype": "float16"}
        manifest = _manifest(layout, split, plan, extractor, shard_size, seed, dims)
        write_text_atomic(layout.shards_manifest_path(split), json.dumps(manifest, indent=1) + "\n")
        result.complete = True
    return result


def read_shards_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / "shards.json"
    if not path.exists():
        raise ShardsError(f"{path}: no shard manifest; run `cytosyn data shards DATASET --split {Path(shards_dir).name}` to finish the shards")
    return json.loads(path.read_text())

