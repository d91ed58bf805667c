"""Re-opening a dataset's slide exactly as the build opened it, to read more tiles later."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cytosyn.io.layout import DatasetLayout
from cytosyn.slides import Slide, open_slide


def open_recorded_slide(layout: DatasetLayout, info: pd.Series | dict) -> Slide:
    """Open the slide of a slides.parquet row with the backend and MPP source the build recorded,
    so a tile read now lands on the same pixels as the build's tiles."""
    path = Path(str(info["path"]))
    path = path if path.is_absolute() else layout.resolve(str(path))
    source = info.get("mpp_source")
    override = float(info["mpp_x"]) if source == "override" else None
    backend = info.get("backend") if info.get("backend") in ("openslide", "tiffslide") else "auto"
    return open_slide(path, backend=backend, mpp=override, objective_power_fallback=source == "objective-power")
