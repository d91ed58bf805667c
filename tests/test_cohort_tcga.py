"""TCGA barcodes and the reference tables shipped in manifests/."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cytosyn.cohort import tcga
from cytosyn.cohort.barcodes import BarcodeError, parse_barcode

REPO = Path(__file__).resolve().parents[1]


def test_parse_gdc_file_name():
    bc = parse_barcode("TCGA-OR-A5LT-01Z-00-DX1.030142AE-23DC-4082-87B4-D4D6E4CB9335.svs")
    assert (bc.slide_id, bc.patient_id, bc.tss_code) == ("TCGA-OR-A5LT-01Z-00-DX1", "TCGA-OR-A5LT", "OR")
    assert (bc.sample_type, bc.vial, bc.portion, bc.slide_type, bc.slide_number) == ("01", "Z", "00", "DX", "1")


def test_parse_paths_two_digit_slide_numbers_and_frozen_slides():
    assert parse_barcode("/data/x/TCGA-HT-7607-01Z-00-DX14.ABC.svs").slide_number == "14"
    frozen = parse_barcode("TCGA-06-0129-01A-01-BS1")
    assert (frozen.slide_type, frozen.sample_type, frozen.vial, frozen.portion) == ("BS", "01", "A", "01")
    assert parse_barcode("TCGA-A2-A0T2-01A-01-TSA").slide_number == "A"


@pytest.mark.parametrize(
    "name",
    ["slide_1.svs", "TCGA-OR-A5LT-01Z-00-XX1.svs", "TCGA-OR-A5L-01Z-00-DX1.svs", "TCGA-OR-A5LT-1Z-00-DX1", "tcga-or-a5lt-01z-00-dx1.svs"],
)
def test_malformed_names_are_clear_errors(name):
    with pytest.raises(BarcodeError) as err:
        parse_barcode(name)
    assert name in str(err.value) and "generic" in str(err.value)


def test_tss_table_is_trimmed_and_mapped_to_projects():
    t = tcga.tss_table()
    assert len(t) == 1052 and t["tss_code"].is_unique
    for col in ("tss_code", "source_site", "study_name"):
        assert (t[col] == t[col].str.strip()).all()
    # "Esophageal carcinoma " carries a trailing space in GDC's file.
    assert tcga.project_of_tss("1U") == "ESCA"
    assert t.set_index("tss_code").at["AQ", "source_site"] == "UNC"
    assert tcga.project_of_tss("OR") == "ACC"
    assert tcga.project_of_tss("0A") is None and not tcga.is_known_tss("0A")
    controls = t[t["study_name"].isin(["Cell Line Control", "Miscellaneous"])]
    assert len(controls) == 3 and controls["project"].isna().all()
    assert t["project"].notna().sum() == 1049


def test_projects_and_sample_types():
    assert len(tcga.project_names()) == 33 and "LAML" in tcga.project_names()
    st = tcga.sample_types().set_index("code")
    assert st.at["01", "letter_code"] == "TP" and st.at["11", "definition"] == "Solid Tissue Normal"


def test_top_level_manifests_folder_is_the_package_copy():
    for name in (tcga.TSS_FILE, tcga.PROJECTS_FILE, tcga.SAMPLE_TYPES_FILE, tcga.CANONICAL_VAL_OUT_FILE):
        top = REPO / "manifests" / name
        assert top.exists(), f"{top} missing"
        assert top.resolve() == (tcga.manifests_dir() / name).resolve()


def test_shipped_canonical_val_out_list_is_well_formed():
    frame = pd.read_csv(tcga.canonical_val_out_path(), dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["slide_id", "patient_id", "tss_code", "project"]
    assert len(frame) == 1012 and frame["slide_id"].is_unique
    assert frame["slide_id"].tolist() == sorted(frame["slide_id"])
    assert frame["project"].nunique() == 32
    for row in frame.itertuples(index=False):
        bc = parse_barcode(row.slide_id)
        assert (bc.patient_id, bc.tss_code, bc.slide_type) == (row.patient_id, row.tss_code, "DX")
