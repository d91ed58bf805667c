"""TSS-stratified, budgeted tile selection and the tile-level splits (paper §3.2, §4.1).

Two phases keep 40M-tile selections fast and small in memory:

1. ``plan_selection`` works on per-slide COUNTS only (one row per slide, vectorised numpy): each
   split's total is apportioned to strata — (project, tissue source site) pairs — in proportion to
   their share of the split's slides, then evenly across each stratum's slides, capped by what a
   slide can supply; whatever a slide or stratum cannot supply is redistributed (``apportion``).
2. ``draw_cells`` then materialises one slide at a time: a permutation of the slide's candidate
   cells (sorted by y, x) from its own generator is cut into consecutive segments, so the splits of a
   slide can never share a cell.

On a training slide the segments are ``val_in | train`` and the first ``n_guidance`` train cells are
flagged ``guidance``; on a val_out slide the only segment is ``val_out``. ``val_in`` is planned
before the training budget (each slide keeps at least one cell for training), so a budget that
asks for every candidate still leaves val_in cells, and changing the budget never moves val_in. In
an external cohort the segments are ``guidance | val_out`` (the conditioning and reference sets),
drawn in proportion to each slide's candidate count, i.e. uniformly over all candidate cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cytosyn.cohort.splits import GUIDANCE, TRAIN, VAL_IN, VAL_OUT, SlideSplitReport, assign_slide_splits
from cytosyn.cohort.stratify import apportion, tvd
from cytosyn.config import CohortConfig, ConfigError, PipelineConfig
from cytosyn.errors import one_line
from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic, write_text_atomic
from cytosyn.io.hashing import slide_rng, stable_hash
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides, write_slide_selection
from cytosyn.parallel import map_unordered

COUNT_COLUMNS = {VAL_IN: "n_val_in", TRAIN: "n_train", VAL_OUT: "n_val_out", GUIDANCE: "n_guidance"}
SPLIT_ORDER = (VAL_IN, TRAIN, VAL_OUT, GUIDANCE)
# Candidates are drawn, and selection rows written, in this order: neither depends on the file's row order.
_CELL_ORDER = [("y", "ascending"), ("x", "ascending"), ("tile_id", "ascending")]
_SPLIT_NAMES = pa.array(SPLIT_ORDER, pa.string())
# Slides per Dask task: one slide's selection takes about as long as a task's own overhead (~4 ms).
SELECTION_BATCH = 64
PLAN_COLUMNS = ["slide_id", "tss_code", "project", "split", "capacity", *COUNT_COLUMNS.values()]


def _selection_seed(seed: int) -> int:
    # The tiling stage may draw from slide_rng(seed, slide_id) too; a salted seed keeps the cohort's
    # draws independent of it.
    return stable_hash("cohort-selection", seed)


def _strata(slides: pd.DataFrame) -> np.ndarray:
    return (slides["project"].astype(str) + "/" + slides["tss_code"].astype(str)).to_numpy()


def stratum_allocation(total: int, strata: np.ndarray, weights: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best capacity-respecting split of ``total`` over strata: ``apportion`` in proportion to each
    stratum's summed ``weights``, none above its slides' summed ``caps``. Returns (the stratum index of
    every slide, each stratum's count)."""
    codes, inverse = np.unique(strata, return_inverse=True)
    per_weight = np.bincount(inverse, weights=weights, minlength=len(codes))
    per_cap = np.bincount(inverse, weights=caps, minlength=len(codes)).astype(np.int64)
    stratum_key = np.array([stable_hash("stratum", c) for c in codes], dtype=np.int64)
    return inverse, apportion(total, per_weight, per_cap, stratum_key)


def _two_level(total: int, strata: np.ndarray, caps: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Apportion ``total`` to strata by their slide counts, then evenly within each stratum."""
    out = np.zeros(len(caps), dtype=np.int64)
    if len(caps) == 0:
        return out
    inverse, quota = stratum_allocation(total, strata, np.ones(len(caps)), caps)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(inverse, minlength=len(quota)))))
    for s in np.flatnonzero(quota):
        idx = order[bounds[s] : bounds[s + 1]]
        out[idx] = apportion(int(quota[s]), np.ones(idx.size), caps[idx], tiebreak[idx])
    return out


def split_capacity(name: str, capacity: np.ndarray, drawn: dict[str, np.ndarray], external: bool) -> np.ndarray:
    """What each source slide of split ``name`` can supply to it, given the per-slide counts ``drawn``
    of the splits taken before it from the same slides (val_in → train → guidance; guidance → val_out
    in an external cohort)."""
    if external:
        return capacity if name == GUIDANCE else capacity - drawn[GUIDANCE]
    if name == VAL_IN:
        # Every slide keeps at least one cell for training.
        return np.maximum(capacity - 1, 0)
    if name == TRAIN:
        return capacity - drawn[VAL_IN]
    if name == GUIDANCE:
        return drawn[TRAIN]
    return capacity


def plan_selection(slides: pd.DataFrame, cohort: CohortConfig, seed: int) -> pd.DataFrame:
    """Per-slide tile counts of every split.

    ``slides`` has one row per usable slide: slide_id, tss_code, project, split (slide level) and
    capacity (its number of candidate cells). Returns PLAN_COLUMNS sorted by slide_id.
    """
    p = slides[["slide_id", "tss_code", "project", "split", "capacity"]].sort_values("slide_id", kind="stable")
    p = p.reset_index(drop=True)
    cap = p["capacity"].to_numpy(dtype=np.int64)
    strata = _strata(p)
    tiebreak = np.array([stable_hash(seed, "tiles", s) for s in p["slide_id"]], dtype=np.int64)
    counts = {col: np.zeros(len(p), dtype=np.int64) for col in COUNT_COLUMNS.values()}
    if cohort.kind == "external":
        guidance = apportion(cohort.conditioning_tiles, cap, split_capacity(GUIDANCE, cap, {}, True), tiebreak)
        counts["n_guidance"] = guidance
        counts["n_val_out"] = apportion(cohort.reference_tiles, cap, split_capacity(VAL_OUT, cap, {GUIDANCE: guidance}, True), tiebreak)
    else:
        tr = np.flatnonzero(p["split"].to_numpy() == TRAIN)
        out = np.flatnonzero(p["split"].to_numpy() == VAL_OUT)
        vin = _two_level(cohort.val_in_tiles, strata[tr], split_capacity(VAL_IN, cap[tr], {}, False), tiebreak[tr])
        left = split_capacity(TRAIN, cap[tr], {VAL_IN: vin}, False)
        budget = int(left.sum()) if cohort.budget is None else cohort.budget
        n_train = _two_level(budget, strata[tr], left, tiebreak[tr])
        counts["n_val_in"][tr] = vin
        counts["n_train"][tr] = n_train
        counts["n_guidance"][tr] = _two_level(cohort.guidance_tiles, strata[tr], split_capacity(GUIDANCE, cap[tr], {TRAIN: n_train}, False), tiebreak[tr])
        counts["n_val_out"][out] = _two_level(cohort.val_out_tiles, strata[out], split_capacity(VAL_OUT, cap[out], {}, False), tiebreak[out])
    for col, values in counts.items():
        p[col] = values
    return p[PLAN_COLUMNS]


def draw_cells(capacity: int, counts: dict[str, int], seed: int, slide_id: str, external: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The picks of one slide: positions into its candidates sorted by (y, x), split codes (indices
    into ``SPLIT_ORDER``) and guidance flags."""
    perm = slide_rng(_selection_seed(seed), slide_id).permutation(capacity)
    if external:
        segments = [(GUIDANCE, counts["n_guidance"]), (VAL_OUT, counts["n_val_out"])]
    else:
        segments = [(VAL_IN, counts["n_val_in"]), (TRAIN, counts["n_train"]), (VAL_OUT, counts["n_val_out"])]
    total = sum(n for _, n in segments)
    if total > capacity:
        raise ValueError(f"slide {slide_id}: {total} tiles planned but only {capacity} candidates")
    codes = np.repeat(np.array([SPLIT_ORDER.index(s) for s, _ in segments], dtype=np.int8), [n for _, n in segments])
    guidance = codes == SPLIT_ORDER.index(GUIDANCE)
    if not external:
        start = counts["n_val_in"]
        guidance[start : start + counts["n_guidance"]] = True
    return perm[:total], codes, guidance


@dataclass(frozen=True)
class _SlideJob:
    root: str
    slide_id: str
    seed: int
    external: bool
    counts: tuple[tuple[str, int], ...]


def _crashed_selection(job: _SlideJob, exc: BaseException) -> dict:
    path = DatasetLayout(job.root).candidates_path(job.slide_id)
    return {"slide_id": job.slide_id, "error": one_line(
        f"{path}: the worker process died ({exc.__class__.__name__}) selecting this slide; the file is probably "
        "corrupt: delete it and rerun the build to recompute it")}


def _select_slide(job: _SlideJob) -> dict:
    layout = DatasetLayout(job.root)
    try:
        cands = _read_candidates(layout.candidates_path(job.slide_id))
        order = pc.sort_indices(cands, sort_keys=_CELL_ORDER).to_numpy()
        positions, codes, guidance = draw_cells(len(order), dict(job.counts), job.seed, job.slide_id, job.external)
        # Positions index the cells in (y, x, tile_id) order: sorting them puts the picks in cell order.
        by_cell = np.argsort(positions)
        picked = cands.take(order[positions[by_cell]])
        picked = picked.append_column("split", pc.take(_SPLIT_NAMES, codes[by_cell])).append_column("guidance", pa.array(guidance[by_cell]))
        write_slide_selection(layout, job.slide_id, picked)
        return {"slide_id": job.slide_id, "error": None}
    except Exception as exc:  # one unreadable candidate file must not stop the other slides
        return {"slide_id": job.slide_id, "error": _candidates_error(layout.candidates_path(job.slide_id), exc)}


def _read_candidates(path: Path) -> pa.Table:
    """A slide's candidate cells (none without a file) in the file's row order, typed as the file has them:
    writing the selection casts them to SELECTION."""
    if not path.exists():
        return schema.CANDIDATES.empty_table()
    # A slide is a few thousand rows: reader threads cost more than they save (workers parallelise slides).
    with pq.ParquetFile(path) as f:
        # read() skips the columns a file lacks; select() makes a missing one this slide's error.
        return f.read(columns=schema.CANDIDATES.names, use_threads=False).select(schema.CANDIDATES.names)


def _candidates_error(path: Path, exc: Exception) -> str:
    return f"{path}: {exc.__class__.__name__}: {one_line(exc)}; rebuild this slide's candidates (delete the file and rerun the build)"


def candidate_counts(layout: DatasetLayout, slide_ids: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """Each slide's number of candidate cells (0 without a file), read from the Parquet footers, and
    the error of every slide whose file cannot be read (its count is 0)."""
    counts, errors = np.zeros(len(slide_ids), dtype=np.int64), {}
    for i, slide_id in enumerate(slide_ids):
        path = layout.candidates_path(slide_id)
        try:
            counts[i] = pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
        except Exception as exc:  # a corrupt file is its slide's error; the others go on
            errors[slide_id] = _candidates_error(path, exc)
    return counts, errors


@dataclass
class SelectionReport:
    kind: str
    seed: int
    slides: SlideSplitReport
    splits: dict[str, dict] = field(default_factory=dict)
    per_tss: list[dict] = field(default_factory=list)
    per_project: list[dict] = field(default_factory=list)
    slides_without_candidates: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stale_removed: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "slides"}
        return {"slides": self.slides.to_dict(), **d}

    def markdown(self) -> str:
        s = self.slides
        lines = [
            "# Cohort selection",
            "",
            f"Kind `{self.kind}`, seed {self.seed}, slide split `{s.mode}`.",
            "",
            f"- cohort slides: {s.members}; val_out: {s.val_out} of {s.target_val_out} asked "
            f"({s.val_out_patients} patient(s), {s.projects_in_val_out}/{s.projects} projects, {s.tss_in_val_out}/{s.tss} sites)",
            f"- training slides cover {s.tss_in_train}/{s.tss} sites",
            f"- val_out slide-level TVD: per site {s.tvd_tss:.4f} (best possible by rounding {s.tvd_tss_floor:.4f}), "
            f"per project {s.tvd_project:.4f}",
            *[f"- note: {n}" for n in s.notes],
        ]
        if self.splits:
            lines += self._tile_tables()
        else:
            lines += ["", "Slide-level split only: the dataset has no candidate cells to select tiles from."]
        if self.slides_without_candidates:
            lines += ["", f"{len(self.slides_without_candidates)} usable slide(s) have no candidate cells."]
        if self.errors:
            lines += ["", "## Errors", "", *[f"- {e}" for e in self.errors]]
        return "\n".join(lines) + "\n"

    def _tile_tables(self) -> list[str]:
        names = list(self.splits)
        lines = [
            "",
            "| split | target | achieved | TVD per site | best possible | TVD per project | best possible |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, d in self.splits.items():
            lines.append(
                f"| {name} | {d['target']} | {d['achieved']} | {d['tvd_tss']:.4f} | {d['tvd_tss_floor']:.4f} "
                f"| {d['tvd_project']:.4f} | {d['tvd_project_floor']:.4f} |"
            )
        lines += ["", "## Per project (tiles: achieved / target)", "", "| project | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for row in self.per_project:
            cells = [f"{row[n]} / {row[n + '_target']:.0f}" for n in names]
            lines.append(f"| {row['project']} | " + " | ".join(cells) + " |")
        worst = sorted(self.per_tss, key=lambda r: -max(abs(r[n] - r[n + "_target"]) for n in names))[:20]
        lines += ["", "## Sites furthest from their target (tiles: achieved / target)", "",
                  "| site | project | slides | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
        for row in worst:
            cells = [f"{row[n]} / {row[n + '_target']:.1f}" for n in names]
            lines.append(f"| {row['tss_code']} | {row['project']} | {row['slides']} | " + " | ".join(cells) + " |")
        return lines


def split_sources(external: bool) -> dict[str, str]:
    """Every tile split the selection draws, and the slide split it is drawn from."""
    if external:
        return {GUIDANCE: VAL_OUT, VAL_OUT: VAL_OUT}
    return {TRAIN: TRAIN, VAL_IN: TRAIN, GUIDANCE: TRAIN, VAL_OUT: VAL_OUT}


def _split_targets(cohort: CohortConfig, plan: pd.DataFrame) -> dict[str, tuple[int, str]]:
    """Each split's asked total and the slide split it is drawn from."""
    if cohort.kind == "external":
        targets = {GUIDANCE: cohort.conditioning_tiles, VAL_OUT: cohort.reference_tiles}
    else:
        if cohort.budget is None:
            tr = plan[plan["split"] == TRAIN]
            budget = int(split_capacity(TRAIN, tr["capacity"].to_numpy(), {VAL_IN: tr["n_val_in"].to_numpy()}, False).sum())
        else:
            budget = cohort.budget
        targets = {TRAIN: budget, VAL_IN: cohort.val_in_tiles, GUIDANCE: cohort.guidance_tiles, VAL_OUT: cohort.val_out_tiles}
    return {name: (targets[name], side) for name, side in split_sources(cohort.kind == "external").items()}


def split_fidelity(name: str, src: pd.DataFrame, drawn: dict[str, np.ndarray], external: bool) -> dict[str, float]:
    """How far split ``name``'s tiles are from its target distribution, per site and per project.

    ``src`` holds the split's source slides (tss_code, project, capacity) and ``drawn`` every split's
    per-slide tile counts on them. The target is each site's (project's) share of the source slides
    (of their candidates in an external cohort). The floor is the TVD of the best allocation of the
    same number of tiles to (project, site) strata that respects what each stratum's slides can
    supply (``stratum_allocation``, the selection's own first step): capacity and whole tiles keep
    even a perfect selection that far from the target.
    """
    capacity = src["capacity"].to_numpy(dtype=np.int64)
    weights = capacity if external else np.ones(len(src), dtype=np.int64)
    got = drawn[name]
    inverse, best = stratum_allocation(int(got.sum()), _strata(src), weights, split_capacity(name, capacity, drawn, external))
    first = np.unique(inverse, return_index=True)[1]
    out = {}
    for level, column in (("tss", "tss_code"), ("project", "project")):
        keys = src[column].to_numpy()
        target = pd.Series(weights).groupby(keys).sum().to_dict()
        out[f"tvd_{level}"] = tvd(pd.Series(got).groupby(keys).sum().to_dict(), target)
        out[f"tvd_{level}_floor"] = tvd(pd.Series(best).groupby(keys[first]).sum().to_dict(), target)
    return out


def summarise(plan: pd.DataFrame, cohort: CohortConfig) -> tuple[dict, list[dict], list[dict]]:
    """Achieved vs target per split (``split_fidelity``), and achieved vs each site's and project's
    share of the target."""
    external = cohort.kind == "external"
    splits, tss_rows, project_rows = {}, {}, {}
    for name, (target, side) in _split_targets(cohort, plan).items():
        src = plan[plan["split"] == side]
        weight = src["capacity"] if external else pd.Series(1, index=src.index)
        got = src[COUNT_COLUMNS[name]]
        drawn = {split: src[column].to_numpy() for split, column in COUNT_COLUMNS.items()}
        splits[name] = {"target": int(target), "achieved": int(got.sum()), **split_fidelity(name, src, drawn, external)}
        per_tss_w = weight.groupby(src["tss_code"]).sum()
        per_tss = got.groupby(src["tss_code"]).sum()
        per_proj_w = weight.groupby(src["project"]).sum()
        per_proj = got.groupby(src["project"]).sum()
        for table, counts, weights, key in ((tss_rows, per_tss, per_tss_w, "tss_code"), (project_rows, per_proj, per_proj_w, "project")):
            for k in weights.index:
                row = table.setdefault(k, {key: k})
                row[name] = int(counts.get(k, 0))
                row[name + "_target"] = float(target * weights[k] / weights.sum())
    site_info = plan.groupby("tss_code").agg(project=("project", "first"), slides=("slide_id", "size"))
    for k, row in tss_rows.items():
        row.update(project=site_info.at[k, "project"], slides=int(site_info.at[k, "slides"]))
    fill = {n: 0 for n in splits} | {n + "_target": 0.0 for n in splits}
    tss_list = [fill | tss_rows[k] for k in sorted(tss_rows)]
    project_list = [fill | project_rows[k] for k in sorted(project_rows)]
    return splits, tss_list, project_list


def write_slide_splits(layout: DatasetLayout, split: dict[str, str | None]) -> None:
    """Add (or replace) the slide-level ``split`` column of slides.parquet (``split`` maps slide_id to
    its split), keeping every other column and the row order."""
    table = pq.read_table(layout.slides_parquet)
    if "split" in table.column_names:
        table = table.drop_columns(["split"])
    values = [split.get(s) for s in table.column("slide_id").to_pylist()]
    table = table.append_column(schema.SLIDE_SPLIT_COLUMNS.field("split"), pa.array(values, pa.string()))
    write_parquet_atomic(layout.slides_parquet, table)


def _split_slides(layout: DatasetLayout, cohort: CohortConfig, seed: int) -> tuple[pd.DataFrame, SlideSplitReport]:
    slides = read_slides(layout).sort_values("slide_id", kind="stable").reset_index(drop=True)
    split, report = assign_slide_splits(slides, cohort, seed)
    write_slide_splits(layout, dict(zip(slides["slide_id"], split)))
    return slides.assign(split=split), report


def _write_report(layout: DatasetLayout, report: SelectionReport) -> None:
    write_text_atomic(layout.cohort_report_json, json.dumps(report.to_dict(), indent=1, sort_keys=True) + "\n")
    write_text_atomic(layout.cohort_report_md, report.markdown())


def write_slide_split(layout: DatasetLayout, cohort: CohortConfig, seed: int) -> SelectionReport:
    """Only the slide-level split (an inventory without candidates): slides.parquet and the report."""
    _, split_report = _split_slides(layout, cohort, seed)
    report = SelectionReport(kind=cohort.kind, seed=seed, slides=split_report)
    _write_report(layout, report)
    return report


def select_tiles(
    layout: DatasetLayout, cohort: CohortConfig, seed: int, workers: int = 1, dask_address: str | None = None
) -> SelectionReport:
    """Slide splits into slides.parquet, ``selection/<slide_id>.parquet`` for every usable slide, and
    ``reports/cohort.{json,md}``. Per-slide failures are recorded in the report, never raised."""
    slides, split_report = _split_slides(layout, cohort, seed)
    usable = slides[(slides["status"] == "ok") & slides["split"].notna()].copy()
    usable["capacity"], unreadable = candidate_counts(layout, usable["slide_id"].tolist())
    plan = plan_selection(usable, cohort, seed)

    jobs = [
        _SlideJob(str(layout.root), r.slide_id, seed, cohort.kind == "external",
                  tuple((c, int(getattr(r, c))) for c in COUNT_COLUMNS.values()))
        for r in plan.itertuples(index=False)
        if r.slide_id not in unreadable
    ]
    results = map_unordered(
        _select_slide, jobs, workers=workers, dask_address=dask_address, desc="selection",
        on_crash=_crashed_selection, batch_size=SELECTION_BATCH,
    )
    errors = {r["slide_id"]: r["error"] for r in results if r["error"]} | unreadable
    # A slide whose selection failed keeps no old one: it would not match the plan.
    stale = _remove_stale_selections(layout, set(plan["slide_id"]) - set(errors))

    splits, per_tss, per_project = summarise(plan, cohort)
    report = SelectionReport(
        kind=cohort.kind,
        seed=seed,
        slides=split_report,
        splits=splits,
        per_tss=per_tss,
        per_project=per_project,
        slides_without_candidates=sorted(plan.loc[(plan["capacity"] == 0) & ~plan["slide_id"].isin(unreadable), "slide_id"]),
        errors=[errors[k] for k in sorted(errors)],
        stale_removed=stale,
    )
    _write_report(layout, report)
    return report


def write_cohort_selection(layout: DatasetLayout, cfg: PipelineConfig) -> SelectionReport:
    """The build's cohort stage: ``select_tiles`` with the config's cohort section, seed and workers."""
    if cfg.cohort is None:
        raise ConfigError("the config has no cohort section; add `cohort:` (see docs/cohort.md)")
    return select_tiles(layout, cfg.cohort, cfg.seed, cfg.workers, cfg.dask_address)


def _remove_stale_selections(layout: DatasetLayout, keep: set[str]) -> int:
    """A slide that left the cohort (now excluded or failed), or whose selection failed, must not keep an
    old selection file (nor the tile manifest made from it)."""
    if not layout.selection_dir.exists():
        return 0
    stale = [p for p in layout.selection_dir.glob("*.parquet") if p.stem not in keep]
    for p in stale:
        p.unlink()
        layout.tiles_path(p.stem).unlink(missing_ok=True)
    return len(stale)
