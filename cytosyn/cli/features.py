"""`cytosyn data features` and `cytosyn data shards`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from cytosyn.cli.common import exit_on_errors, fail
from cytosyn.config import ConfigError, FeaturesConfig, PipelineConfig, ShardsConfig, load_config
from cytosyn.io.layout import DatasetLayout

# torch and timm are imported inside the commands: every `cytosyn` invocation would pay for them here.


def _dataset_config(layout: DatasetLayout, overrides: dict) -> tuple[FeaturesConfig, ShardsConfig, int]:
    """The dataset's own pipeline.yaml (when it has one) with the command-line options on top."""
    if layout.pipeline_yaml.exists():
        cfg: PipelineConfig = load_config(layout.pipeline_yaml, overrides)
        return cfg.features or FeaturesConfig(), cfg.shards or ShardsConfig(), cfg.seed
    try:
        return FeaturesConfig(**overrides.get("features", {})), ShardsConfig(**overrides.get("shards", {})), 0
    except ValueError as exc:
        raise ConfigError(f"invalid option: {exc}") from None


def features(
    dataset: Annotated[Path, typer.Argument(help="dataset root (built by `cytosyn data build`)")],
    extractor: Annotated[Optional[str], typer.Option(help="backbone from the registry (default h0-mini)")] = None,
    weights: Annotated[Optional[str], typer.Option(help="local .safetensors/.pth file, hf-hub:<repo> when online, or random-init (demo)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    num_workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader workers decoding PNGs")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
) -> None:
    """CLS → features/<extractor>/cls.parquet and 14×14 patch tokens → tokens.zarr for every kept tile."""
    from cytosyn.features import compute_features

    layout = DatasetLayout(dataset)
    if weights is not None and not weights.startswith("hf-hub:") and weights != "random-init":
        weights = str(Path(weights).resolve())
    options = {"extractor": extractor, "weights": weights, "batch_size": batch_size, "num_workers": num_workers, "device": device}
    try:
        fcfg, _, _ = _dataset_config(layout, {"features": {k: v for k, v in options.items() if v is not None}})
        result = compute_features(layout, fcfg)
    except ValueError as exc:  # ConfigError, FeaturesError, WeightsError, an unknown backbone
        raise fail(exc) from None
    typer.echo(
        f"features: {result.out_dir}  rows={result.rows} chunks={result.chunks} computed={result.computed} "
        f"skipped={result.skipped} complete={result.complete}"
    )
    exit_on_errors(
        result.errors, "tile(s) failed",
        " (their chunks stay unfinished, so no cls.parquet and no shards yet: restore the PNGs and rerun, docs/features.md)",
    )


def shards(
    dataset: Annotated[Path, typer.Argument(help="dataset root with features computed")],
    split: Annotated[Literal["train", "val_in", "val_out"], typer.Option(help="which split to shard")] = "train",
    shard_size: Annotated[Optional[int], typer.Option(min=1, help="samples per shard (default 4096)")] = None,
    extractor: Annotated[Optional[str], typer.Option(help="whose features to pack (default h0-mini)")] = None,
) -> None:
    """Shuffled shards/<split>/shard-NNNNN.parquet (PNG bytes, CLS, tokens, metadata) + index.parquet + shards.json."""
    from cytosyn.features import FeaturesError
    from cytosyn.shards import ShardsError, build_shards

    layout = DatasetLayout(dataset)
    overrides: dict = {}
    if shard_size is not None:
        overrides["shards"] = {"shard_size": shard_size}
    if extractor is not None:
        overrides["features"] = {"extractor": extractor}
    try:
        fcfg, scfg, seed = _dataset_config(layout, overrides)
        result = build_shards(layout, split, extractor=fcfg.extractor, shard_size=scfg.shard_size, seed=seed)
    except (ConfigError, ShardsError, FeaturesError, FileNotFoundError) as exc:
        raise fail(exc) from None
    typer.echo(
        f"shards: {result.out_dir}  samples={result.samples} shards={result.shards} written={result.written} "
        f"skipped={result.skipped} complete={result.complete}"
    )
    exit_on_errors(result.errors, "shard(s) failed")


def register(data_app: typer.Typer) -> None:
    data_app.command("features")(features)
    data_app.command("shards")(shards)
