"""How every command reports trouble: one `error:` line and exit 2 for a fatal problem; a list of
per-item failures and exit 1 when the rest of the batch went through."""

from __future__ import annotations

import typer

from cytosyn.errors import one_line

MAX_LISTED = 50


def fail(problem: object, code: int = 2) -> typer.Exit:
    """Print ``error: <problem>`` on one line to stderr; return the Exit for the caller to raise."""
    typer.echo(f"error: {one_line(problem, limit=2000)}", err=True)
    return typer.Exit(code)


def exit_on_errors(errors: list[str], what: str = "problem(s)", hint: str = "") -> None:
    """List per-item failures on stderr and exit 1; do nothing when there are none."""
    if not errors:
        return
    typer.echo(f"{len(errors)} {what}{hint}:", err=True)
    for err in errors[:MAX_LISTED]:
        typer.echo(f"  {err}", err=True)
    if len(errors) > MAX_LISTED:
        typer.echo(f"  … and {len(errors) - MAX_LISTED} more (see the report)", err=True)
    raise typer.Exit(1)
