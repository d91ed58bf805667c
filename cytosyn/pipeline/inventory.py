"""The build's inventory stage: which slides a dataset is built from, per the config's slide source."""

from __future__ import annotations

import pandas as pd

from cytosyn.cohort.inventory import inventory_from_csv, inventory_from_folder, inventory_from_gdc_manifests
from cytosyn.config import PipelineConfig
from cytosyn.io.layout import DatasetLayout

DEMO_SLIDES_DIR = "source-slides"


def take_inventory(cfg: PipelineConfig, layout: DatasetLayout) -> pd.DataFrame:
    """One row per slide (cohort columns, absolute ``path``, ``status``, ``error``), sorted by slide_id."""
    s = cfg.slides
    cohort = cfg.cohort
    diagnostic_only = cohort.diagnostic_only if cohort else True
    kind = cohort.kind if cohort and cohort.kind in ("tcga", "generic") else "auto"
    if s.source == "synthetic-demo":
        from cytosyn.slides.synthetic import demo_cohort

        folder = layout.root / DEMO_SLIDES_DIR
        demo_cohort(folder, n_slides=s.demo_slides, seed=cfg.seed)
        frame = inventory_from_folder(folder, kind="tcga", extensions=s.extensions, recursive=False, diagnostic_only=diagnostic_only)
    elif s.source == "folder":
        frame = inventory_from_folder(
            s.folder, kind=kind, extensions=s.extensions, recursive=s.recursive,
            metadata_csv=s.metadata_csv, diagnostic_only=diagnostic_only,
        )
    elif s.source == "csv":
        frame = inventory_from_csv(s.csv, kind=kind, diagnostic_only=diagnostic_only)
    else:
        frame = inventory_from_gdc_manifests(s.gdc_manifests, slides_root=s.folder, diagnostic_only=diagnostic_only)
    return frame.sort_values("slide_id", kind="stable").reset_index(drop=True)
