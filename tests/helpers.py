"""Small helpers shared by test modules: running the real CLI and comparing dataset roots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cytosyn", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, **sections) -> Path:
    base = {"name": "test", "seed": 0, "tiling": {"max_tiles_per_slide": 12}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(base))
    return path


def tree_digest(root: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``root`` matching the glob patterns, keyed by relative path."""
    out = {}
    for pattern in patterns:
        for p in sorted(root.glob(pattern)):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


MANIFESTS = ("slides.parquet", "candidates/*.parquet", "selection/*.parquet", "tiles/*.parquet")
IMAGES = ("images/**/*.png",)
