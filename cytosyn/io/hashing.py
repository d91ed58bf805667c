"""Stable identifiers and per-slide random generators.

Python's ``hash`` is salted per process, so every id and every seed that must survive a
restart or a change of worker count is derived from BLAKE2b of a canonical string instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def stable_hash(*parts: object) -> int:
    """A 63-bit integer that depends only on the string forms of ``parts``."""
    text = "\x1f".join(_canonical(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _canonical(part: object) -> str:
    # Floats are written with repr so 0.5 and 0.50 hash alike but 0.499 and 0.5 do not.
    if isinstance(part, float):
        return repr(float(part))
    return str(part)


def tile_id(slide_id: str, x: int, y: int, size_px: int, mpp: float) -> str:
    """Stable 16-hex-digit id of a tile: the same cell of the same slide always gets the same id."""
    return f"{stable_hash(slide_id, int(x), int(y), int(size_px), float(mpp)):016x}"


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """The generator for everything random about one slide, independent of file order and workers."""
    return np.random.default_rng([int(seed), stable_hash(slide_id)])


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()
