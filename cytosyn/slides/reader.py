"""`open_slide`: one object over OpenSlide and tiffslide, and reads at an exact target MPP.

A read at a target MPP takes the finest pyramid level that is not coarser than the target, reads the
level-0 footprint ``size_px · mpp / slide_mpp`` there, and resizes it with area interpolation to exactly
``size_px``. Alpha is composited on white, so both backends return the same RGB pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from cytosyn.errors import one_line
from cytosyn.slides.mpp import MPP, MissingMPPError, objective_power, resolve_mpp

Backend = Literal["auto", "openslide", "tiffslide"]
# A level counts as "not coarser" than the target within this relative tolerance: pyramid
# downsamples are stored rounded (4.0004 for 4), and that rounding must not push a read to a 4×
# finer level. A coarser level is never read; only a slide whose level 0 is itself coarser than the
# target (a 20x scan at 0.502 µm/px) is resized up, by that small factor.
LEVEL_TOLERANCE = 1e-3
# Whole-level reads (masks, thumbnails) go in strips of about this many pixels (128 MiB of RGBA),
# so a wide slide without a pyramid does not need its whole level in memory.
STRIP_PIXELS = 1 << 25


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class Footprint:
    """How a tile of ``size_px`` at ``mpp`` is read: level, level-0 size, size at that level."""

    read_level: int
    size_level0_x: float
    size_level0_y: float
    read_w: int
    read_h: int

    @property
    def read_size_level0(self) -> int:
        return int(round(self.size_level0_x))


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an un-premultiplied RGBA image laid on white: 255 − (255 − c)·α/255, rounded.

    Inside a slide alpha is 255 everywhere, and that common case costs one comparison.
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    inverse = (255 - rgba[..., :3]).astype(np.uint16) * alpha[..., None].astype(np.uint16)
    return (255 - (inverse + 127) // 255).astype(np.uint8)


def _open_backend(path: Path, backend: str):
    if backend == "openslide":
        import openslide

        return openslide.OpenSlide(str(path)), "openslide"
    if backend == "tiffslide":
        import tiffslide

        return tiffslide.TiffSlide(str(path)), "tiffslide"
    raise ValueError(f"unknown backend '{backend}' (use auto, openslide or tiffslide)")


class Slide:
    """An open whole-slide image. Use as a context manager, or call ``close``."""

    def __init__(self, path: Path, handle, backend: str, mpp: MPP):
        self.path = path
        self._handle = handle
        self.backend = backend
        self.mpp = mpp
        self.properties: dict[str, str] = {k: str(v) for k, v in handle.properties.items()}
        self.level_count: int = handle.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(map(int, d)) for d in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.vendor: str = self.properties.get(f"{backend}.vendor") or "generic-tiff"
        self.objective_power: float | None = objective_power(self.properties)

    # --- basic facts
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp_x(self) -> float:
        return self.mpp.x

    @property
    def mpp_y(self) -> float:
        return self.mpp.y

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({self.path.name!r}, {self.backend}, {w}x{h}, mpp={self.mpp.x:.4f} [{self.mpp.source}])"

    # --- reads
    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level``, top-left (x, y) in level-0 pixels; alpha composited on white."""
        try:
            if self.backend == "tiffslide":
                return self._read_tiffslide(int(x), int(y), int(level), int(w), int(h))
            arr = np.asarray(self._handle.read_region((int(x), int(y)), int(level), (int(w), int(h))))
        except Exception as exc:  # noqa: BLE001 - every backend failure becomes one readable error
            raise SlideError(
                f"{self.path}: cannot read region ({x},{y}) level {level}: {one_line(exc)}; the file may be truncated or corrupt — re-download it"
            ) from None
        return composite_on_white(arr)

    def _read_tiffslide(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """tiffslide pads outside the image with black; OpenSlide's transparent pixels composite to
        white. Reading only the part inside the level onto a white canvas makes the two agree."""
        arr = np.asarray(self._handle.read_region((x, y), level, (w, h), as_array=True, padding=False))[..., :3]
        if arr.shape[:2] == (h, w):
            return np.ascontiguousarray(arr)
        down = self.level_downsamples[level]
        # tiffslide's own mapping of a level-0 location to the level (truncation, as int() does)
        left, top = max(0, -int(x / down)), max(0, -int(y / down))
        canvas = np.full((h, w, 3), 255, np.uint8)
        canvas[top : top + arr.shape[0], left : left + arr.shape[1]] = arr
        return canvas

    def level_for_mpp(self, mpp: float) -> int:
        """The finest level not coarser than ``mpp`` (the coarsest such level, to read the fewest pixels)."""
        best = 0
        for level, down in enumerate(self.level_downsamples):
            if self.mpp_x * down <= mpp * (1 + LEVEL_TOLERANCE) and self.mpp_y * down <= mpp * (1 + LEVEL_TOLERANCE):
                if down >= self.level_downsamples[best]:
                    best = level
        return best

    def footprint(self, size_px: int, mpp: float) -> Footprint:
        level = self.level_for_mpp(mpp)
        sx, sy = size_px * mpp / self.mpp_x, size_px * mpp / self.mpp_y
        down = self.level_downsamples[level]
        return Footprint(level, sx, sy, max(1, int(round(sx / down))), max(1, int(round(sy / down))))

    def read_region_at_mpp(self, x: int, y: int, size_px: int, mpp: float, footprint: Footprint | None = None) -> np.ndarray:
        """A ``size_px``×``size_px`` RGB tile at exactly ``mpp`` µm/px whose level-0 top-left is (x, y)."""
        fp = footprint or self.footprint(size_px, mpp)
        region = self.read_region(x, y, fp.read_level, fp.read_w, fp.read_h)
        if region.shape[:2] == (size_px, size_px):
            return region
        return cv2.resize(region, (size_px, size_px), interpolation=cv2.INTER_AREA)

    def read_at_mpp(self, mpp: float) -> np.ndarray:
        """The whole slide as RGB at (about) ``mpp`` µm/px, read in strips so memory stays bounded.

        The output has ``ceil(W·mpp_x/mpp)`` columns and ``ceil(H·mpp_y/mpp)`` rows.
        """
        level = self.level_for_mpp(mpp)
        lw, lh = self.level_dimensions[level]
        down = self.level_downsamples[level]
        w0, h0 = self.dimensions
        out_w = max(1, math.ceil(w0 * self.mpp_x / mpp))
        out_h = max(1, math.ceil(h0 * self.mpp_y / mpp))
        scale_y = out_h / lh
        strip_rows = max(1, STRIP_PIXELS // lw)
        rows = []
        for top in range(0, lh, strip_rows):
            strip_h = min(strip_rows, lh - top)
            strip = self.read_region(0, int(round(top * down)), level, lw, strip_h)
            out_top, out_bottom = int(round(top * scale_y)), int(round((top + strip_h) * scale_y))
            if out_bottom > out_top:
                rows.append(cv2.resize(strip, (out_w, out_bottom - out_top), interpolation=cv2.INTER_AREA))
        return np.concatenate(rows, axis=0)


def open_slide(
    path: str | Path,
    backend: Backend = "auto",
    mpp: float | None = None,
    objective_power_fallback: bool = False,
) -> Slide:
    """Open a whole-slide image. Raises `SlideError` with a one-line reason naming the file.

    ``backend="auto"`` tries OpenSlide (more formats, DICOM) then tiffslide. ``mpp`` overrides the
    slide's metadata; without it a slide with no MPP is an error that says how to give one.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file; check the path or the slide list")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file; re-download it")
    candidates = ["openslide", "tiffslide"] if backend == "auto" else [backend]
    reasons = []
    for name in candidates:
        try:
            handle, used = _open_backend(path, name)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot open the file: try the next one
            reasons.append(f"{name}: {one_line(exc)}")
            continue
        try:
            # Reading one pixel catches files whose header opens but whose pixel data is unreadable.
            level = handle.level_count - 1
            handle.read_region((0, 0), level, (1, 1))
        except Exception as exc:  # noqa: BLE001
            handle.close()
            reasons.append(f"{name}: pixel data unreadable ({one_line(exc)})")
            continue
        try:
            resolved = resolve_mpp(handle.properties, mpp, objective_power_fallback, name=str(path))
        except MissingMPPError as exc:
            handle.close()
            raise SlideError(str(exc)) from None
        return Slide(path, handle, used, resolved)
    raise SlideError(
        f"{path}: cannot be opened as a whole-slide image ({'; '.join(reasons)}); check the file is a complete SVS/TIFF/NDPI/MRXS/DICOM slide"
    )
