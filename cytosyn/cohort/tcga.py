"""The TCGA reference tables shipped with the package (``manifests/`` at the repository root).

The CSV files are GDC's tables as published; their quirks (one study name with a trailing space, one
source site with a trailing space) are fixed here, at load time, so the files stay verbatim.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import pandas as pd

TSS_FILE = "tissueSourceSite.csv"
PROJECTS_FILE = "projects.csv"
SAMPLE_TYPES_FILE = "sampleType.csv"
CANONICAL_VAL_OUT_FILE = "canonical-val-out.csv"


def manifests_dir() -> Path:
    """The folder holding the reference tables inside the installed package."""
    return Path(str(resources.files("cytosyn") / "resources" / "manifests"))


def _read(name: str) -> pd.DataFrame:
    path = manifests_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: reference table missing from the cytosyn package; reinstall cytosyn")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.apply(lambda col: col.str.strip())


@lru_cache(maxsize=1)
def projects() -> pd.DataFrame:
    """``project`` (e.g. ``BRCA``) and ``study_name``; one row per TCGA project."""
    return _read(PROJECTS_FILE)


@lru_cache(maxsize=1)
def tss_table() -> pd.DataFrame:
    """``tss_code``, ``source_site``, ``study_name``, ``bcr`` and ``project`` (None for control studies)."""
    raw = _read(TSS_FILE)
    table = pd.DataFrame(
        {
            "tss_code": raw["TSS Code"],
            "source_site": raw["Source Site"],
            "study_name": raw["Study Name"],
            "bcr": raw["BCR"],
        }
    )
    by_study = dict(zip(projects()["study_name"], projects()["project"]))
    table["project"] = table["study_name"].map(by_study).astype(object)
    table["project"] = table["project"].where(table["project"].notna(), None)
    return table


@lru_cache(maxsize=1)
def sample_types() -> pd.DataFrame:
    """``code`` (two digits), ``definition``, ``letter_code`` (e.g. 01, Primary solid Tumor, TP)."""
    raw = _read(SAMPLE_TYPES_FILE)
    return pd.DataFrame({"code": raw["Code"], "definition": raw["Definition"], "letter_code": raw["Short Letter Code"]})


@lru_cache(maxsize=1)
def _sample_codes() -> frozenset[str]:
    return frozenset(sample_types()["code"])


def is_known_sample_type(code: str) -> bool:
    return code in _sample_codes()


@lru_cache(maxsize=1)
def _tss_projects() -> dict[str, str | None]:
    t = tss_table()
    return dict(zip(t["tss_code"], t["project"]))


def project_of_tss(tss_code: str) -> str | None:
    """The TCGA project of a tissue source site; None when the code is unknown or a control study."""
    return _tss_projects().get(tss_code)


def is_known_tss(tss_code: str) -> bool:
    return tss_code in _tss_projects()


def project_names() -> list[str]:
    return sorted(projects()["project"])


def canonical_val_out_path() -> Path:
    return manifests_dir() / CANONICAL_VAL_OUT_FILE
