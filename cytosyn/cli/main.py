"""The `cytosyn` command: `cytosyn data …` builds datasets, `cytosyn slide …` inspects slides."""

from __future__ import annotations

import typer

from cytosyn.cli import build as build_cli
from cytosyn.cli import cohort as cohort_cli
from cytosyn.cli import curate as curate_cli
from cytosyn.cli import features as features_cli
from cytosyn.cli import slide as slide_cli

app = typer.Typer(no_args_is_help=True, add_completion=False, help="CytoSyn: H&E latent-diffusion data pipeline and models.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")
slide_app = typer.Typer(no_args_is_help=True, help="Inspect whole-slide images.")
app.add_typer(data_app, name="data")
app.add_typer(slide_app, name="slide")

build_cli.register(data_app)
cohort_cli.register(data_app)
curate_cli.register(data_app)
features_cli.register(data_app)
slide_cli.register(slide_app)


if __name__ == "__main__":
    app()
