"""The inventory stage: which slides a dataset is built from, per the config's slide source.

The build (``take_inventory``) and ``cytosyn data splits`` (``inventory_from_source``) take it the
same way, so one slide source gives one inventory whichever command reads it.
"""

from __future__ import annotations

import pandas as pd

from cytosyn.cohort.inventory import inventory_from_csv, inventory_from_folder, inventory_from_gdc_manifests
from cytosyn.config import PipelineConfig, SlidesConfig
from cytosyn.io.layout import DatasetLayout

DEMO_SLIDES_DIR = "source-slides"


def inventory_from_source(s: SlidesConfig, cohort_kind: str | None = None, diagnostic_only: bool = True) -> pd.DataFrame:
    """The inventory of a ``folder``, ``csv`` or ``gdc`` slide source, sorted by slide_id.

    ``cohort_kind`` is the cohort's kind when known; for an external cohort, or none, the file names
    decide whether the slides are TCGA or generic.
    """
    kind = cohort_kind if cohort_kind in ("tcga", "generic") else "auto"
    if s.source == "folder":
        return inventory_from_folder(
            s.folder, kind=kind, extensions=s.extensions, recursive=s.recursive,
            metadata_csv=s.metadata_csv, diagnostic_only=diagnostic_only,
        )
    if s.source == "csv":
        return inventory_from_csv(s.csv, kind=kind, diagnostic_only=diagnostic_only)
    if s.source == "gdc":
        return inventory_from_gdc_manifests(s.gdc_manifests, slides_root=s.folder, diagnostic_only=diagnostic_only)
    raise ValueError(f"slides.source {s.source!r} is not a folder, csv or gdc source")


def take_inventory(cfg: PipelineConfig, layout: DatasetLayout) -> pd.DataFrame:
    """One row per slide (cohort columns, absolute ``path``, ``status``, ``error``), sorted by slide_id."""
    s = cfg.slides
    cohort = cfg.cohort
    diagnostic_only = cohort.diagnostic_only if cohort else True
    if s.source != "synthetic-demo":
        return inventory_from_source(s, cohort.kind if cohort else None, diagnostic_only)
    from cytosyn.slides.synthetic import demo_cohort

    folder = layout.root / DEMO_SLIDES_DIR
    demo_cohort(folder, n_slides=s.demo_slides, seed=cfg.seed)
    return inventory_from_folder(folder, kind="tcga", extensions=s.extensions, recursive=False, diagnostic_only=diagnostic_only)
