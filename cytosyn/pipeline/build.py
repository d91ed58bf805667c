"""`build_dataset`: inventory → scan (tissue, candidates) → selection → extraction → reports.

Every stage is resumable and its outputs are pure functions of (slides, config, seed): rerunning a
finished or killed build rewrites nothing that is already right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cytosyn.cohort.selection import write_cohort_selection
from cytosyn.config import ConfigError, PipelineConfig, dump_config
from cytosyn.errors import one_line
from cytosyn.io import schema
from cytosyn.io.atomic import remove_stale_temporaries, write_parquet_atomic, write_text_atomic
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import write_slide_selection
from cytosyn.parallel import map_unordered
from cytosyn.pipeline.inventory import DEMO_SLIDES_DIR, take_inventory
from cytosyn.pipeline.report import write_build_report
from cytosyn.pipeline.slide_stages import SlideJob, crashed_slide, extract_slide, relative_to_root, scan_slide
from cytosyn.tiling.grid import sample_cells

# Columns the build tracks per slide but does not publish in slides.parquet.
BUILD_ONLY_COLUMNS = ("n_candidates", "n_tiles", "mpp")
# Settings that change how a build runs, never what it produces (tests check batching and worker
# counts do not change a byte).
RUNTIME_ONLY = {
    None: ("workers", "dask_address"),
    "curation": ("batch_size", "num_workers", "device"),
    "features": ("batch_size", "num_workers", "device"),
}


@dataclass
class BuildResult:
    root: Path
    slides: pd.DataFrame  # slides.parquet plus n_candidates / n_tiles
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _without_runtime_settings(cfg: PipelineConfig) -> PipelineConfig:
    top = {k: PipelineConfig.model_fields[k].default for k in RUNTIME_ONLY[None]}
    for section, fields in RUNTIME_ONLY.items():
        value = getattr(cfg, section) if section else None
        if value is not None:
            top[section] = value.model_copy(update={f: type(value).model_fields[f].default for f in fields})
    return cfg.model_copy(update=top)


def _check_provenance(layout: DatasetLayout, cfg: PipelineConfig) -> None:
    """A dataset root belongs to one config; mixing two would silently corrupt it."""
    text = dump_config(_without_runtime_settings(cfg))
    # Until slides.parquet exists nothing was built from the recorded config, so a corrected
    # config may replace it (e.g. after a wrong --slides).
    if not layout.pipeline_yaml.exists() or not layout.slides_parquet.exists():
        write_text_atomic(layout.pipeline_yaml, text)
    elif layout.pipeline_yaml.read_text() != text:
        raise ConfigError(
            f"{layout.pipeline_yaml}: this dataset was built with a different config; "
            "build into a new --out folder, or delete the old dataset to rebuild it"
        )


def _jobs(layout: DatasetLayout, inventory: pd.DataFrame, cfg: PipelineConfig) -> list[SlideJob]:
    ok = inventory[inventory["status"] == "ok"]
    mpps = ok["mpp"] if "mpp" in ok else pd.Series([None] * len(ok), index=ok.index)
    return [
        SlideJob(
            slide_id=r.slide_id, path=str(Path(r.path).resolve()), project=r.project or "generic",
            root=str(layout.root), cfg=cfg, mpp=None if m is None or (isinstance(m, float) and math.isnan(m)) else float(m),
        )
        for r, m in zip(ok.itertuples(index=False), mpps)
    ]


def _merge(slides: pd.DataFrame, results: list[dict]) -> pd.DataFrame:
    """Overwrite the slide table's columns with per-slide results (status, error, metadata, counts)."""
    if not results:
        return slides
    res = pd.DataFrame(results).set_index("slide_id")
    out = slides.set_index("slide_id")
    for col in res.columns:
        if col not in out:
            out[col] = pd.NA
        out[col] = out[col].astype(object)
        out.loc[res.index, col] = res[col].astype(object)
    return out.reset_index()


def select_per_slide(layout: DatasetLayout, slides: pd.DataFrame, cfg: PipelineConfig) -> None:
    """Default selection: up to ``tiling.max_tiles_per_slide`` candidates per slide, all for training."""
    for slide_id in slides.loc[slides["status"] == "ok", "slide_id"]:
        cands = pd.read_parquet(layout.candidates_path(slide_id))
        picked = sample_cells(cands, cfg.tiling.max_tiles_per_slide, cfg.seed, slide_id)
        picked["split"] = "train"
        picked["guidance"] = False
        write_slide_selection(layout, slide_id, picked)


def write_slides_manifest(layout: DatasetLayout, slides: pd.DataFrame) -> None:
    """slides.parquet: the SLIDES contract columns (typed), then any columns later stages added."""
    frame = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
    frame["path"] = [relative_to_root(p, str(layout.root)) for p in frame["path"]]
    for col in schema.SLIDES.names:
        if col not in frame:
            frame[col] = None
    for col in ("width", "height"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    for col in ("mpp_x", "mpp_y"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    table = pa.Table.from_pandas(frame[schema.SLIDES.names], schema=schema.SLIDES, preserve_index=False)
    for col in frame.columns:
        if col not in schema.SLIDES.names and col not in BUILD_ONLY_COLUMNS:
            table = table.append_column(col, pa.array(frame[col].tolist()))
    write_parquet_atomic(layout.slides_parquet, table)


def run_model_stages(layout: DatasetLayout, cfg: PipelineConfig) -> list[str]:
    """Curation, features, then shards, when the config asks for them; returns one-line errors.

    Curation decides which tiles are kept, features are computed for kept tiles only, and shards need
    every kept tile's features: each stage waits for the one before to succeed.
    """
    if cfg.curation is not None:
        try:
            if cfg.curation.heads is not None:
                from cytosyn.curation.predict import curate_with_heads

                # In the build's own config, `weights` says where the heads' backbone file is here.
                errors = curate_with_heads(layout, cfg, cfg.curation.heads, cfg.curation.weights, cfg.curation.weights_subkey).errors
            else:
                from cytosyn.curation.demo import run_demo_curation

                errors = run_demo_curation(layout, cfg).errors
        except (ValueError, FileNotFoundError) as exc:  # every curation error is one of these
            return [one_line(exc)]
        if errors:
            return errors
    if cfg.features is not None:
        from cytosyn.features import extract_features

        try:
            features = extract_features(layout, cfg)
        except ValueError as exc:  # a bad features setting (FeaturesError, WeightsError, device)
            return [one_line(exc)]
        if not features.ok:
            return features.errors
    errors: list[str] = []
    if cfg.shards is not None:
        from cytosyn.shards import write_shards

        for split in cfg.shards.splits:
            try:
                errors += write_shards(layout, cfg, split).errors
            except ValueError as exc:  # ShardsError: nothing to shard, features missing
                errors.append(one_line(exc))
    return errors


def build_dataset(cfg: PipelineConfig, out: str | Path) -> BuildResult:
    layout = DatasetLayout(Path(out).resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    slides = take_inventory(cfg, layout)
    _check_provenance(layout, cfg)
    # What a killed run left half-written. Tile images are cleaned per slide, by the worker that
    # extracts it: walking 40M images at every start would cost minutes.
    for folder in (
        layout.root, layout.root / DEMO_SLIDES_DIR, layout.masks_dir, layout.candidates_dir, layout.selection_dir,
        layout.tiles_dir, layout.qc_dir, layout.reports_dir,
    ):
        remove_stale_temporaries(folder, recursive=False)
    remove_stale_temporaries(layout.curation_dir)

    jobs = _jobs(layout, slides, cfg)
    run = dict(workers=cfg.workers, dask_address=cfg.dask_address, on_crash=crashed_slide)

    scans = list(map_unordered(scan_slide, jobs, desc="tissue + candidates", **run))
    slides = _merge(slides, scans)
    write_slides_manifest(layout, slides)

    selection_errors: list[str] = []
    if cfg.cohort is None:
        select_per_slide(layout, slides, cfg)
    else:
        selection_errors = write_cohort_selection(layout, cfg).errors
        # The cohort stage adds the slide-level split to slides.parquet; carry it forward.
        splits = pd.read_parquet(layout.slides_parquet, columns=["slide_id", "split"])
        slides = slides.drop(columns=["split"], errors="ignore").merge(splits, on="slide_id", how="left")

    ok_ids = {p.stem for p in layout.selection_dir.glob("*.parquet")} & set(slides.loc[slides["status"] == "ok", "slide_id"])
    extractions = list(map_unordered(extract_slide, [j for j in jobs if j.slide_id in ok_ids], desc="tiles", **run))
    slides = _merge(slides, extractions)
    write_slides_manifest(layout, slides)

    slides = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
    errors = [e for e in slides.loc[slides["status"] == "error", "error"].tolist() if e] + selection_errors
    errors += run_model_stages(layout, cfg)
    result = BuildResult(layout.root, slides, errors)
    write_build_report(layout, cfg, result.slides)
    return result
