"""Typed pipeline configuration: YAML in, validated object out (pipelines/*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


# File extensions a folder of slides is searched for (OpenSlide's formats and DICOM).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".dcm")


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent: reject them at the door.
    model_config = ConfigDict(extra="forbid")


class SlidesConfig(_Section):
    """Where slides come from and how they are opened."""

    source: Literal["synthetic-demo", "folder", "csv", "gdc"] = "folder"
    folder: Path | None = None
    metadata_csv: Path | None = Field(default=None, description="per-slide patient/site/project/mpp for a folder source")
    csv: Path | None = None
    gdc_manifests: list[Path] = Field(default_factory=list)
    recursive: bool = True
    extensions: list[str] = Field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp: float | None = Field(default=None, gt=0, description="override for every slide (µm/px)")
    objective_power_fallback: bool = False
    demo_slides: int = Field(default=8, ge=1)


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
    heads: Path | None = Field(default=None, description="trained heads folder; the build then curates with them (else the demo trains on ground truth)")
    weights: str | None = Field(default=None, description="local weights file (an iBOT/DINO teacher checkpoint works), or random-init (demo)")
    weights_subkey: str | None = None
    mean: tuple[float, float, float] | None = Field(default=None, description="RGB input mean on the 0–1 scale; replaces the backbone's own")
    std: tuple[float, float, float] | None = Field(default=None, description="RGB input std on the 0–1 scale; replaces the backbone's own")
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

    @field_validator("weights", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError(f"every std value must be > 0 (inputs are divided by it); got {list(value)}")
        return value


class CohortConfig(_Section):
    """TSS-stratified tile selection and train / val_in / val_out / guidance splits (docs/cohort.md)."""

    kind: Literal["tcga", "generic", "external"] = "tcga"
    diagnostic_only: bool = True
    budget: int | None = Field(default=40_000_000, ge=0, description="training tiles; None = every candidate left")
    val_out_slides: int | float | None = Field(
        default=None, ge=0, description="held-out slides: a count, or a fraction < 1; None = 1012 for tcga, 0.1 for generic"
    )
    val_out_list: str | None = Field(default=None, description="'canonical' or a CSV with slide_id: the val_out slides")
    val_in_tiles: int = Field(default=100_000, ge=0)
    val_out_tiles: int = Field(default=100_000, ge=0)
    guidance_tiles: int = Field(default=100_000, ge=0)
    conditioning_tiles: int = Field(default=50_000, ge=0, description="external cohorts: the guidance set")
    reference_tiles: int = Field(default=50_000, ge=0, description="external cohorts: the disjoint reference set")

    @model_validator(mode="after")
    def _fraction_below_one(self) -> CohortConfig:
        if isinstance(self.val_out_slides, float) and not 0.0 < self.val_out_slides < 1.0:
            raise ValueError("cohort.val_out_slides is a count (integer) or a fraction strictly between 0 and 1")
        return self


class FeaturesConfig(_Section):
    """Frozen-backbone features of every kept tile: CLS → cls.parquet, 14×14 tokens → tokens.zarr (docs/features.md)."""

    extractor: str = Field(default="h0-mini", description="a name from cytosyn.nn.backbones.list_backbones()")
    weights: str | None = Field(default=None, description="local .safetensors/.pth file, hf-hub:<repo> when online, or random-init (demo)")
    weights_subkey: str | None = None
    timm_overrides: dict[str, int | float | str | bool] = Field(default_factory=dict, description="e.g. {depth: 2}")
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=4, ge=0, description="DataLoader workers decoding PNGs during the forward")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    chunk_rows: int = Field(default=256, ge=1, description="tiles per Zarr shard file = unit of resumption and of parallel work")


class ShardsConfig(_Section):
    """Shuffled training shards: PNG bytes + CLS + tokens + metadata (docs/shards.md)."""

    shard_size: int = Field(default=4096, ge=1)
    splits: list[Literal["train", "val_in", "val_out"]] = Field(default_factory=lambda: ["train"])


class PipelineConfig(_Section):
    name: str = "cytosyn"
    seed: int = 0
    workers: int = Field(default=1, ge=1)
    dask_address: str | None = None
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    curation: CurationConfig | None = None
    cohort: CohortConfig | None = None
    features: FeaturesConfig | None = None
    shards: ShardsConfig | None = None

    @model_validator(mode="after")
    def _slide_source_has_its_input(self) -> PipelineConfig:
        s = self.slides
        needs = {"folder": ("slides.folder", s.folder), "csv": ("slides.csv", s.csv), "gdc": ("slides.gdc_manifests", s.gdc_manifests or None)}
        if s.source in needs and needs[s.source][1] is None:
            field, _ = needs[s.source]
            hint = " (or pass --slides DIR)" if s.source == "folder" else ""
            raise ValueError(f"slides.source is '{s.source}' but {field} is not set{hint}")
        if s.source == "gdc" and s.folder is None:
            raise ValueError("slides.source is 'gdc' but slides.folder (where the GDC downloads are) is not set")
        if self.shards is not None and self.features is None:
            raise ValueError("shards need features: add a `features:` section (see pipelines/demo.yaml)")
        return self


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file and the fix."""


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read a pipeline YAML, deep-merge ``overrides`` (e.g. command-line options) and validate the result."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline config; pass an existing YAML file (see pipelines/)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(_deep_merge(raw, overrides or {}), source=str(path), base_dir=path.parent)


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_config(raw: dict, source: str = "<config>", base_dir: Path | None = None) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{message} ({len(exc.errors())} error(s) in all)") from None
    return _resolve_paths(cfg, base_dir) if base_dir is not None else cfg


# Every field that may hold a file path, as (section, field). Values that name no file ("canonical",
# "hf-hub:…") are left as they are.
_PATH_FIELDS = (
    ("slides", "folder"), ("slides", "metadata_csv"), ("slides", "csv"), ("slides", "gdc_manifests"),
    ("cohort", "val_out_list"), ("curation", "heads"), ("curation", "weights"), ("features", "weights"),
)


def _resolve_paths(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """Relative paths in a config file are relative to the file, not to the working directory."""

    def fix(value):
        if value is None:
            return None
        if isinstance(value, list):
            return [fix(v) for v in value]
        text = str(value)
        if text in ("canonical", "random-init") or text.startswith("hf-hub:") or Path(text).is_absolute():
            return value
        resolved = (base_dir / text).resolve()
        return resolved if isinstance(value, Path) else str(resolved)

    sections: dict[str, dict] = {}
    for section, field in _PATH_FIELDS:
        if getattr(cfg, section) is not None and hasattr(getattr(cfg, section), field):
            sections.setdefault(section, {})[field] = fix(getattr(getattr(cfg, section), field))
    return cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=fields) for name, fields in sections.items()})


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
