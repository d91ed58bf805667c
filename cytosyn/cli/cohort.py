"""`cytosyn data splits | audit | canonical-split | variants` (docs/cohort.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from pydantic import ValidationError

from cytosyn.cli.common import exit_on_errors, fail
from cytosyn.cohort.audit import audit_dataset
from cytosyn.cohort.barcodes import looks_like_tcga
from cytosyn.cohort.selection import select_tiles, write_slide_split
from cytosyn.cohort.splits import CANONICAL_COLUMNS, CANONICAL_SEED, canonical_val_out
from cytosyn.cohort.tcga import canonical_val_out_path
from cytosyn.config import CohortConfig, ConfigError, SlidesConfig, load_config
from cytosyn.io.atomic import write_text_atomic
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides
from cytosyn.io.schema import SLIDES
from cytosyn.pipeline.inventory import inventory_from_source


def _parse_val_out(text: str) -> int | float:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a slide count (1012) or a fraction (0.1)") from None


def _slide_source(gdc: list[Path] | None, slides: Path | None, inventory: Path | None, metadata: Path | None) -> SlidesConfig:
    if gdc:
        return SlidesConfig(source="gdc", gdc_manifests=gdc)
    if slides is not None:
        return SlidesConfig(source="folder", folder=slides, metadata_csv=metadata)
    return SlidesConfig(source="csv", csv=inventory)


def splits(
    out: Annotated[Path, typer.Option(help="dataset root: writes slides.parquet (+ selection/ when candidates/ exist)")],
    gdc_manifest: Annotated[Optional[list[Path]], typer.Option(help="GDC manifest file or folder of them (repeatable)")] = None,
    slides: Annotated[Optional[Path], typer.Option(help="folder of slides")] = None,
    inventory: Annotated[Optional[Path], typer.Option(help="CSV of slides (path, optional slide_id, patient_id, tss_code, project, …)")] = None,
    metadata: Annotated[Optional[Path], typer.Option(help="with --slides: CSV keyed by slide_id giving patient_id, tss_code, project")] = None,
    config: Annotated[Optional[Path], typer.Option(help="pipeline YAML whose seed and cohort section to use")] = None,
    kind: Annotated[Optional[str], typer.Option(help="cohort kind: tcga, generic or external (default: from the names)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="split seed (default: the config's; 0 is the canonical seed)")] = None,
    val_out_slides: Annotated[Optional[str], typer.Option(help="held-out slides: a count (1012) or a fraction (0.1)")] = None,
    val_out_list: Annotated[Optional[str], typer.Option(help="'canonical' or a CSV with slide_id: hold out exactly these")] = None,
    budget: Annotated[Optional[int], typer.Option(help="training tiles (when candidates exist)")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="worker processes for the tile selection")] = None,
) -> None:
    """Slide-level train/val_out split of an inventory and, when candidates exist, the tile selection.

    Without --gdc-manifest/--slides/--inventory, re-splits the slides.parquet already in OUT.
    """
    layout = DatasetLayout(out.resolve())
    sources = [x for x in (gdc_manifest, slides, inventory) if x]
    built = layout.candidates_dir.exists() and any(layout.candidates_dir.glob("*.parquet"))
    errors: list[str] = []
    try:
        if len(sources) > 1:
            raise ConfigError("give only one of --gdc-manifest, --slides, --inventory")
        if sources and built:
            raise ConfigError(f"{out} is a built dataset; omit --gdc-manifest/--slides/--inventory to re-split its slides.parquet")
        if not sources and not layout.slides_parquet.exists():
            raise ConfigError(f"{out}: no slides.parquet to split; give --gdc-manifest, --slides or --inventory")
        own = layout.pipeline_yaml if not sources and layout.pipeline_yaml.exists() else None
        base = load_config(config or own) if (config or own) else None
        # The config's cohort as resolved (budget: null stays null), then the options that were given.
        given = base.cohort.model_dump() if base is not None and base.cohort is not None else {}
        overrides = {"kind": kind, "val_out_list": val_out_list, "budget": budget,
                     "val_out_slides": _parse_val_out(val_out_slides) if val_out_slides else None}
        given.update({k: v for k, v in overrides.items() if v is not None})
        frame = None
        if sources:
            source = _slide_source(gdc_manifest, slides, inventory, metadata)
            frame = inventory_from_source(source, given.get("kind"), given.get("diagnostic_only", True))
        if "kind" not in given:
            names = frame["slide_id"] if frame is not None else read_slides(layout)["slide_id"]
            given["kind"] = "tcga" if any(looks_like_tcga(n) for n in names) else "generic"
        # Validated before anything is written: a bad option must leave OUT as it was.
        cohort = CohortConfig.model_validate(given)
        if frame is not None:
            errors = frame.loc[frame["status"] == "error", "error"].tolist()
            excluded = int((frame["status"] == "excluded").sum())
            if excluded:
                typer.echo(f"{excluded} slide(s) excluded (duplicates, non-diagnostic): reasons in the error column of slides.parquet")
            from cytosyn.pipeline.build import write_slides_manifest

            layout.root.mkdir(parents=True, exist_ok=True)
            # Nothing was opened: the slide-file columns (vendor, size, MPP…) stay empty.
            write_slides_manifest(layout, frame.reindex(columns=[*frame.columns, *(c for c in SLIDES.names if c not in frame)]))
        seed = seed if seed is not None else (base.seed if base is not None else CANONICAL_SEED)
        if built:
            report = select_tiles(layout, cohort, seed, workers or (base.workers if base else 1), base.dask_address if base else None)
        else:
            report = write_slide_split(layout, cohort, seed)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"cohort.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo(report.markdown().split("\n## ")[0].rstrip())
    typer.echo(f"\nslides: {layout.slides_parquet}\nreport: {layout.cohort_report_md}")
    errors += report.errors
    exit_on_errors(errors)


def audit(
    dataset: Annotated[Path, typer.Argument(help="dataset root")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    max_tvd: Annotated[float, typer.Option(help="allowed TVD above the rounding floor, per split")] = 0.05,
) -> None:
    """Check a dataset's splits for leakage and fidelity; exit 1 on any violation."""
    try:
        report = audit_dataset(DatasetLayout(dataset.resolve()), max_tvd=max_tvd)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else report.text())
    if not report.ok:
        raise typer.Exit(1)


def canonical_split(
    gdc: Annotated[list[Path], typer.Argument(help="the 32 GDC manifests, or the folder holding them")],
    out: Annotated[Optional[Path], typer.Option(help="also write the recomputed list here (CSV)")] = None,
) -> None:
    """Recompute the canonical val_out list (the paper's setting) and diff it against the one in manifests/."""
    try:
        fresh = canonical_val_out(gdc)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    if out is not None:
        write_text_atomic(out, fresh.to_csv(index=False, lineterminator="\n"))
    shipped_path = canonical_val_out_path()
    shipped = pd.read_csv(shipped_path, dtype=str, keep_default_na=False)[CANONICAL_COLUMNS]
    added = sorted(set(fresh["slide_id"]) - set(shipped["slide_id"]))
    removed = sorted(set(shipped["slide_id"]) - set(fresh["slide_id"]))
    same_rows = fresh.astype(str).values.tolist() == shipped.astype(str).values.tolist()
    typer.echo(f"recomputed: {len(fresh)} val_out slides; shipped ({shipped_path}): {len(shipped)}")
    if same_rows:
        typer.echo("identical")
        return
    for sid in added[:20]:
        typer.echo(f"+ {sid}")
    for sid in removed[:20]:
        typer.echo(f"- {sid}")
    if not added and not removed:
        typer.echo("same slides, different patient/site/project columns")
    typer.echo(f"DIFFERENT: {len(added)} added, {len(removed)} removed", err=True)
    raise typer.Exit(1)


def variants(
    dataset: Annotated[Path, typer.Argument(help="dataset root")],
    split: Annotated[list[str], typer.Option(help="split(s) to export: train, val_in, val_out, guidance (repeatable)")],
    size: Annotated[int, typer.Option(help="output tile size; 256 = 16 px of context on each side of a 224 px tile")] = 256,
    jpeg_quality: Annotated[Optional[int], typer.Option(help="write JPEG at this quality (70 = DS-MIL) instead of PNG")] = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
) -> None:
    """Context (e.g. 256 px) and/or JPEG variants of the tiles of some splits (paper §4.3)."""
    from cytosyn.cohort.variants import write_variants

    try:
        report = write_variants(DatasetLayout(dataset.resolve()), split, size, jpeg_quality, workers=workers)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{report.name}: {report.tiles} tiles from {report.slides} slides in {dataset / 'variants' / report.name}")
    exit_on_errors(report.errors, "slide(s) failed")


def register(data_app: typer.Typer) -> None:
    data_app.command("splits")(splits)
    data_app.command("audit")(audit)
    data_app.command("canonical-split")(canonical_split)
    data_app.command("variants")(variants)
