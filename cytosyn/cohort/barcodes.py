"""TCGA slide barcodes: ``TCGA-<TSS>-<participant>-<sample><vial>-<portion>-<slide type><slide number>``.

GDC names slide files ``<barcode>.<image UUID>.svs``; the barcode (everything before the first dot)
is the slide id, e.g. ``TCGA-A1-A0SB-01Z-00-DX1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

SLIDE_TYPES = ("DX", "TS", "BS", "MS")  # diagnostic (FFPE); top, bottom, middle (frozen)

_BARCODE = re.compile(
    r"^TCGA-(?P<tss>[0-9A-Z]{2})-(?P<participant>[0-9A-Z]{4})-(?P<sample>\d{2})(?P<vial>[A-Z])"
    rf"-(?P<portion>\d{{2}})-(?P<slide_type>{'|'.join(SLIDE_TYPES)})(?P<slide_number>[0-9A-Z]+)$"
)


class BarcodeError(ValueError):
    """A name that should be a TCGA slide barcode and is not."""


@dataclass(frozen=True)
class SlideBarcode:
    slide_id: str
    patient_id: str
    tss_code: str
    sample_type: str  # two-digit code, see manifests/sampleType.csv
    vial: str
    portion: str
    slide_type: str
    slide_number: str


def barcode_part(name: str) -> str:
    """The barcode part of a GDC slide file name or path: the file name up to its first dot."""
    return PurePath(name).name.split(".", 1)[0]


def looks_like_tcga(name: str) -> bool:
    """Whether a file name claims to be a TCGA slide (it may still be malformed)."""
    return barcode_part(name).upper().startswith("TCGA-")


def parse_barcode(name: str) -> SlideBarcode:
    """Parse a slide barcode, a GDC file name or a path to one; raises BarcodeError naming the input."""
    text = barcode_part(name)
    m = _BARCODE.match(text)
    if m is None:
        raise BarcodeError(
            f"{name}: not a TCGA slide barcode (expected e.g. TCGA-A1-A0SB-01Z-00-DX1[.<uuid>].svs); "
            "rename the file, or declare the cohort generic"
        )
    g = m.groupdict()
    return SlideBarcode(
        slide_id=text,
        patient_id=f"TCGA-{g['tss']}-{g['participant']}",
        tss_code=g["tss"],
        sample_type=g["sample"],
        vial=g["vial"],
        portion=g["portion"],
        slide_type=g["slide_type"],
        slide_number=g["slide_number"],
    )
