"""Helpers for the cohort tests: small dataset roots written with the real io helpers (real Parquet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from click.testing import Result
from typer.testing import CliRunner

from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.hashing import tile_id
from cytosyn.io.layout import DatasetLayout


@dataclass(frozen=True)
class SlideSpec:
    slide_id: str
    patient_id: str
    tss_code: str
    project: str
    nx: int = 6  # candidate grid columns
    ny: int = 5  # candidate grid rows
    status: str = "ok"


def tcga_specs(sites: dict[str, str], patients_per_site: int = 4, slides_per_patient: int = 1, nx: int = 6, ny: int = 5) -> list[SlideSpec]:
    """TCGA-named slides: ``sites`` maps a TSS code to its project."""
    specs = []
    for tss, project in sites.items():
        for p in range(patients_per_site):
            patient = f"TCGA-{tss}-{p:04d}"
            for s in range(slides_per_patient):
                specs.append(SlideSpec(f"{patient}-01Z-00-DX{s + 1}", patient, tss, project, nx, ny))
    return specs


def slides_frame(specs: list[SlideSpec], read0: int = 448) -> pd.DataFrame:
    rows = []
    for s in specs:
        rows.append(
            dict(slide_id=s.slide_id, path=f"/nowhere/{s.slide_id}.svs", patient_id=s.patient_id, tss_code=s.tss_code,
                 project=s.project, sample_type="01", slide_type="DX", vendor="aperio", backend="openslide",
                 width=s.nx * read0, height=s.ny * read0, mpp_x=0.25, mpp_y=0.25, mpp_source="openslide-property",
                 status=s.status, error=None if s.status == "ok" else f"/nowhere/{s.slide_id}.svs: unreadable")
        )
    return pd.DataFrame(rows)


def candidates_frame(slide_id: str, nx: int, ny: int, size: int = 224, mpp: float = 0.5, read0: int = 448, origin: int = 0) -> pd.DataFrame:
    xs, ys = np.meshgrid(origin + np.arange(nx) * read0, origin + np.arange(ny) * read0)
    xs, ys = xs.ravel(), ys.ravel()
    return pd.DataFrame(
        dict(tile_id=[tile_id(slide_id, x, y, size, mpp) for x, y in zip(xs, ys)], slide_id=slide_id, x=xs, y=ys,
             size_px=np.int32(size), mpp=mpp, read_level=np.int32(0), read_size_level0=read0,
             tissue_fraction=np.float32(1.0))
    )


def make_dataset(root: Path, specs: list[SlideSpec], shuffle_seed: int | None = None) -> DatasetLayout:
    """slides.parquet and candidates/<slide_id>.parquet for ``specs`` (only ok slides have candidates).

    ``shuffle_seed`` writes the slide rows and every candidate file's rows in a shuffled order.
    """
    layout = DatasetLayout(root)
    slides = slides_frame(specs)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for s in specs:
        if s.status != "ok":
            continue
        cands = candidates_frame(s.slide_id, s.nx, s.ny)
        if rng is not None:
            cands = cands.iloc[rng.permutation(len(cands))]
        write_parquet_atomic(layout.candidates_path(s.slide_id), cands, schema.CANDIDATES)
    if rng is not None:
        slides = slides.iloc[rng.permutation(len(slides))]
    write_parquet_atomic(layout.slides_parquet, slides, schema.SLIDES)
    return layout


def digest(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern))}


def cli(*args: object) -> Result:
    """Run the real `cytosyn` command in this process (the app imports once per test session)."""
    from cytosyn.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])
