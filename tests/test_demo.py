"""The embedded demo, end to end through the real CLI: every stage the demo config names."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import run_cli


@pytest.mark.slow
def test_demo_build_runs_every_stage(tmp_path):
    res = run_cli("data", "build", "--out", tmp_path / "demo", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    root = tmp_path / "demo"

    slides = pd.read_parquet(root / "slides.parquet")
    assert len(slides) == 8 and (slides.status == "ok").all()
    assert slides.project.nunique() >= 3
    assert set(slides.split) == {"train", "val_out"}

    tiles = pd.concat([pd.read_parquet(p) for p in sorted((root / "tiles").glob("*.parquet"))])
    assert set(tiles.split) == {"train", "val_in", "val_out"} and tiles.guidance.any()
    assert tiles.tile_id.is_unique
    # Curation averaged the fold heads into artifact_prob and decided `kept` for every tile.
    assert tiles.artifact_prob.notna().sum() > 0 and tiles.kept.notna().all()
    kept = tiles[tiles.kept]

    index = pd.read_parquet(root / "features" / "h0-mini" / "tokens.index.parquet")
    assert sorted(index.tile_id) == sorted(kept.tile_id)
    shard_index = pq.read_table(root / "shards" / "train" / "index.parquet").to_pandas()
    assert sorted(shard_index.tile_id) == sorted(kept[kept.split == "train"].tile_id)

    report = (root / "reports" / "build.md").read_text()
    for link in ("cohort.md", "curation.md", "features (h0-mini)", "shards (train)", "qc_overview.jpg"):
        assert link in report
    assert "random init" in (root / "reports" / "curation.md").read_text()

    audit = run_cli("data", "audit", root)
    assert audit.returncode == 0, audit.stdout + audit.stderr
