"""Slide-level splits: which slides are held out entirely (``val_out``) and which train.

The held-out set is a pure function of (cohort members, seed, count): it does not depend on the order
of files or rows, nor on worker counts. Algorithm (docs/cohort.md):

1. Members are the slides that are not excluded and whose patient, site and project are known
   (unreadable slides stay members, so one bad file never reshuffles the split).
2. A stratum is a (project, tissue source site) pair; in TCGA every site belongs to one project.
   The val_out slide count is apportioned to projects by their share of member slides, every project
   getting at least one, then within each project to its strata. Every project, and every stratum
   with several patients, keeps at least one patient in training (a single-patient project never
   joins val_out).
3. Patients are visited in the order of ``stable_hash(seed, "val_out", patient_id)``; a patient
   goes to val_out with all of its slides when they fit in what its stratum still needs.
4. What could not be filled exactly (patients with several slides) is balanced globally, always by
   whole patients, towards the strata furthest below their exact share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytosyn.cohort import tcga
from cytosyn.cohort.stratify import apportion, tvd
from cytosyn.config import CohortConfig
from cytosyn.io.hashing import stable_hash

CANONICAL_SEED = 0
CANONICAL_COLUMNS = ["slide_id", "patient_id", "tss_code", "project"]
TRAIN, VAL_IN, VAL_OUT, GUIDANCE = "train", "val_in", "val_out", "guidance"


@dataclass
class SlideSplitReport:
    members: int
    target_val_out: int
    val_out: int
    val_out_patients: int
    projects: int
    projects_in_val_out: int
    tss: int
    tss_in_val_out: int
    tss_in_train: int
    tvd_tss: float
    tvd_tss_floor: float  # the TVD of the best integer allocation, before patients and projects constrain it
    tvd_project: float
    mode: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def cohort_members(slides: pd.DataFrame) -> pd.Series:
    """Slides that take part in the split: not excluded, with patient, site and project known."""
    known = slides[["patient_id", "tss_code", "project"]].notna().all(axis=1)
    return (slides["status"] != "excluded") & known


def split_mask(frame: pd.DataFrame, name: str) -> pd.Series:
    """Rows of a selection/tile manifest in a split; ``guidance`` is the flag, not a split value."""
    if name == GUIDANCE:
        return frame["guidance"].fillna(False).astype(bool)
    return frame["split"] == name


# Held-out slides when the config does not say: the paper's 1,012 for TCGA, a tenth otherwise.
DEFAULT_VAL_OUT = {"tcga": 1012, "generic": 0.1}


def val_out_count(cohort: CohortConfig, members: int) -> int:
    v = cohort.val_out_slides if cohort.val_out_slides is not None else DEFAULT_VAL_OUT[cohort.kind]
    return int(round(v * members)) if isinstance(v, float) else min(int(v), members)


def read_val_out_list(spec: str | Path) -> list[str]:
    """Slide ids of a val_out list: ``canonical`` (shipped in manifests/) or a CSV with ``slide_id``."""
    path = tcga.canonical_val_out_path() if str(spec) == "canonical" else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such val_out list; give a CSV with a slide_id column, or 'canonical'")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "slide_id" not in frame.columns:
        raise ValueError(f"{path}: a val_out list needs a slide_id column")
    return sorted(set(frame["slide_id"].str.strip()))


def assign_slide_splits(slides: pd.DataFrame, cohort: CohortConfig, seed: int) -> tuple[pd.Series, SlideSplitReport]:
    """The slide-level split (``train`` / ``val_out``, None for non-members) aligned with ``slides``."""
    member = cohort_members(slides)
    m = slides.loc[member, ["slide_id", "patient_id", "tss_code", "project"]].copy()
    if m["slide_id"].duplicated().any():
        raise ValueError(f"slide id {m.loc[m['slide_id'].duplicated(), 'slide_id'].iloc[0]} appears twice among the cohort's slides")
    m = m.sort_values("slide_id", kind="stable")
    notes: list[str] = []
    if cohort.kind == "external":
        # No slide of an external cohort is trained on: all of them are held out.
        held = pd.Series(True, index=m.index)
        mode, target = "external", len(m)
    elif cohort.val_out_list is not None:
        listed = set(read_val_out_list(cohort.val_out_list))
        patients = set(m.loc[m["slide_id"].isin(listed), "patient_id"])
        held = m["patient_id"].isin(patients)
        missing = len(listed - set(m["slide_id"]))
        if missing:
            notes.append(f"{missing} slide(s) of the val_out list are not in this cohort")
        extra = int((held & ~m["slide_id"].isin(listed)).sum())
        if extra:
            notes.append(f"{extra} slide(s) moved to val_out because another slide of their patient is listed")
        mode, target = f"list:{cohort.val_out_list}", len(listed)
    else:
        target = val_out_count(cohort, len(m))
        held = _stratified_val_out(m, target, seed, notes)
        mode = f"stratified:seed={seed}"
    split = pd.Series([None] * len(slides), index=slides.index, dtype=object)
    split.loc[m.index] = np.where(held.reindex(m.index).to_numpy(), VAL_OUT, TRAIN)
    return split, _report(m, held.reindex(m.index), mode, target, notes)


def _stratified_val_out(m: pd.DataFrame, target: int, seed: int, notes: list[str]) -> pd.Series:
    if target <= 0:
        return pd.Series(False, index=m.index)
    m = m.assign(stratum=m["project"] + "/" + m["tss_code"])
    # A patient belongs to the stratum of its first slide (in TCGA all its slides share the site).
    first = m.groupby("patient_id", sort=True).first()
    patients = pd.DataFrame(
        {
            "stratum": first["stratum"],
            "project": first["project"],
            "n": m.groupby("patient_id", sort=True).size(),
        }
    )
    patients["key"] = [stable_hash(seed, "val_out", p) for p in patients.index]
    patients = patients.sort_values(["key"], kind="stable")

    strata = m.groupby("stratum", sort=True).agg(project=("project", "first"), n=("slide_id", "size"))
    by_stratum = patients.groupby("stratum")
    strata["patients"] = by_stratum.size()
    strata["smallest"] = by_stratum["n"].min()
    strata["cap"] = np.where(strata["patients"] > 1, strata["n"] - strata["smallest"], strata["n"])
    strata["key"] = [stable_hash(seed, "stratum", s) for s in strata.index]

    projects = strata.groupby("project", sort=True).agg(n=("n", "sum"), cap=("cap", "sum"))
    # A project always keeps a training patient: one with a single patient never joins val_out.
    by_project = patients.groupby("project")
    keep = np.where(by_project.size() > 1, projects["n"] - by_project["n"].min(), 0)
    projects["cap"] = np.minimum(projects["cap"], keep)
    projects["key"] = [stable_hash(seed, "project", p) for p in projects.index]
    projects["q"] = apportion(target, projects["n"].to_numpy(), projects["cap"].to_numpy(), projects["key"].to_numpy())
    _at_least_one(projects, target)

    strata["q"] = 0
    for project, group in strata.groupby("project", sort=True):
        strata.loc[group.index, "q"] = apportion(
            int(projects.at[project, "q"]), group["n"].to_numpy(), group["cap"].to_numpy(), group["key"].to_numpy()
        )

    taken = pd.Series(False, index=patients.index)
    need = strata["q"].to_dict()
    for pid, stratum, n in zip(patients.index, patients["stratum"], patients["n"]):
        if n <= need[stratum]:
            taken[pid] = True
            need[stratum] -= n

    strata["exact"] = target * strata["n"] / strata["n"].sum()
    _cover_projects(patients, taken, strata)
    _balance(patients, taken, strata, target)
    achieved = int(patients.loc[taken, "n"].sum())
    if achieved != target:
        covered = patients.loc[taken, "project"].nunique()
        why = (
            f"every project with more than one patient holds out at least one ({covered} projects)"
            if achieved > target and covered > target
            else "whole patients could not fill the count exactly"
        )
        notes.append(f"val_out has {achieved} slides, not {target}: {why}")
    return m["patient_id"].map(taken)


def _at_least_one(projects: pd.DataFrame, target: int) -> None:
    """Give every project a val_out slide, taken from the project furthest above its exact share."""
    if target < len(projects):
        return
    exact = target * projects["n"] / projects["n"].sum()
    for project in projects.sort_values("key").index:
        if projects.at[project, "q"] > 0 or projects.at[project, "cap"] == 0:
            continue
        donors = projects[projects["q"] > 1]
        if donors.empty:
            return
        surplus = (donors["q"] - exact[donors.index]).to_frame("s").assign(key=donors["key"])
        donor = surplus.sort_values(["s", "key"], ascending=[False, True]).index[0]
        projects.at[donor, "q"] -= 1
        projects.at[project, "q"] += 1


def _val_out_by_stratum(patients: pd.DataFrame, taken: pd.Series) -> pd.Series:
    return patients.loc[taken, "n"].groupby(patients.loc[taken, "stratum"]).sum()


def _cover_projects(patients: pd.DataFrame, taken: pd.Series, strata: pd.DataFrame) -> None:
    """A project whose quota no patient could fill still gets its smallest patient into val_out."""
    covered = set(patients.loc[taken, "project"])
    for project in sorted(set(strata["project"]) - covered):
        held = _val_out_by_stratum(patients, taken)
        room = strata["cap"] - held.reindex(strata.index, fill_value=0)
        pool = patients[(patients["project"] == project) & ~taken]
        pool = pool[pool["n"].to_numpy() <= pool["stratum"].map(room).to_numpy(dtype=float)]
        if len(pool) and (~taken & (patients["project"] == project)).sum() > 1:
            taken[pool.sort_values(["n", "key"], kind="stable").index[0]] = True


def _balance(patients: pd.DataFrame, taken: pd.Series, strata: pd.DataFrame, target: int) -> None:
    """Add (or drop) whole patients until the total is the target, guided by each stratum's gap."""
    for _ in range(len(patients)):
        held = _val_out_by_stratum(patients, taken).reindex(strata.index, fill_value=0)
        left = target - int(held.sum())
        if left == 0:
            return
        gap = (strata["exact"] - held).rename("gap")
        if left > 0:
            room = strata["cap"] - held
            free = patients.loc[~taken].groupby("project").size()
            pool = patients[~taken & (patients["n"] <= left)]
            pool = pool[pool["n"].to_numpy() <= pool["stratum"].map(room).to_numpy(dtype=float)]
            pool = pool[pool["project"].map(free).to_numpy(dtype=float) > 1]
            order = pool.join(gap, on="stratum").sort_values(["gap", "key"], ascending=[False, True], kind="stable")
        else:
            per_project = patients.loc[taken].groupby("project").size()
            pool = patients[taken & (patients["n"] <= -left)]
            pool = pool[pool["project"].map(per_project).to_numpy(dtype=float) > 1]
            order = pool.join(gap, on="stratum").sort_values(["gap", "key"], ascending=[True, True], kind="stable")
        if not order.empty:
            taken[order.index[0]] = left > 0
        elif not _swap(patients, taken, strata, held, gap, left):
            return


def _swap(patients: pd.DataFrame, taken: pd.Series, strata: pd.DataFrame, held: pd.Series, gap: pd.Series, left: int) -> bool:
    """Replace a held-out patient by one with up to ``|left|`` more (or fewer) slides; False if none can."""
    sign = 1 if left > 0 else -1
    per_project = patients.loc[taken].groupby("project").size()
    free = patients.loc[~taken].groupby("project").size()
    room = strata["cap"] - held
    leaving = patients[taken].join(gap, on="stratum").sort_values(["gap", "key"], ascending=[True, True], kind="stable")
    joining = patients[~taken].join(gap, on="stratum").sort_values(["gap", "key"], ascending=[False, True], kind="stable")
    for step in range(abs(left), 0, -1):
        for p in leaving.itertuples():
            for q in joining[joining["n"] == p.n + sign * step].itertuples():
                fits = q.n <= room[q.stratum] + (p.n if q.stratum == p.stratum else 0)
                keeps_project = q.project == p.project or per_project[p.project] > 1
                keeps_training = q.project == p.project or free[q.project] > 1
                if fits and keeps_project and keeps_training:
                    taken[p.Index], taken[q.Index] = False, True
                    return True
    return False


def rounding_floor_tvd(count: int, shares: dict[str, int]) -> float:
    """How far ``count`` integer items must be from ``shares`` at best (largest-remainder rounding)."""
    keys = sorted(shares)
    n = np.array([shares[k] for k in keys])
    best = apportion(count, n, np.full(len(keys), count), np.arange(len(keys)))
    return tvd(dict(zip(keys, best)), shares)


def val_out_fidelity(members: pd.DataFrame, held: pd.Series) -> dict[str, float]:
    """How far the val_out slides (``held``, aligned with ``members``) are from the members' site and
    project distribution, and the best any allocation of as many whole slides over the sites can do."""
    out = members[held]
    sites = members["tss_code"].value_counts().to_dict()
    return {
        "tvd_tss": tvd(out["tss_code"].value_counts().to_dict(), sites),
        "tvd_tss_floor": rounding_floor_tvd(len(out), sites),
        "tvd_project": tvd(out["project"].value_counts().to_dict(), members["project"].value_counts().to_dict()),
    }


def _report(m: pd.DataFrame, held: pd.Series, mode: str, target: int, notes: list[str]) -> SlideSplitReport:
    out, train = m[held], m[~held]
    return SlideSplitReport(
        members=len(m),
        target_val_out=int(target),
        val_out=len(out),
        val_out_patients=int(out["patient_id"].nunique()),
        projects=int(m["project"].nunique()),
        projects_in_val_out=int(out["project"].nunique()),
        tss=int(m["tss_code"].nunique()),
        tss_in_val_out=int(out["tss_code"].nunique()),
        tss_in_train=int(train["tss_code"].nunique()),
        **val_out_fidelity(m, held),
        mode=mode,
        notes=notes,
    )


def canonical_val_out(gdc_manifests: list[str | Path]) -> pd.DataFrame:
    """The canonical held-out slides: this stratified split recomputed in the paper's setting (the 32
    GDC manifests, default cohort settings, 1,012 slides, the canonical seed). It is not the paper's
    own list, which this repository does not have: the paper's covers 359 sites, this one 373."""
    from cytosyn.cohort.inventory import inventory_from_gdc_manifests

    slides = inventory_from_gdc_manifests(gdc_manifests)
    split, _ = assign_slide_splits(slides, CohortConfig(kind="tcga"), CANONICAL_SEED)
    out = slides.loc[split == VAL_OUT, CANONICAL_COLUMNS]
    return out.sort_values("slide_id", kind="stable").reset_index(drop=True)
