"""The build report: reports/build.md, a tiles-per-project plot and a contact sheet of QC thumbnails."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cytosyn.config import PipelineConfig
from cytosyn.io.atomic import write_bytes_atomic, write_text_atomic
from cytosyn.io.layout import DatasetLayout
from cytosyn.tiling.qc import OUTLINE, SPLIT_COLOURS

CONTACT_CELL_PX = 320
CONTACT_COLUMNS = 4


def _markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |")
    return "\n".join(lines)


def summary_frame(slides: pd.DataFrame) -> pd.DataFrame:
    """Per-slide summary rows shown on the console and in the report."""
    def column(name: str) -> pd.Series:
        # A build where no slide could be opened has no per-slide results at all.
        return slides[name] if name in slides else pd.Series(pd.NA, index=slides.index, dtype=object)

    return pd.DataFrame(
        {
            "slide_id": slides["slide_id"],
            "project": column("project"),
            "status": slides["status"],
            "mpp": pd.to_numeric(column("mpp_x"), errors="coerce").round(4),
            "mpp source": column("mpp_source"),
            "candidates": pd.to_numeric(column("n_candidates"), errors="coerce").astype("Int64"),
            "tiles": pd.to_numeric(column("n_tiles"), errors="coerce").astype("Int64"),
            "error": column("error"),
        }
    )


def _tiles_per_project_png(slides: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary_frame(slides)
    counts = summary["tiles"].fillna(0).astype(int).groupby(summary["project"].fillna("?")).sum().sort_index()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.bar(counts.index.astype(str), counts.values, color="#a0446e")
    ax.set_ylabel("tiles")
    ax.set_title("Tiles per project")
    fig.tight_layout()
    buf = io.BytesIO()
    # Fixed metadata keeps the PNG byte-identical across reruns.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _contact_sheet(layout: DatasetLayout, slide_ids: list[str]) -> bytes | None:
    cells = []
    for slide_id in slide_ids:
        img = cv2.imread(str(layout.qc_path(slide_id)))
        if img is None:
            continue
        scale = CONTACT_CELL_PX / max(img.shape[:2])
        img = cv2.resize(img, (max(1, int(img.shape[1] * scale)), max(1, int(img.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        cell = np.full((CONTACT_CELL_PX + 18, CONTACT_CELL_PX, 3), 255, np.uint8)
        cell[18 : 18 + img.shape[0], : img.shape[1]] = img
        cv2.putText(cell, slide_id[:40], (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        cells.append(cell)
    if not cells:
        return None
    while len(cells) % CONTACT_COLUMNS:
        cells.append(np.full_like(cells[0], 255))
    rows = [np.hstack(cells[i : i + CONTACT_COLUMNS]) for i in range(0, len(cells), CONTACT_COLUMNS)]
    ok, buf = cv2.imencode(".jpg", np.vstack([*rows, _legend(rows[0].shape[1])]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def _legend(width: int) -> np.ndarray:
    """A strip naming what the thumbnails' colours mean: the tissue outline and each split's boxes."""
    strip = np.full((24, width, 3), 255, np.uint8)
    x = 6
    for label, colour in [("tissue mask", OUTLINE), *((f"{split} tiles", c) for split, c in SPLIT_COLOURS.items())]:
        cv2.rectangle(strip, (x, 7), (x + 14, 17), colour, 2)
        cv2.putText(strip, label, (x + 20, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        x += 30 + cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0]
    return strip


def _stage_lines(layout: DatasetLayout) -> list[str]:
    """One line per later stage that ran, pointing at its own report or output."""
    lines = []
    for name, title in (("cohort.md", "cohort selection and splits"), ("curation.md", "artifact curation")):
        if (layout.reports_dir / name).exists():
            lines.append(f"- {title}: [{name}]({name})")
    for folder in sorted((layout.root / "features").glob("*/tokens.index.parquet")):
        rows = pq.ParquetFile(folder).metadata.num_rows
        lines.append(f"- features ({folder.parent.name}): {rows} tiles → `features/{folder.parent.name}/`")
    for index in sorted((layout.root / "shards").glob("*/index.parquet")):
        rows = pq.ParquetFile(index).metadata.num_rows
        n = len(list(index.parent.glob("shard-*.parquet")))
        lines.append(f"- shards ({index.parent.name}): {rows} samples in {n} shard(s) → `shards/{index.parent.name}/`")
    return lines


def write_build_report(layout: DatasetLayout, cfg: PipelineConfig, slides: pd.DataFrame) -> None:
    summary = summary_frame(slides)
    n_ok = int((slides["status"] == "ok").sum())
    n_err = int((slides["status"] == "error").sum())
    n_excl = int((slides["status"] == "excluded").sum())
    tiles = int(summary["tiles"].fillna(0).sum())
    parts = [
        f"# Build report: {cfg.name}",
        "",
        f"- slides: {len(slides)} ({n_ok} ok, {n_err} error, {n_excl} excluded)",
        f"- tiles: {tiles} at {cfg.tiling.size_px} px, {cfg.tiling.mpp} µm/px (lossless PNG)",
        f"- seed: {cfg.seed}",
        "",
        *_stage_lines(layout),
        "",
        "![tiles per project](tiles_per_project.png)",
        "",
        "![QC thumbnails](qc_overview.jpg)",
        "",
        "## Slides",
        "",
        _markdown_table(summary),
        "",
    ]
    layout.reports_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(layout.reports_dir / "tiles_per_project.png", _tiles_per_project_png(slides))
    sheet = _contact_sheet(layout, slides.loc[slides["status"] == "ok", "slide_id"].tolist())
    if sheet is not None:
        write_bytes_atomic(layout.reports_dir / "qc_overview.jpg", sheet)
    write_text_atomic(layout.reports_dir / "build.md", "\n".join(parts))
