"""`cytosyn data curate train` and `cytosyn data curate predict`: the artifact classifier (docs/curation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from cytosyn.cli.common import exit_on_errors, fail
from cytosyn.config import ConfigError, CurationConfig, PipelineConfig, load_config
from cytosyn.io.layout import DatasetLayout

# The curation modules (torch, timm) are imported inside the commands so that every other `cytosyn`
# command starts without them.

curate_app = typer.Typer(no_args_is_help=True, help="Artifact curation: fold heads on frozen ViT-S features.")

Backbone = Annotated[Optional[str], typer.Option(help="registered backbone (default from config: ibot-vit-s)")]
Weights = Annotated[Optional[str], typer.Option(help="local backbone weights: .safetensors, or a torch file (iBOT/DINO teacher checkpoints work); random-init for a demo")]
Subkey = Annotated[Optional[str], typer.Option(help="entry of the checkpoint holding the weights (e.g. teacher)")]
Override = Annotated[Optional[list[str]], typer.Option("--timm-override", help="architecture override KEY=VALUE for timm, repeatable (e.g. depth=4)")]
BatchSize = Annotated[Optional[int], typer.Option(min=1, help="tiles per forward pass")]
Workers = Annotated[Optional[int], typer.Option(min=0, help="DataLoader workers decoding PNGs")]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")]
TrainThreshold = Annotated[Optional[float], typer.Option(help="artifact probability at or above which the report counts a tile as artifact; recorded in the heads as predict's default (default 0.5)")]
PredictThreshold = Annotated[Optional[float], typer.Option(help="artifact probability at or above which a tile is removed (default: curation.threshold when the config sets it, else the threshold recorded in the heads)")]
Config = Annotated[Optional[Path], typer.Option("--config", help="pipeline YAML whose `curation` section gives the defaults (default: DATASET/pipeline.yaml)")]

# Every curation error (ConfigError, AnnotationsError, TrainingError, HeadsError, BackboneMismatchError,
# WeightsError) is a ValueError.
FATAL = (ValueError, FileNotFoundError)


def _value(text: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(text.lower(), text)


def _curation_overrides(**options) -> dict:
    overrides = {k: v for k, v in options.items() if v is not None and k != "timm_override"}
    if "weights" in overrides and overrides["weights"] != "random-init":
        overrides["weights"] = str(Path(overrides["weights"]).resolve())
    if options.get("timm_override"):
        pairs = {}
        for item in options["timm_override"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--timm-override {item!r}: expected KEY=VALUE, e.g. depth=4")
            pairs[key.strip()] = _value(value.strip())
        overrides["timm_overrides"] = pairs
    return overrides


def _pipeline_config(dataset: Path | None, config: Path | None, overrides: dict, seed: int | None) -> PipelineConfig | None:
    """The config to use: --config, else the dataset's pipeline.yaml, else None (curation defaults)."""
    source = config or (dataset / "pipeline.yaml" if dataset is not None and (dataset / "pipeline.yaml").exists() else None)
    if source is None:
        return None
    extra = {"curation": overrides} | ({"seed": seed} if seed is not None else {})
    return load_config(source, extra)


@curate_app.command("train")
def train(
    annotations: Annotated[Path, typer.Option(help="CSV/Parquet: image_path or slide_id+x+y+mpp, label tissue/artifact, optional artifact_type")],
    dataset: Annotated[Optional[Path], typer.Argument(help="dataset root the annotations refer to (needed for slide-coordinate rows)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for the heads and the report (default: DATASET/curation/heads)")] = None,
    config: Config = None,
    backbone: Backbone = None,
    weights: Weights = None,
    weights_subkey: Subkey = None,
    timm_override: Override = None,
    folds: Annotated[Optional[int], typer.Option(min=2, help="cross-validation folds, grouped by slide (default 5)")] = None,
    c: Annotated[Optional[float], typer.Option("--C", help="inverse L2 strength of the logistic regression (default 1.0)")] = None,
    threshold: TrainThreshold = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the fold split (default: the config's seed, else 0)")] = None,
) -> None:
    """Train the fold heads: frozen-backbone features, StratifiedGroupKFold by slide, out-of-fold report."""
    from cytosyn.curation.annotations import AnnotationsError, read_annotations, resolve_annotations
    from cytosyn.curation.features import backbone_setup
    from cytosyn.curation.train import train_heads

    try:
        overrides = _curation_overrides(
            backbone=backbone, weights=weights, weights_subkey=weights_subkey, timm_override=timm_override,
            folds=folds, C=c, threshold=threshold, batch_size=batch_size, num_workers=workers, device=device,
        )
        cfg = _pipeline_config(dataset, config, overrides, seed)
        ccfg = cfg.curation if cfg is not None else CurationConfig.model_validate(overrides)
        run_seed = cfg.seed if cfg is not None else (seed or 0)
        if out is None and dataset is None:
            raise ConfigError("pass --out (where the heads go) or DATASET (heads go to DATASET/curation/heads)")
        layout = DatasetLayout(dataset.resolve()) if dataset is not None else None
        target = out or layout.curation_heads_dir
        resolved = resolve_annotations(read_annotations(annotations), annotations, layout)
        if resolved.table.empty:
            why = f"{len(resolved.errors)} bad row(s), the first: {resolved.errors[0]}" if resolved.errors else "the file has no rows"
            raise AnnotationsError(f"{annotations}: no usable annotation ({why}); fix the rows and run again")
        setup = backbone_setup(ccfg, run_seed)
        if layout is not None:
            # The dataset's per-slide feature cache: `curate predict` then reuses what training embedded.
            def cache_for(slide_id: str) -> Path:
                return layout.curation_features_path(setup.fingerprint, slide_id)
        else:
            def cache_for(slide_id: str) -> Path:
                return target / "features" / setup.fingerprint / "annotations.parquet"
        outcome = train_heads(resolved.table, setup, ccfg, run_seed, target, cache_for, errors=resolved.errors)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(ConfigError(f"curation.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")) from None
    except FATAL as exc:
        raise fail(exc) from None
    m = outcome.result.metrics
    typer.echo(
        f"heads: {outcome.heads_json.parent}  ({len(outcome.result.ensemble.heads)} folds, {m['n']} annotations, {m['n_artifact']} artifact)\n"
        f"out-of-fold ROC-AUC {m['roc_auc']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}; report: {outcome.report_md}"
    )
    exit_on_errors(outcome.errors)


@curate_app.command("predict")
def predict(
    dataset: Annotated[Path, typer.Argument(help="dataset root built by `cytosyn data build`")],
    heads: Annotated[Optional[Path], typer.Option(help="heads folder (default: DATASET/curation/heads)")] = None,
    config: Config = None,
    weights: Annotated[Optional[str], typer.Option(help="where the backbone weights the heads were trained with are on this machine (default: the path recorded in the heads; the sha256 must match either way)")] = None,
    weights_subkey: Annotated[Optional[str], typer.Option(help="entry of the checkpoint holding the weights (default: the one recorded in the heads)")] = None,
    threshold: PredictThreshold = None,
    top_up: Annotated[Optional[bool], typer.Option("--top-up/--no-top-up", help="replace removed tiles with unused cells of the same slide")] = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
) -> None:
    """Curate a dataset: filters, fold-averaged artifact_prob, `kept` in tiles/, optional top-up."""
    from cytosyn.curation.predict import PREDICT_REPORT_MD, curate_with_heads

    try:
        layout = DatasetLayout(dataset.resolve())
        overrides = _curation_overrides(threshold=threshold, top_up=top_up, batch_size=batch_size, num_workers=workers, device=device)
        cfg = _pipeline_config(dataset, config, overrides, None)
        if cfg is None:
            raise ConfigError(f"{layout.pipeline_yaml}: not found; pass --config with the pipeline YAML this dataset was built with")
        summary = curate_with_heads(layout, cfg, heads or layout.curation_heads_dir, weights, weights_subkey)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(ConfigError(f"curation.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")) from None
    except FATAL as exc:
        raise fail(exc) from None
    t = summary.totals()
    typer.echo(
        f"curated {t['slides']} slide(s): {t['kept']} of {t['tiles']} tiles kept "
        f"(filters {sum(t['filtered'].values())}, classifier {t['classifier_removed']}, unreadable {t['unreadable']}); "
        f"top-up {t['topup_kept']} kept of {t['topup_drawn']} drawn, shortfall {t['shortfall']}\n"
        f"report: {layout.curation_dir / PREDICT_REPORT_MD}"
    )
    exit_on_errors(summary.errors)


def register(data_app: typer.Typer) -> None:
    data_app.add_typer(curate_app, name="curate")
