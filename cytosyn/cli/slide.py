"""`cytosyn slide info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cytosyn.cli.common import fail
from cytosyn.config import TissueConfig
from cytosyn.slides import SlideError, open_slide
from cytosyn.tissue import tissue_mask

console = Console()


def slide_facts(path: Path, mpp: float | None, backend: str, objective_power_fallback: bool) -> dict:
    """What a person wants to know about a slide before tiling it."""
    tissue = TissueConfig()
    with open_slide(path, backend=backend, mpp=mpp, objective_power_fallback=objective_power_fallback) as slide:
        mask = tissue_mask(slide.read_at_mpp(tissue.mask_mpp), tissue.mask_mpp, tissue)
        return {
            "path": str(path),
            "vendor": slide.vendor,
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "levels": [
                {"level": i, "width": d[0], "height": d[1], "downsample": round(ds, 4), "mpp": round(slide.mpp_x * ds, 4)}
                for i, (d, ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
            ],
            "mpp_x": slide.mpp_x,
            "mpp_y": slide.mpp_y,
            "mpp_source": slide.mpp.source,
            "objective_power": slide.objective_power,
            "tissue_area_mm2": round(float(mask.sum()) * tissue.mask_mpp**2 / 1e6, 3),
        }


def info(
    path: Annotated[Path, typer.Argument(help="a whole-slide image")],
    mpp: Annotated[Optional[float], typer.Option(help="MPP override (µm/px)")] = None,
    backend: Annotated[str, typer.Option(help="auto | openslide | tiffslide")] = "auto",
    objective_power_fallback: Annotated[bool, typer.Option(help="derive MPP from objective power when nothing else is known")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Vendor, backend, levels, MPP and its source, objective power and estimated tissue area."""
    try:
        facts = slide_facts(path, mpp, backend, objective_power_fallback)
    except SlideError as exc:
        raise fail(exc, code=1) from None
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    console.print(f"[bold]{path.name}[/bold]")
    console.print(f"  vendor {facts['vendor']}, backend {facts['backend']}, {facts['dimensions'][0]}×{facts['dimensions'][1]} px")
    console.print(f"  MPP {facts['mpp_x']:.4f} × {facts['mpp_y']:.4f} µm/px (from {facts['mpp_source']})")
    power = facts["objective_power"]
    console.print(f"  objective power {power:g}x" if power else "  objective power unknown")
    console.print(f"  estimated tissue area {facts['tissue_area_mm2']:.2f} mm²")
    for lv in facts["levels"]:
        console.print(f"  level {lv['level']}: {lv['width']}×{lv['height']} (downsample {lv['downsample']:g}, {lv['mpp']:.4f} µm/px)")


def register(slide_app: typer.Typer) -> None:
    slide_app.command("info")(info)
