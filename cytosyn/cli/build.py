"""`cytosyn data build`."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from cytosyn.cli.common import exit_on_errors, fail
from cytosyn.config import ConfigError, load_config
from cytosyn.pipeline.build import build_dataset
from cytosyn.pipeline.report import summary_frame

DEMO_OUT = Path("cytosyn-demo")
# Wide enough for full TCGA barcodes even when stdout is not a terminal (CI logs, pipes).
console = Console(width=max(shutil.get_terminal_size((140, 24)).columns, 120))


def demo_config_path() -> Path:
    return Path(str(resources.files("cytosyn") / "resources" / "demo.yaml"))


def build(
    pipeline: Annotated[Optional[Path], typer.Argument(help="pipeline YAML; omit to build the embedded demo")] = None,
    out: Annotated[Optional[Path], typer.Option(help="dataset root (default: ./cytosyn-demo for the demo, ./<name> otherwise)")] = None,
    slides: Annotated[Optional[Path], typer.Option(help="folder of slides (overrides the config's slide source)")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="MPP override for every slide (µm/px)")] = None,
    objective_power_fallback: Annotated[
        bool, typer.Option(help="for a slide with no MPP, derive one from its objective power (10 / power; flagged in slides.parquet)")
    ] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="worker processes (a local Dask cluster when > 1)")] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="address of an existing Dask scheduler")] = None,
) -> None:
    """Build a dataset: slides → tissue → candidates → selection → lossless PNG tiles → reports."""
    overrides: dict = {}
    if workers is not None:
        overrides["workers"] = workers
    if dask_address is not None:
        overrides["dask_address"] = dask_address
    if slides is not None:
        overrides.setdefault("slides", {}).update(source="folder", folder=str(slides.resolve()))
    if mpp is not None:
        overrides.setdefault("slides", {})["mpp"] = mpp
    if objective_power_fallback:
        overrides.setdefault("slides", {})["objective_power_fallback"] = True
    try:
        cfg = load_config(pipeline or demo_config_path(), overrides)
    except ConfigError as exc:
        raise fail(exc) from None
    root = out or (DEMO_OUT if pipeline is None else Path(cfg.name))
    try:
        result = build_dataset(cfg, root)
    except (ConfigError, ValueError, FileNotFoundError) as exc:  # a missing slide folder, a bad slide CSV
        raise fail(exc) from None
    _print_summary(result.slides)
    console.print(f"dataset: {result.root}  (report: {result.root / 'reports' / 'build.md'})")
    exit_on_errors(result.errors, "slide(s) or tile(s) failed")


def _print_summary(slides) -> None:
    table = Table(title="CytoSyn build")
    frame = summary_frame(slides).drop(columns=["error"])
    for col in frame.columns:
        table.add_column(col, justify="right" if col in ("mpp", "candidates", "tiles") else "left")
    for row in frame.itertuples(index=False):
        style = {"error": "red", "excluded": "yellow"}.get(row.status)
        table.add_row(*["" if pd.isna(v) else str(v) for v in row], style=style)
    console.print(table)


def register(data_app: typer.Typer) -> None:
    data_app.command("build")(build)
