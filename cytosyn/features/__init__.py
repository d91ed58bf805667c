"""H0-mini (or any registered backbone) features of every kept tile: CLS → Parquet, 14×14 tokens → Zarr."""

from cytosyn.features.extract import (
    TOKEN_GRID,
    FeaturesResult,
    TokenExtractor,
    compute_features,
    extract_features,
    load_extractor,
    resize_patch_tokens,
)
from cytosyn.features.store import FeaturesError, FeatureStore, features_identity, open_cls_rows, open_tokens, read_cls, read_index

__all__ = [
    "TOKEN_GRID",
    "FeatureStore",
    "FeaturesError",
    "FeaturesResult",
    "TokenExtractor",
    "compute_features",
    "extract_features",
    "features_identity",
    "load_extractor",
    "open_cls_rows",
    "open_tokens",
    "read_cls",
    "read_index",
    "resize_patch_tokens",
]
