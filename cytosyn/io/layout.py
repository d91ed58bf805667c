"""Where everything lives under a dataset root (DESIGN.md §3). Paths in manifests are relative to the root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- top-level files
    @property
    def pipeline_yaml(self) -> Path:
        return self.root / "pipeline.yaml"

    @property
    def slides_parquet(self) -> Path:
        return self.root / "slides.parquet"

    # --- folders
    @property
    def masks_dir(self) -> Path:
        return self.root / "masks"

    @property
    def qc_dir(self) -> Path:
        return self.root / "qc"

    @property
    def candidates_dir(self) -> Path:
        return self.root / "candidates"

    @property
    def selection_dir(self) -> Path:
        return self.root / "selection"

    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def curation_dir(self) -> Path:
        return self.root / "curation"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def features_dir(self, extractor: str) -> Path:
        return self.root / "features" / extractor

    def shards_dir(self, split: str) -> Path:
        return self.root / "shards" / split

    # --- per-slide files
    def mask_path(self, slide_id: str) -> Path:
        return self.masks_dir / f"{slide_id}.png"

    def qc_path(self, slide_id: str) -> Path:
        return self.qc_dir / f"{slide_id}.jpg"

    def candidates_path(self, slide_id: str) -> Path:
        return self.candidates_dir / f"{slide_id}.parquet"

    def selection_path(self, slide_id: str) -> Path:
        return self.selection_dir / f"{slide_id}.parquet"

    def tiles_path(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.parquet"

    def slide_images_dir(self, project: str, slide_id: str) -> Path:
        return self.root / _slide_images(project, slide_id)

    def tile_image_relpath(self, project: str, slide_id: str, tile_id: str) -> str:
        """Relative path stored in the `image_path` column."""
        return f"{_slide_images(project, slide_id)}/{tile_id}.png"

    # --- curation (docs/curation.md)
    @property
    def curation_heads_dir(self) -> Path:
        """The fold heads (heads.safetensors + heads.json) and the cross-validation report."""
        return self.curation_dir / "heads"

    def curation_features_path(self, fingerprint: str, slide_id: str) -> Path:
        """Cached frozen-backbone features and filter measures of one slide's tiles, per backbone."""
        return self.curation_dir / "features" / fingerprint / f"{slide_id}.parquet"

    def curation_predictions_path(self, slide_id: str) -> Path:
        """Per-tile predictions of one slide: per-head probabilities, filter verdicts, top-up marks."""
        return self.curation_dir / "predictions" / f"{slide_id}.parquet"

    def curation_annotation_tile_path(self, slide_id: str, tile_id: str) -> Path:
        """A tile read for an annotation given by slide coordinates that the dataset never extracted."""
        return self.curation_dir / "annotation_tiles" / slide_id / f"{tile_id}.png"

    def resolve(self, relpath: str) -> Path:
        return self.root / relpath

    # --- cohort stage (docs/cohort.md)
    @property
    def cohort_report_json(self) -> Path:
        return self.reports_dir / "cohort.json"

    @property
    def cohort_report_md(self) -> Path:
        return self.reports_dir / "cohort.md"

    def variants_dir(self, variant: str) -> Path:
        return self.root / "variants" / variant

    def variant_tiles_path(self, variant: str, slide_id: str) -> Path:
        return self.variants_dir(variant) / "tiles" / f"{slide_id}.parquet"

    def variant_slide_images_dir(self, variant: str, project: str, slide_id: str) -> Path:
        return self.root / "variants" / variant / _slide_images(project, slide_id)

    def variant_image_relpath(self, variant: str, project: str, slide_id: str, tile_id: str, ext: str) -> str:
        return f"variants/{variant}/{_slide_images(project, slide_id)}/{tile_id}.{ext}"

    # --- features and shards (docs/features.md, docs/shards.md)
    def features_cls_path(self, extractor: str) -> Path:
        return self.features_dir(extractor) / "cls.parquet"

    def features_tokens_path(self, extractor: str) -> Path:
        return self.features_dir(extractor) / "tokens.zarr"

    def features_index_path(self, extractor: str) -> Path:
        return self.features_dir(extractor) / "tokens.index.parquet"

    def shard_path(self, split: str, shard: int) -> Path:
        return self.shards_dir(split) / f"shard-{shard:05d}.parquet"

    def shards_index_path(self, split: str) -> Path:
        return self.shards_dir(split) / "index.parquet"

    def shards_manifest_path(self, split: str) -> Path:
        return self.shards_dir(split) / "shards.json"


def _slide_images(project: str, slide_id: str) -> str:
    """The folder of one slide's images, relative to the dataset root (or to a variant's folder)."""
    return f"images/{project}/{slide_id}"
