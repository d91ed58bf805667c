"""`cytosyn data build` end to end: bad input, resume after SIGKILL, worker-count independence, scale."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import shared_file
from helpers import IMAGES, MANIFESTS, run_cli, tree_digest, write_config
from cytosyn.slides.synthetic import write_synthetic_slide

TCGA_NAMES = [
    "TCGA-A1-A0SB-01Z-00-DX1.AAAA0001-0000-0000-0000-000000000001",
    "TCGA-AA-3516-01Z-00-DX1.AAAA0002-0000-0000-0000-000000000002",
    "TCGA-05-4244-01Z-00-DX1.AAAA0003-0000-0000-0000-000000000003",
    "TCGA-B0-4690-01Z-00-DX1.AAAA0004-0000-0000-0000-000000000004",
]


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory) -> Path:
    """Four small TCGA-named synthetic slides at 40x and 20x."""
    folder = tmp_path_factory.mktemp("slides")
    for i, name in enumerate(TCGA_NAMES):
        mpp = 0.2520 if i % 2 == 0 else 0.5020
        size = 2600 if mpp < 0.3 else 1400
        write_synthetic_slide(folder / f"{name}.svs", width=size, height=size, mpp=mpp, seed=i)
    return folder


def _corrupt_level0_tiles(source: Path, target: Path) -> None:
    """Copy a pyramidal slide with the second half of its level-0 tiles destroyed.

    The header and the lower levels stay intact, so the slide opens and its tissue mask (read from a
    coarse level) is fine: the failure comes mid-extraction, after some tiles were written.
    """
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    for off, n in list(zip(offsets, counts))[len(offsets) // 2 :]:
        data[off : off + n] = b"\xff" * n
    target.write_bytes(bytes(data))


def _png_ok(path: Path) -> bool:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return img is not None and img.shape == (224, 224, 3)


def test_bad_input_is_recorded_and_the_rest_completes(tmp_path, synthetic_folder):
    folder = tmp_path / "slides"
    shutil.copytree(synthetic_folder, folder)
    for name in ("unreadable.svs", "unopenable.tiff", "boxes.tiff"):
        shutil.copy(shared_file(f"slides/{name}"), folder / f"TCGA-A2-A0CM-01Z-00-DX{len(name) % 9}.{name.split('.')[0].upper()}.{name.split('.')[1]}")
    real = shared_file("slides/CMU-1-Small-Region.svs").read_bytes()
    (folder / "TCGA-AR-A0TP-01Z-00-DX1.TRUNCATED.svs").write_bytes(real[: len(real) // 2])
    _corrupt_level0_tiles(folder / f"{TCGA_NAMES[0]}.svs", folder / "TCGA-AR-A0TQ-01Z-00-DX1.CORRUPT.svs")
    (folder / "TCGA-A2-A0D0-01Z-00-DX1.TEXT.svs").write_text("not a slide\n")
    cfg = write_config(tmp_path / "p.yaml", tiling={"max_tiles_per_slide": None})

    res = run_cli("data", "build", cfg, "--slides", folder, "--out", tmp_path / "ds")
    assert res.returncode == 1, res.stderr
    slides = pd.read_parquet(tmp_path / "ds" / "slides.parquet").set_index("slide_id")
    bad = slides[slides.status == "error"]
    assert len(bad) == 6 and (slides.status == "ok").sum() == 4
    for slide_id, row in bad.iterrows():
        assert "\n" not in row.error and Path(row.path).name in row.error, row.error
        assert Path(row.path).name in res.stderr
    assert "--mpp" in bad.loc["TCGA-A2-A0CM-01Z-00-DX1"].error  # boxes.tiff has no MPP
    # The good slides are complete; every PNG on disk is whole, including those of the corrupt slide.
    for name in TCGA_NAMES:
        tiles = pd.read_parquet(tmp_path / "ds" / "tiles" / f"{name.split('.')[0]}.parquet")
        assert len(tiles) > 0
    pngs = list((tmp_path / "ds" / "images").rglob("*.png"))
    assert pngs and all(_png_ok(p) for p in pngs)
    assert any("TCGA-AR-A0TQ" in str(p) for p in pngs), "tiles written before the corrupt region are kept"
    assert not list((tmp_path / "ds").rglob(".tmp-*"))


def _build_args(cfg: Path, folder: Path, out: Path, workers: int = 1) -> list[str]:
    return ["data", "build", str(cfg), "--slides", str(folder), "--out", str(out), "--workers", str(workers)]


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path, synthetic_folder):
    # Every candidate at the slowest PNG level: a wide window (seconds) for the kill to land mid-extraction.
    cfg = write_config(tmp_path / "p.yaml", tiling={"max_tiles_per_slide": None, "png_compression": 9})
    assert run_cli(*_build_args(cfg, synthetic_folder, tmp_path / "clean")).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cytosyn", *_build_args(cfg, synthetic_folder, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "images").rglob("*.png"))) < 30:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((killed / "images").rglob("*.png")))
    assert 0 < written < len(list((tmp_path / "clean" / "images").rglob("*.png"))), "kill landed mid-extraction"
    # What a kill at another moment leaves: half-written files of the root, the reports, the masks.
    for stale in ("slides.parquet", "reports/build.md", "masks/x.png"):
        (killed / stale).parent.mkdir(parents=True, exist_ok=True)
        (killed / stale).with_name(f".tmp-{Path(stale).name}.0123abcd").write_bytes(b"half")

    assert run_cli(*_build_args(cfg, synthetic_folder, killed)).returncode == 0
    assert tree_digest(killed, MANIFESTS) == tree_digest(tmp_path / "clean", MANIFESTS)
    assert tree_digest(killed, IMAGES) == tree_digest(tmp_path / "clean", IMAGES)
    assert not list(killed.rglob(".tmp-*"))


@pytest.mark.slow
def test_one_and_two_workers_give_identical_manifests(tmp_path, synthetic_folder):
    cfg = write_config(tmp_path / "p.yaml")
    assert run_cli(*_build_args(cfg, synthetic_folder, tmp_path / "w1", 1)).returncode == 0
    assert run_cli(*_build_args(cfg, synthetic_folder, tmp_path / "w2", 2)).returncode == 0
    assert tree_digest(tmp_path / "w1", MANIFESTS) == tree_digest(tmp_path / "w2", MANIFESTS)
    assert tree_digest(tmp_path / "w1", IMAGES) == tree_digest(tmp_path / "w2", IMAGES)


@pytest.mark.slow
def test_rerun_of_a_finished_build_rewrites_nothing(tmp_path, synthetic_folder):
    cfg = write_config(tmp_path / "p.yaml")
    out = tmp_path / "ds"
    assert run_cli(*_build_args(cfg, synthetic_folder, out)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "reports" not in p.parts}
    assert run_cli(*_build_args(cfg, synthetic_folder, out)).returncode == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "reports" not in p.parts}
    changed = sorted(str(p.relative_to(out)) for p in before if after.get(p) != before[p])
    assert changed == [], changed


def _stripe_period(tile: np.ndarray) -> float:
    """Dominant horizontal period in pixels, from the spectrum of the column means."""
    profile = tile.astype(float).mean(axis=(0, 2))
    spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
    k = int(np.argmax(spectrum[1:])) + 1
    # Refine the peak by parabolic interpolation for sub-bin accuracy.
    a, b, c = spectrum[k - 1], spectrum[k], spectrum[k + 1]
    k_fine = k + 0.5 * (a - c) / (a - 2 * b + c)
    return len(profile) / k_fine


@pytest.mark.parametrize(
    ("mpp", "side", "footprint", "level"),
    # 0.25 µm/px reads 448 px at level 0; 0.125 µm/px reads its 4× level (0.5 µm/px) 1:1.
    [(0.25, 2400, 448, 0), (0.125, 4800, 896, 1)],
)
def test_scale_10um_stripes_give_20px_period_at_half_micron(tmp_path, mpp, side, footprint, level):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "TCGA-A1-A0SC-01Z-00-DX1.STRIPES.svs", width=side, height=side, mpp=mpp,
                          pattern="stripes", stripe_period_um=10.0, seed=0)
    cfg = write_config(tmp_path / "p.yaml", tissue={"min_saturation": 0}, tiling={"min_tissue_fraction": 0.0, "max_tiles_per_slide": 6})
    res = run_cli("data", "build", cfg, "--slides", folder, "--out", tmp_path / "ds")
    assert res.returncode == 0, res.stderr
    pngs = sorted((tmp_path / "ds" / "images").rglob("*.png"))
    assert len(pngs) == 6
    for p in pngs:
        tile = cv2.imread(str(p))
        assert tile.shape == (224, 224, 3)
        assert _stripe_period(tile) == pytest.approx(20.0, rel=0.02)
    tiles = pd.read_parquet(next((tmp_path / "ds" / "tiles").glob("*.parquet")))
    assert set(tiles.read_size_level0) == {footprint} and set(tiles.read_level) == {level}


def test_real_slide_tiles(tmp_path, cmu_slide):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu_slide, folder / cmu_slide.name)
    cfg = write_config(tmp_path / "p.yaml", tiling={"max_tiles_per_slide": 10})
    res = run_cli("data", "build", cfg, "--slides", folder, "--out", tmp_path / "ds")
    assert res.returncode == 0, res.stderr
    tiles = pd.read_parquet(tmp_path / "ds" / "tiles" / "CMU-1-Small-Region.parquet")
    assert len(tiles) == 10
    assert abs(tiles.read_size_level0.iloc[0] - 224 * 0.5 / 0.499) <= 1
    for rel, sha in zip(tiles.image_path, tiles.image_sha256):
        path = tmp_path / "ds" / rel
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and _png_ok(path)
        assert hashlib.sha256(data).hexdigest() == sha
    slides = pd.read_parquet(tmp_path / "ds" / "slides.parquet")
    assert slides.loc[0, "path"] == str(folder / cmu_slide.name)
    assert (tmp_path / "ds" / "qc" / "CMU-1-Small-Region.jpg").exists()
    assert (tmp_path / "ds" / "reports" / "build.md").exists()


def test_a_root_built_with_another_config_is_refused(tmp_path, cmu_slide):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu_slide, folder / cmu_slide.name)
    out = tmp_path / "ds"
    assert run_cli("data", "build", write_config(tmp_path / "a.yaml"), "--slides", folder, "--out", out).returncode == 0
    other = write_config(tmp_path / "b.yaml", tiling={"max_tiles_per_slide": 3})
    res = run_cli("data", "build", other, "--slides", folder, "--out", out)
    assert res.returncode == 2 and "different config" in res.stderr and "pipeline.yaml" in res.stderr
    # Runtime-only settings do not count as a different config.
    assert run_cli("data", "build", write_config(tmp_path / "a.yaml"), "--slides", folder, "--out", out, "--workers", "2").returncode == 0


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tiling:\n  size_pixels: 224\n")
    res = run_cli("data", "build", cfg, "--out", tmp_path / "ds")
    assert res.returncode == 2
    assert "tiling.size_pixels" in res.stderr and str(cfg) in res.stderr


def test_slide_info_json(cmu_slide):
    import json

    res = run_cli("slide", "info", cmu_slide, "--json")
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout)
    assert facts["vendor"] == "aperio" and facts["mpp_source"].endswith("-property")
    assert facts["mpp_x"] == pytest.approx(0.499) and facts["objective_power"] == 20
    # The tissue strip of CMU-1-Small-Region covers roughly a third of its 1.1 × 1.5 mm.
    assert 0.3 < facts["tissue_area_mm2"] < 1.0
    res = run_cli("slide", "info", shared_file("slides/boxes.tiff"))
    assert res.returncode == 1 and "--mpp" in res.stderr


def test_a_build_where_every_slide_fails_still_reports(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "TCGA-A2-A0D0-01Z-00-DX1.TEXT.svs").write_text("not a slide\n")
    res = run_cli("data", "build", write_config(tmp_path / "p.yaml"), "--slides", folder, "--out", tmp_path / "ds")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "TEXT.svs" in res.stderr
    assert (tmp_path / "ds" / "reports" / "build.md").exists()


def test_a_wrong_slide_folder_is_one_line_and_can_be_corrected(tmp_path, cmu_slide):
    cfg = write_config(tmp_path / "p.yaml")
    out = tmp_path / "ds"
    res = run_cli("data", "build", cfg, "--slides", tmp_path / "nowhere", "--out", out)
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu_slide, folder / cmu_slide.name)
    assert run_cli("data", "build", cfg, "--slides", folder, "--out", out).returncode == 0


def test_shards_without_features_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path / "p.yaml", shards={"shard_size": 8})
    res = run_cli("data", "build", cfg, "--slides", tmp_path, "--out", tmp_path / "ds")
    assert res.returncode == 2 and "shards need features" in res.stderr


def test_a_slide_without_mpp_builds_with_each_documented_way_of_giving_one(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    name = "TCGA-A1-A0SD-01Z-00-DX1.NOMPP"
    write_synthetic_slide(folder / f"{name}.svs", width=1400, height=1400, mpp=0.5020, seed=5, write_mpp=False)
    slide_id = "TCGA-A1-A0SD-01Z-00-DX1"
    meta = tmp_path / "meta.csv"
    meta.write_text(f"slide_id,mpp\n{slide_id},0.5020\n")
    ways = {
        "cli": (write_config(tmp_path / "a.yaml"), ["--mpp", "0.502"], "override", 0.502),
        "csv": (write_config(tmp_path / "b.yaml", slides={"metadata_csv": str(meta)}), [], "override", 0.5020),
        "power": (write_config(tmp_path / "c.yaml"), ["--objective-power-fallback"], "objective-power", 0.5),
    }
    none = run_cli("data", "build", write_config(tmp_path / "d.yaml"), "--slides", folder, "--out", tmp_path / "none")
    assert none.returncode == 1 and "--mpp" in none.stderr and "--objective-power-fallback" in none.stderr
    for way, (cfg, extra, source, mpp) in ways.items():
        res = run_cli("data", "build", cfg, "--slides", folder, "--out", tmp_path / way, *extra)
        assert res.returncode == 0, (way, res.stderr)
        slides = pd.read_parquet(tmp_path / way / "slides.parquet")
        assert slides.loc[0, "status"] == "ok" and slides.loc[0, "mpp_source"] == source, way
        assert slides.loc[0, "mpp_x"] == pytest.approx(mpp), way
        tiles = pd.read_parquet(tmp_path / way / "tiles" / f"{slide_id}.parquet")
        assert len(tiles) > 0 and (tiles["read_size_level0"] == round(224 * 0.5 / mpp)).all(), way


def test_unreadable_candidate_and_tile_manifests_are_made_again(tmp_path, synthetic_folder):
    cfg = write_config(tmp_path / "p.yaml", tiling={"max_tiles_per_slide": 4})
    out = tmp_path / "ds"
    assert run_cli("data", "build", cfg, "--slides", synthetic_folder, "--out", out).returncode == 0
    before = tree_digest(out, MANIFESTS)
    slide_id = TCGA_NAMES[1].split(".")[0]
    for broken in (out / "candidates" / f"{slide_id}.parquet", out / "tiles" / f"{slide_id}.parquet"):
        broken.write_bytes(b"not parquet")
    res = run_cli("data", "build", cfg, "--slides", synthetic_folder, "--out", out)
    assert res.returncode == 0, res.stderr
    assert tree_digest(out, MANIFESTS) == before
