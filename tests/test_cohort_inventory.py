"""Inventory intake: folders, GDC manifests and CSVs, with bad names, non-diagnostic slides and duplicates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_TCGA, shared_file
from cytosyn.cohort.inventory import (
    INVENTORY_COLUMNS,
    gdc_manifest_project,
    inventory_from_csv,
    inventory_from_folder,
    inventory_from_gdc_manifests,
    parse_slide_name,
)

GOOD = "TCGA-A1-A0SB-01Z-00-DX1.5AB1E5D2-0000-0000-0000-000000000001.svs"


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")


def by_status(frame: pd.DataFrame, status: str) -> list[str]:
    return frame.loc[frame["status"] == status, "slide_id"].tolist()


def test_parse_slide_name_tcga_and_generic():
    assert parse_slide_name(f"/data/{GOOD}") == {
        "slide_id": "TCGA-A1-A0SB-01Z-00-DX1", "patient_id": "TCGA-A1-A0SB", "tss_code": "A1",
        "project": "BRCA", "sample_type": "01", "slide_type": "DX",
    }
    generic = parse_slide_name("/data/case 12.ndpi", "generic")
    assert generic == {"slide_id": "case 12", "patient_id": "case 12", "tss_code": "case 12", "project": "generic",
                       "sample_type": None, "slide_type": None}


def test_tcga_folder_bad_names_non_diagnostic_and_duplicates(tmp_path):
    folder = tmp_path / "slides"
    touch(
        folder,
        GOOD,
        "TCGA-A1-A0SB-01Z-00-DX1.FFFF0000-0000-0000-0000-000000000002.svs",  # same barcode, second file
        "TCGA-OR-A5LT-01A-01-TS1.1234.svs",  # frozen top slide
        "TCGA-OR-A5LT-bad.svs",
        "TCGA-0A-AAAA-01Z-00-DX1.svs",  # site not in the TSS table
        "notes.txt",
    )
    touch(folder / "sub", "TCGA-AA-3516-01Z-00-DX1.AB.SVS")
    inv = inventory_from_folder(folder, extensions=[".svs"])
    assert list(inv.columns) == INVENTORY_COLUMNS
    assert inv["slide_id"].is_unique and inv["slide_id"].tolist() == sorted(inv["slide_id"])
    assert by_status(inv, "ok") == ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-AA-3516-01Z-00-DX1"]
    assert sorted(by_status(inv, "excluded")) == ["TCGA-A1-A0SB-01Z-00-DX1~dup1", "TCGA-OR-A5LT-01A-01-TS1"]
    errors = inv.set_index("slide_id")["error"]
    assert "TCGA-OR-A5LT-bad.svs" in errors["TCGA-OR-A5LT-bad"] and "not a TCGA slide barcode" in errors["TCGA-OR-A5LT-bad"]
    assert "0A" in errors["TCGA-0A-AAAA-01Z-00-DX1"] and "tissueSourceSite" in errors["TCGA-0A-AAAA-01Z-00-DX1"]
    assert "not a diagnostic slide (TS)" in errors["TCGA-OR-A5LT-01A-01-TS1"]
    dup = errors["TCGA-A1-A0SB-01Z-00-DX1~dup1"]
    assert "FFFF0000" in dup and f"kept {GOOD}" in dup
    kept = inv.set_index("slide_id").loc["TCGA-A1-A0SB-01Z-00-DX1"]
    assert kept["path"] == str(folder / GOOD) and kept["project"] == "BRCA"

    all_types = inventory_from_folder(folder, extensions=[".svs"], diagnostic_only=False)
    assert "TCGA-OR-A5LT-01A-01-TS1" in by_status(all_types, "ok")
    flat = inventory_from_folder(folder, extensions=[".svs"], recursive=False)
    assert "TCGA-AA-3516-01Z-00-DX1" not in flat["slide_id"].tolist()


def test_generic_folder_with_metadata_csv(tmp_path):
    folder = tmp_path / "ibd"
    touch(folder, "s1.svs", "s2.tiff", "s3.ndpi")
    plain = inventory_from_folder(folder)
    assert by_status(plain, "ok") == ["s1", "s2", "s3"]
    assert (plain["patient_id"] == plain["slide_id"]).all() and (plain["project"] == "generic").all()

    meta = tmp_path / "meta.csv"
    meta.write_text("slide_id,patient_id,tss_code,project,mpp\ns1,P1,SITE-A,SPARC,0.25\ns2,P1,SITE-A,SPARC,\n")
    inv = inventory_from_folder(folder, metadata_csv=meta).set_index("slide_id")
    assert inv.loc["s1", ["patient_id", "tss_code", "project"]].tolist() == ["P1", "SITE-A", "SPARC"]
    assert inv.loc["s3", "patient_id"] == "s3"
    assert inv.loc["s1", "mpp"] == 0.25 and np.isnan(inv.loc["s2", "mpp"])

    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,patient,project\ns1,P1,X\n")
    with pytest.raises(ValueError, match=r"bad.csv: unknown column\(s\) \['patient'\]"):
        inventory_from_folder(folder, metadata_csv=bad)


def test_a_generic_name_in_a_declared_tcga_cohort_is_an_error(tmp_path):
    touch(tmp_path, GOOD, "slide_7.svs")
    inv = inventory_from_folder(tmp_path, kind="tcga").set_index("slide_id")
    assert inv.loc["slide_7", "status"] == "error" and "slide_7.svs" in inv.loc["slide_7", "error"]
    assert inv.loc["TCGA-A1-A0SB-01Z-00-DX1", "status"] == "ok"


def test_csv_inventory(tmp_path):
    (tmp_path / "csv").mkdir()
    csv = tmp_path / "csv" / "slides.csv"
    csv.write_text(f"path,mpp\n../data/{GOOD},0.2527\n/abs/TCGA-AA-3516-01Z-00-DX1.svs,\n")
    inv = inventory_from_csv(csv).set_index("slide_id")
    assert inv.loc["TCGA-A1-A0SB-01Z-00-DX1", "path"] == str(tmp_path / "csv" / "../data" / GOOD)
    assert inv.loc["TCGA-A1-A0SB-01Z-00-DX1", "mpp"] == 0.2527
    assert inv.loc["TCGA-AA-3516-01Z-00-DX1", "project"] == "COAD"

    generic = tmp_path / "generic.csv"
    generic.write_text("path,slide_id,project\na/x.svs,case-1,IBD\nb/x.svs,case-2,IBD\n")
    g = inventory_from_csv(generic).set_index("slide_id")
    assert g.index.tolist() == ["case-1", "case-2"] and (g["project"] == "IBD").all()
    assert g.loc["case-2", "patient_id"] == "case-2"


MANIFEST_HEADER = "\tid\tfilename\tmd5\tsize\tstate\n"


def write_manifest(path: Path, rows: list[tuple[str, str]], index_column: bool = True) -> Path:
    lines = [MANIFEST_HEADER if index_column else MANIFEST_HEADER.lstrip("\t")]
    for i, (file_id, filename) in enumerate(rows):
        prefix = f"{i}\t" if index_column else ""
        lines.append(f"{prefix}{file_id}\t{filename}\t{'0' * 32}\t100\tlive\n")
    path.write_text("".join(lines))
    return path


def gdc_fixture(tmp_path: Path, reverse: bool = False) -> list[Path]:
    brca = [
        ("id-b1", "TCGA-A1-A0SB-01Z-00-DX1.BBB.svs"),
        ("id-b2", "TCGA-A1-A0SB-01Z-00-DX1.AAA.svs"),  # same barcode, another file: AAA sorts first
        ("id-b3", "TCGA-A2-A04P-01Z-00-DX1.CCC.svs"),
        ("id-b4", "TCGA-A2-A04P-01Z-00-DX2.DDD.svs"),
        ("id-b5", "TCGA-A2-bad.svs"),
    ]
    coad = [
        ("id-c2", "TCGA-AA-3516-01Z-00-DX1.EEE.svs"),
        ("id-c1", "TCGA-AA-3516-01Z-00-DX1.EEE.svs"),  # one file listed twice under two ids
        ("id-c3", "TCGA-A1-A0SE-01Z-00-DX1.FFF.svs"),  # an A1 (BRCA) site in the COAD manifest: the manifest wins
    ]
    if reverse:
        brca, coad = brca[::-1], coad[::-1]
    a = write_manifest(tmp_path / "gdc_manifest.2018-06-26_diagnostic_TCGA-BRCA.txt", brca)
    b = write_manifest(tmp_path / "gdc_manifest.2018-06-26_diagnostic_TCGA-COAD.txt", coad, index_column=not reverse)
    return [b, a] if reverse else [a, b]


def test_gdc_manifests_duplicates_projects_and_order(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    inv = inventory_from_gdc_manifests(gdc_fixture(tmp_path / "one"))
    assert inv["slide_id"].is_unique
    assert by_status(inv, "ok") == ["TCGA-A1-A0SB-01Z-00-DX1", "TCGA-A1-A0SE-01Z-00-DX1", "TCGA-A2-A04P-01Z-00-DX1",
                                    "TCGA-A2-A04P-01Z-00-DX2", "TCGA-AA-3516-01Z-00-DX1"]
    rows = inv.set_index("slide_id")
    assert rows.loc["TCGA-A1-A0SB-01Z-00-DX1", "path"] == "TCGA-A1-A0SB-01Z-00-DX1.AAA.svs"
    assert "BBB" in rows.loc["TCGA-A1-A0SB-01Z-00-DX1~dup1", "path"]
    twice = rows.loc["TCGA-AA-3516-01Z-00-DX1~dup1", "error"]
    assert "listed twice" in twice and "id-c2" in twice and "kept" in twice and "(id-c1)" in twice
    assert rows.loc["TCGA-A1-A0SE-01Z-00-DX1", "project"] == "COAD"
    assert rows.loc["TCGA-A2-bad", "status"] == "error" and "TCGA-A2-bad.svs" in rows.loc["TCGA-A2-bad", "error"]

    shuffled = inventory_from_gdc_manifests(gdc_fixture(tmp_path / "two", reverse=True))
    pd.testing.assert_frame_equal(inv, shuffled)


def test_gdc_paths_under_a_slides_root(tmp_path):
    manifest = write_manifest(tmp_path / "m_TCGA-BRCA.txt", [("id-1", "TCGA-A1-A0SB-01Z-00-DX1.A.svs"), ("id-2", "TCGA-A2-A04P-01Z-00-DX1.B.svs")])
    root = tmp_path / "slides"
    touch(root / "id-1", "TCGA-A1-A0SB-01Z-00-DX1.A.svs")
    touch(root, "TCGA-A2-A04P-01Z-00-DX1.B.svs")
    paths = inventory_from_gdc_manifests([manifest], slides_root=root).set_index("slide_id")["path"]
    assert paths["TCGA-A1-A0SB-01Z-00-DX1"] == str(root / "id-1" / "TCGA-A1-A0SB-01Z-00-DX1.A.svs")
    assert paths["TCGA-A2-A04P-01Z-00-DX1"] == str(root / "TCGA-A2-A04P-01Z-00-DX1.B.svs")


def test_manifest_project_from_file_name():
    assert gdc_manifest_project("gdc_manifest.2018-06-26_diagnostic_TCGA-KIRC.txt") == "KIRC"
    assert gdc_manifest_project("gdc_manifest_TCGA-all.txt") is None
    assert gdc_manifest_project("manifest.txt") is None


def test_not_a_gdc_manifest(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="x.txt: not a GDC manifest"):
        inventory_from_gdc_manifests([bad])


def test_the_32_tcga_manifests():
    folder = SHARED_TCGA / "gdc_manifests"
    if not folder.exists():
        pytest.skip(f"{folder} is absent: the GDC manifests live in ../shared/data/tcga beside the repository")
    inv = inventory_from_gdc_manifests(sorted(folder.glob("*.txt")))
    assert len(inv) == 11894 and inv["slide_id"].is_unique
    ok = inv[inv["status"] == "ok"]
    assert len(ok) == 11784 and (ok["slide_type"] == "DX").all()
    assert ok["project"].nunique() == 32 and ok["tss_code"].nunique() == 681 and ok["patient_id"].nunique() == 9656
    excluded = inv[inv["status"] == "excluded"]
    assert len(excluded) == 110 and excluded["error"].str.startswith("duplicate of slide").all()
    assert excluded["error"].str.contains("listed twice").sum() == 1


def test_a_manifest_folder_is_its_manifests_in_the_build_too(tmp_path):
    from cytosyn.config import parse_config
    from cytosyn.io.layout import DatasetLayout
    from cytosyn.pipeline.inventory import take_inventory

    folder = tmp_path / "manifests"
    folder.mkdir()
    files = gdc_fixture(folder)
    pd.testing.assert_frame_equal(inventory_from_gdc_manifests([folder]), inventory_from_gdc_manifests(files))
    cfg = parse_config({"slides": {"source": "gdc", "gdc_manifests": [str(folder)], "folder": str(tmp_path / "slides")}})
    built = take_inventory(cfg, DatasetLayout(tmp_path / "ds"))
    assert built["slide_id"].tolist() == inventory_from_gdc_manifests(files)["slide_id"].tolist()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no GDC manifest \(\*\.txt\) in this folder"):
        inventory_from_gdc_manifests([tmp_path / "empty"])


def test_dicom_series_are_named_after_their_folders(tmp_path):
    from cytosyn.slides.reader import open_slide

    levels = [shared_file("slides/boxes_0.dcm"), shared_file("slides/boxes_1.dcm")]
    for series in ("series-a", "series-b"):
        (tmp_path / "slides" / series).mkdir(parents=True)
        for i, level in enumerate(levels):
            shutil.copy(level, tmp_path / "slides" / series / f"{i}.dcm")
    inv = inventory_from_folder(tmp_path / "slides")
    assert by_status(inv, "ok") == ["series-a", "series-b"] and by_status(inv, "excluded") == []
    assert inv["path"].tolist() == [str(tmp_path / "slides" / s / "0.dcm") for s in ("series-a", "series-b")]
    for path in inv["path"]:
        with open_slide(path) as s:
            assert s.vendor == "dicom"


def test_an_unknown_sample_type_is_an_error(tmp_path):
    touch(tmp_path, GOOD, "TCGA-A1-A0SC-99Z-00-DX1.svs")
    inv = inventory_from_folder(tmp_path).set_index("slide_id")
    assert inv.loc["TCGA-A1-A0SB-01Z-00-DX1", "status"] == "ok"
    bad = inv.loc["TCGA-A1-A0SC-99Z-00-DX1"]
    assert bad["status"] == "error"
    assert bad["error"].startswith(str(tmp_path / "TCGA-A1-A0SC-99Z-00-DX1.svs")) and "sample type 99 is not in manifests/sampleType.csv" in bad["error"]
