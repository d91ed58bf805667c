"""Leakage and fidelity audit of a dataset root's splits (``cytosyn data audit``).

Reads slides.parquet (with its ``split`` column), the tile manifest — ``tiles/`` when the build
extracted tiles, else ``selection/`` — one slide file at a time, so it runs on 40M-tile datasets in
bounded memory, and the candidate files' row counts (each slide's capacity). Every check reports its
violations; any violation fails the audit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from cytosyn.cohort.selection import candidate_counts, split_fidelity, split_sources
from cytosyn.cohort.splits import GUIDANCE, TRAIN, VAL_IN, VAL_OUT, cohort_members, val_out_fidelity
from cytosyn.io.schema import SPLITS
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides, topup_tile_ids

MAX_EXAMPLES = 10
TILE_COLUMNS = ["tile_id", "slide_id", "x", "y", "read_size_level0", "split", "guidance"]


@dataclass
class Check:
    name: str
    violations: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, message: str) -> None:
        self.violations.append(message)


@dataclass
class AuditReport:
    root: str
    source: str
    kind: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "source": self.source,
            "kind": self.kind,
            "ok": self.ok,
            "checks": [
                {"name": c.name, "ok": c.ok, "skipped": c.skipped, "violations": c.violations, "info": c.info}
                for c in self.checks
            ],
        }

    def text(self) -> str:
        lines = [f"audit of {self.root} (tiles from {self.source}/, cohort kind {self.kind})"]
        for c in self.checks:
            state = "SKIP" if c.skipped else ("ok" if c.ok else "FAIL")
            lines.append(f"  [{state}] {c.name}" + (f": {c.skipped}" if c.skipped else ""))
            lines += [f"      - {v}" for v in c.violations[:MAX_EXAMPLES]]
            if len(c.violations) > MAX_EXAMPLES:
                lines.append(f"      … and {len(c.violations) - MAX_EXAMPLES} more")
        lines.append("PASSED" if self.ok else f"FAILED: {sum(not c.ok for c in self.checks)} check(s) with violations")
        return "\n".join(lines)


# Grid cells start at round(i · footprint) and span round(footprint) level-0 pixels, so neighbours
# may share one pixel column or row: that is rounding, not two tiles showing the same tissue.
ROUNDING_PX = 1


def overlapping_pairs(x: np.ndarray, y: np.ndarray, size: np.ndarray, tolerance: int = ROUNDING_PX) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of axis-aligned squares [x, x+size) × [y, y+size) whose intersection is
    more than ``tolerance`` pixels wide and high.

    Squares are bucketed on a grid as coarse as the largest square, so only the 3×3 neighbouring
    buckets of each square are compared: linear in the number of tiles, not quadratic.
    """
    n = len(x)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    x, y, size = (np.asarray(a, dtype=np.int64) for a in (x, y, size))
    cell = max(int(size.max()), 1)
    bx, by = (x - x.min()) // cell, (y - y.min()) // cell
    width = int(by.max()) + 3
    key = bx * width + (by + 1)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    firsts, seconds = [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            target = key + dx * width + dy
            lo = np.searchsorted(sorted_key, target, "left")
            hi = np.searchsorted(sorted_key, target, "right")
            count = hi - lo
            i = np.repeat(np.arange(n), count)
            start = np.repeat(lo - np.concatenate(([0], np.cumsum(count)[:-1])), count)
            j = order[start + np.arange(i.size)]
            keep = i < j
            firsts.append(i[keep])
            seconds.append(j[keep])
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    wide = np.minimum(x[i] + size[i], x[j] + size[j]) - np.maximum(x[i], x[j])
    high = np.minimum(y[i] + size[i], y[j] + size[j]) - np.maximum(y[i], y[j])
    hit = (wide > tolerance) & (high > tolerance)
    return i[hit], j[hit]


def _tile_source(layout: DatasetLayout) -> tuple[str, list[Path]]:
    for name, folder in (("tiles", layout.tiles_dir), ("selection", layout.selection_dir)):
        files = sorted(folder.glob("*.parquet")) if folder.exists() else []
        if files:
            return name, files
    return "none", []


def _cohort_settings(layout: DatasetLayout) -> tuple[str, dict | None]:
    """The cohort kind and the selection report (targets and plan) when the dataset has them."""
    report = json.loads(layout.cohort_report_json.read_text()) if layout.cohort_report_json.exists() else None
    if report is not None:
        return report["kind"], report
    if layout.pipeline_yaml.exists():
        cohort = (yaml.safe_load(layout.pipeline_yaml.read_text()) or {}).get("cohort") or {}
        return cohort.get("kind", "tcga"), None
    return "tcga", None


def audit_dataset(layout: DatasetLayout, max_tvd: float = 0.05) -> AuditReport:
    """Check a dataset's splits; ``max_tvd`` bounds each distribution's TVD above the best possible."""
    kind, plan = _cohort_settings(layout)
    slides = read_slides(layout)
    source, files = _tile_source(layout)
    checks = [
        Check("slide splits"),
        Check("patient leakage"),
        Check("tile splits"),
        Check("spatial overlap between splits"),
        Check("every project in val_out"),
        Check("budget"),
        Check("distribution fidelity"),
    ]
    slide_check, patient_check, tile_check, overlap_check, project_check, budget_check, dist_check = checks

    if "split" not in slides.columns:
        slide_check.fail(f"{layout.slides_parquet}: no split column; run `cytosyn data splits` or a build with a cohort section")
        slides = slides.assign(split=None)
    member = cohort_members(slides)
    bad = slides.loc[member & ~slides["split"].isin([TRAIN, VAL_OUT]), "slide_id"]
    slide_check.violations += [f"slide {s}: cohort member without a train/val_out split" for s in bad]
    slide_split = dict(zip(slides["slide_id"], slides["split"]))

    sided = slides[slides["split"].isin([TRAIN, VAL_OUT])]
    sides = sided.groupby("patient_id")["split"].nunique()
    leaked = sided[sided["patient_id"].isin(sides[sides > 1].index)].sort_values("slide_id")
    for patient, group in leaked.groupby("patient_id", sort=True):
        where = ", ".join(f"{a} ({b})" for a, b in zip(group["slide_id"], group["split"]))
        patient_check.fail(f"patient {patient} is on both sides: {where}")

    counts = _scan_tiles(files, slide_split, kind, tile_check, overlap_check, topup_tile_ids(layout))
    if source == "none":
        tile_check.skipped = overlap_check.skipped = "no tiles/ or selection/ files"

    if kind == "external":
        project_check.skipped = "external cohort: every slide is held out"
    elif plan is not None and plan["slides"]["target_val_out"] == 0:
        project_check.skipped = "no val_out slides were asked for"
    else:
        members = slides[member]
        held = set(members.loc[members["split"] == VAL_OUT, "project"])
        # A project with one patient cannot be on both sides; it stays in training.
        patients = members.groupby("project")["patient_id"].nunique()
        missing = sorted(set(patients[patients > 1].index) - held)
        project_check.violations += [f"project {p} has no val_out slide" for p in missing]
        project_check.info = {"projects": int(members["project"].nunique()), "in_val_out": len(held & set(members["project"])),
                              "single_patient_projects": sorted(patients[patients == 1].index)}

    # In the flag representation guidance tiles are counted from the flag, every other split by value.
    column = {TRAIN: TRAIN, VAL_IN: VAL_IN, VAL_OUT: VAL_OUT, GUIDANCE: GUIDANCE if kind == "external" else GUIDANCE + "_flag"}
    _check_budget(plan, counts, budget_check, column)
    _check_distribution(layout, slides, counts, dist_check, column, kind, max_tvd)
    return AuditReport(str(layout.root), source, kind, checks)


def _scan_tiles(
    files: list[Path], slide_split: dict, kind: str, tile_check: Check, overlap_check: Check, topups: set[str]
) -> pd.DataFrame:
    """Per-slide tile counts of each split; records tile-level violations on the way.

    Curation's top-up replacements are checked like every tile but not counted against the selection's
    budget: they stand in for removed tiles, which stay in the manifest with kept=False.
    """
    rows = []
    allowed = {TRAIN: {TRAIN, VAL_IN}, VAL_OUT: {VAL_OUT}} if kind != "external" else {VAL_OUT: {VAL_OUT, GUIDANCE}}
    for path in tqdm(files, desc="audit", unit="slide", dynamic_ncols=True, disable=len(files) < 100):
        t = pd.read_parquet(path, columns=TILE_COLUMNS)
        if t.empty:
            continue
        for slide_id in sorted(set(t["slide_id"]) - {path.stem}):
            tile_check.fail(f"{path}: holds tiles of slide {slide_id}")
        slide_id = path.stem
        side = slide_split.get(slide_id)
        t["guidance"] = t["guidance"].fillna(False).astype(bool)
        unknown = sorted(set(t["split"].dropna()) - set(SPLITS)) + (["<null>"] if t["split"].isna().any() else [])
        if unknown:
            tile_check.fail(f"{path}: unknown split value(s) {unknown}")
        wrong = sorted(set(t["split"].dropna()) - allowed.get(side, set()))
        if wrong:
            tile_check.fail(f"slide {slide_id} ({side or 'not in the cohort'}): has {'/'.join(wrong)} tiles")
        flagged = t.loc[t["guidance"], "split"]
        guidance_home = GUIDANCE if kind == "external" else TRAIN
        if (flagged != guidance_home).any():
            tile_check.fail(f"slide {slide_id}: guidance flag on {sorted(set(flagged) - {guidance_home})} tiles (only {guidance_home} tiles may be guidance)")
        if t["tile_id"].duplicated().any():
            tile_check.fail(f"slide {slide_id}: tile_id {t.loc[t['tile_id'].duplicated(), 'tile_id'].iloc[0]} appears twice")
        i, j = overlapping_pairs(t["x"].to_numpy(), t["y"].to_numpy(), t["read_size_level0"].to_numpy())
        split = t["split"].to_numpy()
        cross = split[i] != split[j]
        for a, b in list(zip(i[cross], j[cross]))[:MAX_EXAMPLES]:
            overlap_check.fail(
                f"slide {slide_id}: {split[a]} tile {t['tile_id'].iat[a]} at ({t['x'].iat[a]}, {t['y'].iat[a]}) overlaps "
                f"{split[b]} tile {t['tile_id'].iat[b]} at ({t['x'].iat[b]}, {t['y'].iat[b]})"
            )
        selected = t[~t["tile_id"].isin(topups)]
        per = selected.groupby("split").size().to_dict()
        per[GUIDANCE + "_flag"] = int(selected["guidance"].sum())
        rows.append({"slide_id": slide_id, **per})
    frame = pd.DataFrame(rows)
    for col in (*SPLITS, GUIDANCE + "_flag"):
        frame[col] = frame[col].fillna(0).astype(int) if col in frame else 0
    return frame.set_index("slide_id") if not frame.empty else frame


def _check_budget(plan: dict | None, counts: pd.DataFrame, budget_check: Check, column: dict[str, str]) -> None:
    if plan is None:
        budget_check.skipped = "no reports/cohort.json (the dataset has no cohort selection)"
        return
    for name, d in plan["splits"].items():
        have = int(counts[column[name]].sum()) if len(counts) else 0
        budget_check.info[name] = {"target": d["target"], "planned": d["achieved"], "in_dataset": have}
        if have != d["achieved"]:
            budget_check.fail(f"{name}: {have} tiles in the dataset but {d['achieved']} were selected")
        if d["achieved"] < d["target"]:
            budget_check.info[name]["shortfall"] = f"{d['target'] - d['achieved']} tiles asked for could not be supplied"


def _check_distribution(layout: DatasetLayout, slides: pd.DataFrame, counts: pd.DataFrame, dist_check: Check,
                        column: dict[str, str], kind: str, max_tvd: float) -> None:
    """Recomputed from slides.parquet, the candidate counts and the tiles, never taken from the
    selection's report: the audit must catch a dataset whose files no longer match what was reported."""
    external = kind == "external"
    members = slides[cohort_members(slides)]
    if not external:
        s = val_out_fidelity(members, members["split"] == VAL_OUT)
        dist_check.info["val_out slides"] = s
        if s["tvd_tss"] - s["tvd_tss_floor"] > max_tvd:
            dist_check.fail(f"val_out slides: site TVD {s['tvd_tss']:.4f} exceeds its best possible {s['tvd_tss_floor']:.4f} by more than {max_tvd}")
    if not len(counts):
        return
    usable = slides[(slides["status"] == "ok") & slides["split"].notna()]
    capacity, unreadable = candidate_counts(layout, usable["slide_id"].tolist())
    for slide_id in sorted(unreadable):
        dist_check.fail(unreadable[slide_id])
    usable = usable.assign(capacity=capacity)
    # Selected tiles beyond a slide's candidate cells (a candidate file deleted or rewritten since): the
    # capacity-bound "best possible" below would then excuse any distribution.
    in_slide = counts[list(SPLITS)].sum(axis=1).reindex(usable["slide_id"], fill_value=0).to_numpy()
    for slide_id, n, cap in zip(usable["slide_id"], in_slide, capacity):
        if n > cap and slide_id not in unreadable:
            dist_check.fail(f"slide {slide_id}: {n} selected tiles but {cap} candidate cells in {layout.candidates_path(slide_id)}; "
                            "the candidates changed since the selection: rerun the build")
    for name, side in split_sources(external).items():
        src = usable[usable["split"] == side]
        drawn = {split: counts[col].reindex(src["slide_id"], fill_value=0).to_numpy() for split, col in column.items()}
        if not drawn[name].any():
            continue
        d = split_fidelity(name, src, drawn, external)
        dist_check.info[name] = d
        for level, what in (("tss", "site"), ("project", "project")):
            if d[f"tvd_{level}"] - d[f"tvd_{level}_floor"] > max_tvd:
                dist_check.fail(f"{name}: {what} TVD {d[f'tvd_{level}']:.4f} exceeds its best possible "
                                f"{d[f'tvd_{level}_floor']:.4f} by more than {max_tvd}")
