"""Training shards (PNG bytes + CLS + tokens + metadata) and the resumable, DDP-aware dataset that reads them."""

from cytosyn.shards.dataset import ShardDataset, ShardLoader, resume_point, shuffle_buffer_order
from cytosyn.shards.writer import ShardsError, ShardsResult, build_shards, plan_shards, read_shards_manifest, write_shards

__all__ = [
    "ShardDataset",
    "ShardLoader",
    "ShardsError",
    "ShardsResult",
    "build_shards",
    "resume_point",
    "plan_shards",
    "read_shards_manifest",
    "shuffle_buffer_order",
    "write_shards",
]
