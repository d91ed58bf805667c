"""Typed pipeline configuration: YAML in, validated object out (pipelines/*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent: reject them at the door.
    model_config = ConfigDict(extra="forbid")


class SlidesConfig(_Section):
    """Where slides come from and how they are opened."""

    source: Literal["synthetic-demo", "folder", "csv", "gdc"] = "folder"
    folder: Path | None = None
    csv: Path | None = None
    gdc_manifests: list[Path] = Field(default_factory=list)
    recursive: bool = True
    extensions: list[str] = Field(default_factory=lambda: [".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".dcm"])
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp: float | None = Field(default=None, gt=0, description="override for every slide (µm/px)")
    objective_power_fallback: bool = False
    demo_slides: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _source_has_its_input(self) -> SlidesConfig:
        needs = {"folder": self.folder, "csv": self.csv, "gdc": self.gdc_manifests or None}
        if self.source in needs and needs[self.source] is None:
            field = {"folder": "slides.folder", "csv": "slides.csv", "gdc": "slides.gdc_manifests"}[self.source]
            raise ValueError(f"slides.source is '{self.source}' but {field} is not set")
        return self


class TissueConfig(_Section):
    mask_mpp: float = Field(default=8.0, ge=2.0, le=64.0, description="resolution of the tissue mask (µm/px)")
    median_blur_px: int = Field(default=5, ge=1)
    closing_px: int = Field(default=5, ge=0)
    min_object_area_um2: float = Field(default=20000.0, ge=0)
    max_hole_area_um2: float = Field(default=50000.0, ge=0)
    min_saturation: int = Field(default=20, ge=0, le=255, description="floor under Otsu's threshold on saturation")
    exclude_pen_marks: bool = True


class TilingConfig(_Section):
    size_px: int = Field(default=224, ge=16)
    mpp: float = Field(default=0.5, gt=0)
    min_tissue_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    max_tiles_per_slide: int | None = Field(default=256, ge=1)
    png_compression: int = Field(default=1, ge=0, le=9)
    qc_thumbnail_px: int = Field(default=1024, ge=128)


class CurationFiltersConfig(_Section):
    """Cheap filters applied before the artifact classifier (each switchable; see docs/curation.md)."""

    near_white: bool = True
    white_level: int = Field(default=220, ge=0, le=255, description="a pixel is white when every channel reaches this")
    max_white_fraction: float = Field(default=0.9, gt=0.0, le=1.0)
    low_saturation: bool = True
    min_mean_saturation: float = Field(default=10.0, ge=0.0, le=255.0, description="mean HSV saturation, 0–255")
    blur: bool = True
    min_laplacian_var: float = Field(default=50.0, ge=0.0, description="variance of the Laplacian of the grey tile")


class CurationConfig(_Section):
    """Artifact curation (paper §3.2): frozen ViT-S features + 5-fold linear classifier (docs/curation.md)."""

    backbone: str = "ibot-vit-s"
    architecture: str | None = Field(default=None, description="timm architecture replacing the backbone's own")
    timm_overrides: dict[str, int | float | str | bool] = Field(default_factory=dict, description="e.g. {depth: 4}")
    weights: Path | None = Field(default=None, description="local weights; None = random init (demo only)")
    weights_subkey: str | None = None
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    folds: int = Field(default=5, ge=2)
    C: float = Field(default=1.0, gt=0.0, description="inverse L2 strength of the logistic regression")
    max_iter: int = Field(default=1000, ge=10)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    top_up: bool = False
    filters: CurationFiltersConfig = Field(default_factory=CurationFiltersConfig)
    gt_artifact_fraction: float = Field(default=0.25, gt=0.0, le=1.0, description="demo labels: artifact when covered ≥ this")
    demo_holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)


class PipelineConfig(_Section):
    name: str = "cytosyn"
    seed: int = 0
    workers: int = Field(default=1, ge=1)
    dask_address: str | None = None
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    curation: CurationConfig | None = None


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file and the fix."""


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline config; pass an existing YAML file (see pipelines/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(raw, source=str(path), base_dir=path.parent)


def parse_config(raw: dict, source: str = "<config>", base_dir: Path | None = None) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']} ({len(exc.errors())} error(s) in all)") from None
    return _resolve_paths(cfg, base_dir) if base_dir is not None else cfg


def _resolve_paths(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """Relative paths in a config file are relative to the file, not to the working directory."""
    def fix(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base_dir / p).resolve()

    s = cfg.slides
    updates = {
        "folder": fix(s.folder) or s.folder,
        "csv": fix(s.csv) or s.csv,
        "gdc_manifests": [fix(p) or p for p in s.gdc_manifests],
    }
    cfg = cfg.model_copy(update={"slides": s.model_copy(update=updates)})
    if cfg.curation is not None and cfg.curation.weights is not None:
        weights = fix(cfg.curation.weights) or cfg.curation.weights
        cfg = cfg.model_copy(update={"curation": cfg.curation.model_copy(update={"weights": weights})})
    return cfg


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
