"""The data contracts: column names and types of every manifest in a dataset root.

This module is the single source of truth for manifest columns (documented in docs/data-formats.md).
Stages may add columns; renaming one needs a migration.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val_in", "val_out", "guidance")

SLIDES = pa.schema(
    [
        ("slide_id", pa.string()),
        ("path", pa.string()),
        ("patient_id", pa.string()),
        ("tss_code", pa.string()),
        ("project", pa.string()),
        ("sample_type", pa.string()),
        ("slide_type", pa.string()),
        ("vendor", pa.string()),
        ("backend", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mpp_x", pa.float64()),
        ("mpp_y", pa.float64()),
        ("mpp_source", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

CANDIDATES = pa.schema(
    [
        ("tile_id", pa.string()),
        ("slide_id", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("size_px", pa.int32()),
        ("mpp", pa.float64()),
        ("read_level", pa.int32()),
        ("read_size_level0", pa.int64()),
        ("tissue_fraction", pa.float32()),
    ]
)

# A selection row is a candidate with the split it was drawn for. `guidance` flags the tiles whose
# features condition generation: a TSS-stratified subset of the train rows (docs/cohort.md), so a
# guidance tile keeps split='train' and tile_id stays unique in every file.
SELECTION = CANDIDATES.append(pa.field("split", pa.string())).append(pa.field("guidance", pa.bool_()))

TILES = SELECTION.append(pa.field("image_path", pa.string())).append(pa.field("image_sha256", pa.string()))

# Added by curation (issue: artifact curation) to the tile manifest.
CURATION_COLUMNS = pa.schema([("artifact_prob", pa.float32()), ("kept", pa.bool_())])


def column_names(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema]


# Added by the cohort stage (docs/cohort.md) to slides.parquet: the slide-level split, 'train' or
# 'val_out' (None for slides outside the cohort: excluded, or unparseable names).
SLIDE_SPLIT_COLUMNS = pa.schema([("split", pa.string())])

# variants/<name>/tiles/<slide_id>.parquet: 256 px context and JPEG copies of selected tiles (§4.3).
VARIANT_TILES = pa.schema(
    [
        ("tile_id", pa.string()),
        ("slide_id", pa.string()),
        ("split", pa.string()),
        ("guidance", pa.bool_()),
        ("variant", pa.string()),
        ("size_px", pa.int32()),
        ("image_path", pa.string()),
        ("image_sha256", pa.string()),
    ]
)

# curation/predictions/<slide_id>.parquet (docs/curation.md): one row per tile of the slide's manifest.
# `filter` is "" for a tile that reached the classifier, else the cheap filter that removed it
# (near_white | low_saturation | blur) or "error" (unreadable PNG, reason in `error`). `head_probs`
# holds each fold head's probability (empty when not scored); `artifact_prob` is their mean (NaN when
# not scored). `topup` marks replacement tiles drawn from unused candidates. `curation_key` identifies
# the heads and settings the row was computed with (a rerun with the same key skips the slide).
CURATION_PREDICTIONS = pa.schema(
    [
        ("tile_id", pa.string()),
        ("image_sha256", pa.string()),
        ("topup", pa.bool_()),
        ("filter", pa.string()),
        ("error", pa.string()),
        ("white_fraction", pa.float32()),
        ("mean_saturation", pa.float32()),
        ("laplacian_var", pa.float32()),
        ("head_probs", pa.list_(pa.float64())),
        ("artifact_prob", pa.float64()),
        ("kept", pa.bool_()),
        ("curation_key", pa.string()),
    ]
)


# features/<extractor>/ (docs/features.md). tokens.index.parquet gives the row of tokens.zarr (and of
# cls.parquet and the per-chunk cls/ files, which follow the same order) of every kept tile.
FEATURES_INDEX = pa.schema([("row", pa.int64()), ("tile_id", pa.string()), ("image_path", pa.string())])


def features_cls_schema(dim: int = 768) -> pa.Schema:
    """cls.parquet: one row per kept tile, in token row order."""
    return pa.schema([("tile_id", pa.string()), ("cls", pa.list_(pa.float32(), dim))])


# shards/<split>/ (docs/shards.md). index.parquet: where every sample of the split lives.
SHARDS_INDEX = pa.schema(
    [
        ("shard", pa.int32()),
        ("offset", pa.int32()),
        ("tile_id", pa.string()),
        ("slide_id", pa.string()),
        ("project", pa.string()),
        ("tss_code", pa.string()),
        ("feature_row", pa.int64()),
    ]
)


def shard_schema(cls_dim: int = 768, token_grid: int = 14, token_dim: int = 768) -> pa.Schema:
    """shard-NNNNN.parquet: `png` the tile's PNG file bytes; `tokens` (grid, grid, dim) float16 little-endian."""
    return pa.schema(
        [
            ("tile_id", pa.string()),
            ("slide_id", pa.string()),
            ("project", pa.string()),
            ("tss_code", pa.string()),
            ("png", pa.binary()),
            ("cls", pa.list_(pa.float32(), cls_dim)),
            ("tokens", pa.binary(token_grid * token_grid * token_dim * 2)),
        ]
    )
