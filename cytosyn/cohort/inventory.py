"""Slide inventory intake: a folder of slides, GDC manifests, or a CSV → one row per slide.

Every intake returns the same columns (``INVENTORY_COLUMNS``, plus ``mpp`` when a CSV gives per-slide
overrides), sorted by ``slide_id``, with ``slide_id`` unique over all rows. Nothing here opens a
slide: the build does that for the ``ok`` rows. A bad entry becomes a row with ``status='error'`` and
a one-line reason naming the file; the others go on.

Duplicates (one barcode under two files, one file listed twice) keep the entry whose file name sorts
first (then the GDC file id, then the path); the others become ``excluded`` rows whose ``slide_id``
gets a ``~dupN`` suffix and whose ``error`` names the kept file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from cytosyn.cohort import tcga
from cytosyn.cohort.barcodes import BarcodeError, barcode_part, looks_like_tcga, parse_barcode
from cytosyn.config import SLIDE_EXTENSIONS

INVENTORY_COLUMNS = ["slide_id", "path", "patient_id", "tss_code", "project", "sample_type", "slide_type", "status", "error"]
METADATA_COLUMNS = ("patient_id", "tss_code", "project", "sample_type", "slide_type", "mpp")
GENERIC_PROJECT = "generic"
DIAGNOSTIC = "DX"

_GDC_PROJECT = re.compile(r"TCGA-([0-9A-Z]+)")
# Internal columns used to resolve duplicates deterministically; dropped before returning.
_FILE_NAME, _SOURCE_KEY = "_file_name", "_source_key"


def parse_slide_name(path_or_name: str | Path, cohort_kind: str = "tcga") -> dict:
    """Cohort columns of one slide from its file name.

    ``tcga``: the barcode before the first dot (raises BarcodeError naming the file otherwise);
    ``project`` comes from the TSS table and is None when the site is unknown or a control study.
    ``generic``: ``slide_id`` is the file name without its extension; each slide is its own patient
    and site, in project ``generic``.
    """
    name = Path(path_or_name).name
    if cohort_kind == "tcga":
        bc = parse_barcode(name)
        return {
            "slide_id": bc.slide_id,
            "patient_id": bc.patient_id,
            "tss_code": bc.tss_code,
            "project": tcga.project_of_tss(bc.tss_code),
            "sample_type": bc.sample_type,
            "slide_type": bc.slide_type,
        }
    if cohort_kind == "generic":
        stem = Path(name).stem or name
        return {
            "slide_id": stem,
            "patient_id": stem,
            "tss_code": stem,
            "project": GENERIC_PROJECT,
            "sample_type": None,
            "slide_type": None,
        }
    raise ValueError(f"cohort kind must be 'tcga' or 'generic', not {cohort_kind!r}")


def _detect_kind(names: Iterable[str], kind: str) -> str:
    if kind in ("tcga", "generic"):
        return kind
    if kind != "auto":
        raise ValueError(f"cohort kind must be 'auto', 'tcga' or 'generic', not {kind!r}")
    # One TCGA-looking name makes the folder a TCGA cohort, so a misspelt barcode is an error, not a
    # silent switch of the whole cohort to generic.
    return "tcga" if any(looks_like_tcga(n) for n in names) else "generic"


def _row(path: str, file_name: str, source_key: str, kind: str, project: str | None = None) -> dict:
    """One inventory row; a bad name gives an error row whose slide_id is the file's barcode part."""
    base = {"path": path, _FILE_NAME: Path(path).name, _SOURCE_KEY: source_key, "status": "ok", "error": None}
    try:
        cols = parse_slide_name(file_name, kind)
    except BarcodeError as exc:
        return {**base, "slide_id": barcode_part(file_name) or file_name, "patient_id": None, "tss_code": None,
                "project": project, "sample_type": None, "slide_type": None, "status": "error", "error": str(exc)}
    if project:
        cols["project"] = project
    return {**base, **cols}


def _read_csv(path: str | Path, required: Sequence[str], allowed: Sequence[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such CSV file")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    unknown = [c for c in frame.columns if c not in allowed]
    if missing or unknown:
        what = f"missing column(s) {missing}" if missing else f"unknown column(s) {unknown}"
        raise ValueError(f"{path}: {what}; allowed columns: {', '.join(allowed)}")
    return frame.apply(lambda col: col.str.strip())


def _set_metadata(row: dict, values: dict, source: str | Path) -> None:
    """Copy the non-empty metadata values of one slide onto its row (only rows that parsed)."""
    if row["status"] != "ok":
        return
    for col in METADATA_COLUMNS:
        value = values.get(col) or ""
        if not value:
            continue
        if col == "mpp":
            try:
                row["mpp"] = float(value)
            except ValueError:
                raise ValueError(f"{source}: mpp {value!r} of slide {row['slide_id']} is not a number") from None
        else:
            row[col] = value


def _apply_metadata(rows: list[dict], metadata_csv: str | Path) -> None:
    meta = _read_csv(metadata_csv, required=("slide_id",), allowed=("slide_id", *METADATA_COLUMNS))
    if meta["slide_id"].duplicated().any():
        dup = meta.loc[meta["slide_id"].duplicated(), "slide_id"].iloc[0]
        raise ValueError(f"{metadata_csv}: slide_id {dup!r} appears twice; keep one row per slide")
    by_id = meta.set_index("slide_id").to_dict("index")
    for row in rows:
        if row["slide_id"] in by_id:
            _set_metadata(row, by_id[row["slide_id"]], metadata_csv)


def _finalise(rows: list[dict], kind: str, diagnostic_only: bool) -> pd.DataFrame:
    for row in rows:
        if kind == "tcga" and row["status"] == "ok" and not row["project"]:
            site = "a control study" if tcga.is_known_tss(row["tss_code"]) else "not in manifests/tissueSourceSite.csv"
            row["status"] = "error"
            row["error"] = (
                f"{row['path']}: tissue source site {row['tss_code']} is {site}, so the slide has no project; "
                "give its project in a GDC manifest named after it or in a metadata CSV"
            )
        elif kind == "tcga" and row["status"] == "ok" and not tcga.is_known_sample_type(row["sample_type"]):
            row["status"] = "error"
            row["error"] = (
                f"{row['path']}: sample type {row['sample_type']} is not in manifests/sampleType.csv; "
                "check the barcode's sample field (01 = primary solid tumour, 11 = solid tissue normal, …)"
            )
        elif diagnostic_only and row["status"] == "ok" and row["slide_type"] not in (None, DIAGNOSTIC):
            row["status"] = "excluded"
            row["error"] = (
                f"{row['path']}: not a diagnostic slide ({row['slide_type']}); "
                "only DX slides are used unless cohort.diagnostic_only is false"
            )
    columns = [*INVENTORY_COLUMNS, _FILE_NAME, _SOURCE_KEY]
    if any("mpp" in r for r in rows):
        columns.append("mpp")
    frame = pd.DataFrame(rows, columns=columns).astype(object)
    frame = frame.where(frame.notna(), None)
    if "mpp" in frame:
        frame["mpp"] = pd.to_numeric(frame["mpp"]).astype(float)
    frame = _resolve_duplicates(frame)
    return frame.drop(columns=[_FILE_NAME, _SOURCE_KEY]).sort_values("slide_id", kind="stable").reset_index(drop=True)


def _resolve_duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    rank = (frame["status"] != "ok").astype(int)
    order = frame.assign(_rank=rank).sort_values(["slide_id", "_rank", _FILE_NAME, _SOURCE_KEY, "path"], kind="stable")
    order = order.drop(columns="_rank").reset_index(drop=True)
    nth = order.groupby("slide_id", sort=False).cumcount()
    if not (nth > 0).any():
        return order
    kept = order[nth == 0].set_index("slide_id")
    for i in order.index[nth > 0]:
        sid = order.at[i, "slide_id"]
        keep_name, keep_key = kept.at[sid, _FILE_NAME], kept.at[sid, _SOURCE_KEY]
        if order.at[i, _FILE_NAME] == keep_name:
            why = f"the same file {keep_name} is listed twice ({order.at[i, _SOURCE_KEY]} and {keep_key})"
        else:
            why = f"{order.at[i, _FILE_NAME]} has the same slide id as {keep_name}"
        order.at[i, "error"] = f"duplicate of slide {sid}: {why}; kept {keep_name} ({keep_key}), the first by file name"
        order.at[i, "status"] = "excluded"
        order.at[i, "slide_id"] = f"{sid}~dup{nth[i]}"
    return order


def _list_slide_files(folder: Path, extensions: Sequence[str], recursive: bool) -> list[tuple[Path, str]]:
    """(file, the name its cohort columns are parsed from) of every slide under ``folder``."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    files = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))
    return _one_file_per_dicom_series(files)


def _one_file_per_dicom_series(files: list[Path]) -> list[tuple[Path, str]]:
    """A DICOM slide is a folder of .dcm files (one per level); OpenSlide opens the whole series from
    any of them, so each folder counts once, by its first file. The series is named after its folder:
    the files inside are often numbered alike (``0.dcm``, ``1.dcm``) in every series."""
    seen: set[Path] = set()
    kept = []
    for f in files:
        if f.suffix.lower() != ".dcm":
            kept.append((f, f.name))
        elif f.parent not in seen:
            seen.add(f.parent)
            # Named as if the folder were the file: its stem (generic) or barcode part (TCGA) is the folder name.
            kept.append((f, f.parent.name + f.suffix))
    return kept


def inventory_from_folder(
    folder: str | Path,
    kind: str = "auto",
    extensions: Sequence[str] = SLIDE_EXTENSIONS,
    recursive: bool = True,
    metadata_csv: str | Path | None = None,
    diagnostic_only: bool = True,
) -> pd.DataFrame:
    """Every slide file under ``folder`` (matching ``extensions``, case-insensitive).

    ``kind='auto'`` is TCGA when any file name starts with ``TCGA-`` and generic otherwise.
    ``metadata_csv`` (columns ``slide_id`` and any of patient_id, tss_code, project, sample_type,
    slide_type, mpp) overrides what the names say.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such slide folder; check slides.folder in the config")
    files = _list_slide_files(folder, extensions, recursive)
    kind = _detect_kind((name for _, name in files), kind)
    rows = [_row(str(f), name, str(f.relative_to(folder)), kind) for f, name in files]
    if metadata_csv is not None:
        _apply_metadata(rows, metadata_csv)
    return _finalise(rows, kind, diagnostic_only)


def read_gdc_manifest(path: str | Path) -> pd.DataFrame:
    """A GDC manifest (tab-separated ``id filename md5 size state``, with or without a leading index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GDC manifest")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame = frame.loc[:, [c for c in frame.columns if c and not c.startswith("Unnamed:")]]
    missing = [c for c in ("id", "filename") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a GDC manifest, missing column(s) {missing}; download it from the GDC portal cart")
    return frame


def gdc_manifest_project(path: str | Path) -> str | None:
    """The TCGA project a manifest is named after (``…_TCGA-BRCA.txt`` → BRCA), when it is."""
    known = set(tcga.project_names())
    hits = [h for h in _GDC_PROJECT.findall(Path(path).name.upper()) if h in known]
    return hits[-1] if hits else None


def gdc_manifest_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Manifest files, with each folder standing for the ``*.txt`` files in it."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"{p}: no GDC manifest (*.txt) in this folder; give the manifest files or the folder holding them")
            files += found
        else:
            files.append(p)
    return files


def inventory_from_gdc_manifests(
    files: Sequence[str | Path],
    slides_root: str | Path | None = None,
    diagnostic_only: bool = True,
) -> pd.DataFrame:
    """Slides listed in GDC manifests (files, or folders of ``*.txt`` manifests); always a TCGA cohort.

    ``path`` is ``slides_root/<file id>/<filename>`` (the gdc-client layout) or
    ``slides_root/<filename>`` when only that exists; without ``slides_root`` it is the file name.
    """
    root = Path(slides_root) if slides_root is not None else None
    entries = []
    for manifest in gdc_manifest_files(files):
        project = gdc_manifest_project(manifest)
        for file_id, filename in zip(*(read_gdc_manifest(manifest)[c] for c in ("id", "filename"))):
            entries.append((filename, file_id, project))
    rows = []
    # Sorted so that which manifest or row came first can never change the result.
    for filename, file_id, project in sorted(entries, key=lambda e: (e[0], e[1], e[2] or "")):
        if root is None:
            path = filename
        else:
            nested, flat = root / file_id / filename, root / filename
            path = str(flat if flat.exists() and not nested.exists() else nested)
        rows.append(_row(path, filename, file_id, "tcga", project=project))
    return _finalise(rows, "tcga", diagnostic_only)


def inventory_from_csv(file: str | Path, kind: str = "auto", diagnostic_only: bool = True) -> pd.DataFrame:
    """Slides listed in a CSV: ``path`` (relative to the CSV's folder, or absolute) and optionally
    ``slide_id`` and any of patient_id, tss_code, project, sample_type, slide_type, mpp.

    In a TCGA cohort the slide id is parsed from ``slide_id`` (else the file name) as a barcode; in a
    generic one a given ``slide_id`` is used as is (and as patient and site unless those are given).
    """
    file = Path(file)
    table = _read_csv(file, required=("path",), allowed=("path", "slide_id", *METADATA_COLUMNS))
    records = table.to_dict("records")
    paths = [p if Path(p).is_absolute() else str(file.parent / p) for p in table["path"]]
    names = [rec.get("slide_id") or Path(p).name for rec, p in zip(records, paths)]
    kind = _detect_kind(names, kind)
    rows = []
    for rec, path, name in zip(records, paths, names):
        row = _row(path, name, path, kind)
        if kind == "generic" and rec.get("slide_id"):
            row.update(slide_id=rec["slide_id"], patient_id=rec["slide_id"], tss_code=rec["slide_id"])
        _set_metadata(row, rec, file)
        rows.append(row)
    return _finalise(rows, kind, diagnostic_only)
