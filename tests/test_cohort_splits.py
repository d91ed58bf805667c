"""Slide-level splits: stratified val_out, whole patients, every project, order- and rerun-independent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_TCGA
from conftest_cohort import SlideSpec, cli, slides_frame, tcga_specs
from cytosyn.cohort.inventory import inventory_from_gdc_manifests
from cytosyn.cohort.splits import CANONICAL_SEED, assign_slide_splits, canonical_val_out, read_val_out_list
from cytosyn.cohort.tcga import canonical_val_out_path
from cytosyn.config import CohortConfig


def gdc_folder() -> Path:
    folder = SHARED_TCGA / "gdc_manifests"
    if not folder.exists():
        pytest.skip(f"{folder} is absent: the GDC manifests live in ../shared/data/tcga beside the repository")
    return folder


@pytest.fixture(scope="module")
def tcga_inventory() -> pd.DataFrame:
    return inventory_from_gdc_manifests(sorted(gdc_folder().glob("*.txt")))


def held_out(slides: pd.DataFrame, split: pd.Series) -> pd.DataFrame:
    return slides[split == "val_out"]


def test_tcga_val_out_covers_every_project_without_patient_leakage(tcga_inventory):
    split, report = assign_slide_splits(tcga_inventory, CohortConfig(), CANONICAL_SEED)
    members = tcga_inventory[tcga_inventory["status"] == "ok"]
    assert split[tcga_inventory["status"] != "ok"].isna().all()
    assert set(split[members.index]) == {"train", "val_out"}
    out = held_out(tcga_inventory, split)
    train = tcga_inventory[split == "train"]
    assert len(out) == report.val_out == 1012
    assert out["project"].nunique() == report.projects_in_val_out == 32
    assert not set(out["patient_id"]) & set(train["patient_id"])
    # Every site keeps training slides; the site distribution is as close as integer counts allow.
    assert train["tss_code"].nunique() == report.tss_in_train == 681
    assert report.tvd_tss_floor <= report.tvd_tss <= report.tvd_tss_floor + 0.02
    assert report.tvd_project < 0.02


def shuffled_copies(src: Path, dest: Path, seed: int) -> list[Path]:
    """The same manifests with their rows shuffled, returned in a shuffled order."""
    rng = np.random.default_rng(seed)
    dest.mkdir()
    out = []
    for path in sorted(src.glob("*.txt")):
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        frame = frame.iloc[rng.permutation(len(frame))]
        frame.to_csv(dest / path.name, sep="\t", index=False)
        out.append(dest / path.name)
    return [out[i] for i in rng.permutation(len(out))]


def test_split_is_identical_for_any_order_of_files_and_rows(tcga_inventory, tmp_path):
    split, _ = assign_slide_splits(tcga_inventory, CohortConfig(), CANONICAL_SEED)
    expected = sorted(held_out(tcga_inventory, split)["slide_id"])
    files = shuffled_copies(gdc_folder(), tmp_path / "shuffled", seed=7)
    again = inventory_from_gdc_manifests(files)
    pd.testing.assert_frame_equal(again, tcga_inventory)
    rows = again.iloc[np.random.default_rng(3).permutation(len(again))]
    split2, _ = assign_slide_splits(rows, CohortConfig(), CANONICAL_SEED)
    assert sorted(held_out(rows, split2)["slide_id"]) == expected
    assert canonical_val_out(files)["slide_id"].tolist() == expected


def test_shipped_canonical_list_is_reproduced(tcga_inventory):
    shipped = pd.read_csv(canonical_val_out_path(), dtype=str, keep_default_na=False)
    fresh = canonical_val_out(sorted(gdc_folder().glob("*.txt")))
    assert fresh.astype(str).values.tolist() == shipped.values.tolist()


def test_canonical_split_command_diffs(tmp_path):
    folder = gdc_folder()
    same = cli("data", "canonical-split", folder, "--out", tmp_path / "fresh.csv")
    assert same.exit_code == 0, same.stderr
    assert "identical" in same.stdout
    assert (tmp_path / "fresh.csv").read_bytes() == canonical_val_out_path().read_bytes()
    fewer = cli("data", "canonical-split", *sorted(folder.glob("*.txt"))[1:])
    assert fewer.exit_code == 1
    assert "DIFFERENT" in fewer.stderr and "\n- TCGA-" in fewer.stdout


def test_other_seeds_give_other_splits(tcga_inventory):
    a, _ = assign_slide_splits(tcga_inventory, CohortConfig(), 0)
    b, report = assign_slide_splits(tcga_inventory, CohortConfig(), 1)
    assert (a == "val_out").sum() == (b == "val_out").sum() == 1012
    assert set(tcga_inventory.loc[a == "val_out", "slide_id"]) != set(tcga_inventory.loc[b == "val_out", "slide_id"])
    assert report.projects_in_val_out == 32


def small_cohort() -> pd.DataFrame:
    specs = tcga_specs({"AA": "COAD", "AZ": "COAD", "A1": "BRCA", "A2": "BRCA", "OR": "ACC"}, patients_per_site=5, slides_per_patient=2)
    specs += [SlideSpec("TCGA-OR-9999-01Z-00-DX1", "TCGA-OR-9999", "OR", "ACC", status="error")]
    specs += [SlideSpec("TCGA-OR-9998-01Z-00-DX1", "TCGA-OR-9998", "OR", "ACC", status="excluded")]
    return slides_frame(specs)


def test_whole_patients_move_and_counts_are_exact():
    slides = small_cohort()
    split, report = assign_slide_splits(slides, CohortConfig(val_out_slides=10), seed=5)
    assert (split == "val_out").sum() == 10 and report.val_out_patients == 5
    assert split[slides["status"] == "excluded"].isna().all()
    assert split[slides["status"] == "error"].notna().all()  # unreadable slides keep their place in the split
    assert slides.assign(s=split).dropna(subset=["s"]).groupby("patient_id")["s"].nunique().max() == 1
    assert set(slides.loc[split == "val_out", "project"]) == {"COAD", "BRCA", "ACC"}


def test_fraction_and_projects_smaller_than_their_share():
    slides = small_cohort()
    split, report = assign_slide_splits(slides, CohortConfig(val_out_slides=0.2), seed=0)
    assert report.target_val_out == round(0.2 * 51) and (split == "val_out").sum() == 10
    # Three slides for three projects: every project still gets one, by whole patients. COAD and BRCA
    # patients have two slides each; ACC also has a one-slide patient (whose slide failed to open).
    split3, r3 = assign_slide_splits(slides, CohortConfig(val_out_slides=3), seed=0)
    assert r3.projects_in_val_out == 3
    assert (split3 == "val_out").sum() == r3.val_out == 5
    assert r3.notes == ["val_out has 5 slides, not 3: whole patients could not fill the count exactly"]


def test_val_out_list_keeps_patients_together(tmp_path):
    slides = small_cohort()
    listed = tmp_path / "val_out.csv"
    listed.write_text("slide_id\nTCGA-AA-0001-01Z-00-DX1\nTCGA-A1-0003-01Z-00-DX2\nTCGA-ZZ-0000-01Z-00-DX1\n")
    assert read_val_out_list(listed) == sorted(["TCGA-AA-0001-01Z-00-DX1", "TCGA-A1-0003-01Z-00-DX2", "TCGA-ZZ-0000-01Z-00-DX1"])
    split, report = assign_slide_splits(slides, CohortConfig(val_out_list=str(listed)), seed=0)
    assert sorted(slides.loc[split == "val_out", "slide_id"]) == [
        "TCGA-A1-0003-01Z-00-DX1", "TCGA-A1-0003-01Z-00-DX2", "TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0001-01Z-00-DX2"]
    assert any("not in this cohort" in n for n in report.notes) and any("moved to val_out" in n for n in report.notes)


def test_external_cohort_holds_out_every_slide():
    slides = small_cohort()
    split, report = assign_slide_splits(slides, CohortConfig(kind="external"), seed=0)
    assert set(split.dropna()) == {"val_out"} and report.mode == "external"


def test_splits_command_on_gdc_manifests(tmp_path):
    folder = gdc_folder()
    out = tmp_path / "split"
    res = cli("data", "splits", "--gdc-manifest", folder, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert "val_out: 1012 of 1012" in res.stdout
    slides = pd.read_parquet(out / "slides.parquet")
    held = sorted(slides.loc[slides["split"] == "val_out", "slide_id"])
    shipped = pd.read_csv(canonical_val_out_path(), dtype=str)["slide_id"].tolist()
    assert held == shipped
    assert (out / "reports" / "cohort.json").exists()
    audit = cli("data", "audit", out)
    assert audit.exit_code == 0, audit.stdout
    again = cli("data", "splits", "--gdc-manifest", folder, "--out", out, "--seed", "3", "--val-out-slides", "0.05")
    assert again.exit_code == 0, again.stderr
    assert (pd.read_parquet(out / "slides.parquet")["split"] == "val_out").sum() == round(0.05 * 11784)


def test_a_single_patient_project_stays_in_training():
    specs = tcga_specs({"AA": "COAD", "A1": "BRCA"}, patients_per_site=3)
    specs += [SlideSpec("TCGA-OR-0000-01Z-00-DX1", "TCGA-OR-0000", "OR", "ACC"),
              SlideSpec("TCGA-OR-0000-01Z-00-DX2", "TCGA-OR-0000", "OR", "ACC")]
    slides = slides_frame(specs)
    for count in (2, 3, 6):
        split, report = assign_slide_splits(slides, CohortConfig(val_out_slides=count), seed=1)
        assert set(slides.loc[slides["project"] == "ACC", "slide_id"].map(dict(zip(slides["slide_id"], split)))) == {"train"}
        assert set(slides.loc[split == "val_out", "project"]) == {"COAD", "BRCA"}
        # COAD and BRCA each keep a training patient too.
        assert (split == "val_out").sum() == min(count, 4) and report.projects_in_val_out == 2


def test_splits_command_checks_its_options_before_writing(tmp_path):
    manifest = tmp_path / "gdc_manifest_TCGA-BRCA.txt"
    manifest.write_text("id\tfilename\tmd5\tsize\tstate\nid-1\tTCGA-A1-A0SB-01Z-00-DX1.A.svs\t0\t1\tlive\n")
    out = tmp_path / "split"
    for bad, message in ((["--val-out-slides", "1.5"], "fraction strictly between 0 and 1"), (["--kind", "tcgaa"], "cohort.kind")):
        res = cli("data", "splits", "--gdc-manifest", manifest, "--out", out, *bad)
        assert res.exit_code == 2 and message in res.output
        assert not out.exists()
    assert cli("data", "splits", "--gdc-manifest", manifest, "--out", out, "--val-out-slides", "0").exit_code == 0
    assert (out / "slides.parquet").exists()


def test_asking_for_fewer_slides_than_projects_says_why_more_are_held_out():
    split, report = assign_slide_splits(small_cohort(), CohortConfig(val_out_slides=2), seed=0)
    assert report.projects_in_val_out == 3 and (split == "val_out").sum() == report.val_out > 2
    assert report.notes == [
        f"val_out has {report.val_out} slides, not 2: every project with more than one patient holds out at least one (3 projects)"
    ]
