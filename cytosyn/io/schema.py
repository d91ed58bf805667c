"""The data contracts: column names and types of every manifest in a dataset root.

This module is the single source of truth for manifest columns (documented in docs/data-formats.md).
Stages may add columns; renaming one needs a migration.
"""

from __future__ import annotations

import pyarrow as pa

SPLITS = ("train", "val_in", "val_out", "guidance")
SLIDE_STATUSES = ("ok", "error", "excluded")

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

# A selection row is a candidate with the split it was drawn for.
SELECTION = CANDIDATES.append(pa.field("split", pa.string()))

TILES = SELECTION.append(pa.field("image_path", pa.string())).append(pa.field("image_sha256", pa.string()))

# Added by curation (issue: artifact curation) to the tile manifest.
CURATION_COLUMNS = pa.schema([("artifact_prob", pa.float32()), ("kept", pa.bool_())])


def column_names(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema]
