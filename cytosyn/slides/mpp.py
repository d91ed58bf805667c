"""Resolving a slide's microns per pixel from its properties, in a fixed order of trust.

Order (DESIGN.md §4): an explicit override; the reader's own MPP property; Aperio's ``MPP`` field; TIFF
resolution tags; and, only when asked for, the objective power (flagged). MPP is never rounded to a
nominal magnification.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Outside this range a value is a placeholder (e.g. 72 dpi) rather than a microscope's pixel size.
PLAUSIBLE_MPP = (0.05, 100.0)
# µm/px of a 1x objective by the usual convention (40x ≈ 0.25 µm/px).
UM_PER_PX_AT_1X = 10.0

MPP_HELP = "give one with --mpp on the command line or an `mpp` column in the slide CSV"


@dataclass(frozen=True)
class MPP:
    x: float
    y: float
    source: str  # override | openslide-property | tiffslide-property | aperio-mpp | tiff-resolution | objective-power


class MissingMPPError(ValueError):
    """The slide has no usable MPP and none was given; the message says how to give one."""


def _float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if PLAUSIBLE_MPP[0] <= f <= PLAUSIBLE_MPP[1] else None


def _from_resolution_tags(props: Mapping[str, object]) -> tuple[float, float] | None:
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    um_per_unit = {"centimeter": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    if um_per_unit is None:
        return None
    try:
        xres = float(props["tiff.XResolution"])  # type: ignore[arg-type]
        yres = float(props.get("tiff.YResolution", xres))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
    if xres <= 0 or yres <= 0:
        return None
    mx, my = _float(um_per_unit / xres), _float(um_per_unit / yres)
    return (mx, my) if mx and my else None


def resolve_mpp(
    props: Mapping[str, object],
    override: float | None = None,
    objective_power_fallback: bool = False,
    name: str = "slide",
) -> MPP:
    if override is not None:
        if not override > 0:
            raise MissingMPPError(f"{name}: MPP override must be positive, got {override}")
        return MPP(float(override), float(override), "override")
    for prefix in ("openslide", "tiffslide"):
        mx, my = _float(props.get(f"{prefix}.mpp-x")), _float(props.get(f"{prefix}.mpp-y"))
        if mx and my:
            return MPP(mx, my, f"{prefix}-property")
    aperio = _float(props.get("aperio.MPP"))
    if aperio:
        return MPP(aperio, aperio, "aperio-mpp")
    tags = _from_resolution_tags(props)
    if tags:
        return MPP(tags[0], tags[1], "tiff-resolution")
    power = objective_power(props)
    if objective_power_fallback and power:
        mpp = UM_PER_PX_AT_1X / power
        return MPP(mpp, mpp, "objective-power")
    hint = f" (objective power {power:g}x is known; --objective-power-fallback would use it)" if power else ""
    raise MissingMPPError(f"{name}: no MPP in the slide's metadata{hint}; {MPP_HELP}")


def objective_power(props: Mapping[str, object]) -> float | None:
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        try:
            value = float(props[key])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None
