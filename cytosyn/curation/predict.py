"""Curating a dataset: filters, fold-averaged artifact probabilities, `kept`, and the optional top-up.

Per slide, ``tiles/<slide_id>.parquet`` is rewritten with ``artifact_prob`` and ``kept``
(CURATION_COLUMNS) and ``curation/predictions/<slide_id>.parquet`` records the details. With top-up,
tiles that are not kept are replaced by cells of the same slide that no split used (candidates minus
the build's selection), drawn in a fixed per-slide order and extracted as PNGs, until the slide has
as many kept tiles as it had selected: the TSS budget still holds, and a slide that runs out of cells
reports its shortfall. Every output is a pure function of (dataset, heads, config, seed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from cytosyn.config import CurationConfig, PipelineConfig
from cytosyn.curation.classifier import HeadEnsemble, average_heads
from cytosyn.curation.features import BackboneSetup, LazyBackbone, cached_embed, setup_from_heads
from cytosyn.curation.filters import FILTER_NAMES, MEASURE_NAMES, count_reasons, filter_reasons
from cytosyn.curation.reread import open_recorded_slide
from cytosyn.errors import one_line
from cytosyn.io import schema
from cytosyn.io.atomic import write_parquet_atomic, write_text_atomic
from cytosyn.io.hashing import slide_rng, stable_hash
from cytosyn.io.layout import DatasetLayout
from cytosyn.io.manifests import read_slides
from cytosyn.nn.device import resolve_device
from cytosyn.tiling.extract import extract_tiles

PREDICT_REPORT_JSON = "predict_report.json"
PREDICT_REPORT_MD = "predict_report.md"
CURATION_NAMES = schema.column_names(schema.CURATION_COLUMNS)


@dataclass
class SlideCuration:
    """What curation did to one slide. ``budget`` is the number of tiles the build selected."""

    slide_id: str
    status: str = "ok"  # ok | skipped (already curated with the same heads and settings) | error
    error: str | None = None
    budget: int = 0
    n_tiles: int = 0  # manifest rows after curation: the selected tiles plus drawn top-up tiles
    n_kept: int = 0
    n_filtered: dict = field(default_factory=lambda: {name: 0 for name in FILTER_NAMES})
    n_classifier_removed: int = 0
    n_unreadable: int = 0
    n_topup_drawn: int = 0
    n_topup_kept: int = 0
    shortfall: int = 0  # with top-up: budget − kept when the slide ran out of unused cells
    tile_errors: list[str] = field(default_factory=list)


@dataclass
class PredictSummary:
    slides: list[SlideCuration]
    heads: str
    backbone: str
    threshold: float
    top_up: bool

    @property
    def errors(self) -> list[str]:
        out = [f"{s.slide_id}: {s.error}" for s in self.slides if s.status == "error"]
        return out + [e for s in self.slides for e in s.tile_errors]

    def totals(self) -> dict:
        ok = [s for s in self.slides if s.status != "error"]
        filtered = {name: sum(s.n_filtered[name] for s in ok) for name in FILTER_NAMES}
        return {
            "slides": len(self.slides),
            "slides_with_errors": sum(s.status == "error" for s in self.slides),
            "budget": sum(s.budget for s in ok),
            "tiles": sum(s.n_tiles for s in ok),
            "kept": sum(s.n_kept for s in ok),
            "filtered": filtered,
            "classifier_removed": sum(s.n_classifier_removed for s in ok),
            "unreadable": sum(s.n_unreadable for s in ok),
            "topup_drawn": sum(s.n_topup_drawn for s in ok),
            "topup_kept": sum(s.n_topup_kept for s in ok),
            "shortfall": sum(s.shortfall for s in ok),
        }

    def to_json(self) -> dict:
        return {
            "heads": self.heads,
            "backbone": self.backbone,
            "threshold": self.threshold,
            "top_up": self.top_up,
            "totals": self.totals(),
            "slides": [asdict(s) for s in self.slides],
            "errors": self.errors,
        }


def curation_key(ensemble: HeadEnsemble, setup: BackboneSetup, ccfg: CurationConfig, seed: int) -> str:
    """Identity of everything that decides a slide's curation; equal keys mean equal outputs."""
    settings = {
        "heads": ensemble.meta.get("tensors_sha256"),
        "backbone": setup.fingerprint,
        "threshold": ccfg.threshold,
        "filters": ccfg.filters.model_dump(),
        "top_up": ccfg.top_up,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Run:
    layout: DatasetLayout
    cfg: PipelineConfig
    ccfg: CurationConfig
    ensemble: HeadEnsemble
    setup: BackboneSetup
    backbone: LazyBackbone
    device: str
    key: str

    def score(self, slide_id: str, paths: list[str], shas: list[str]) -> pd.DataFrame:
        """Filters, then the heads on the tiles that pass; PREDICTIONS columns except the bookkeeping ones."""
        f = self.ccfg.filters
        emb = cached_embed(
            self.layout.curation_features_path(self.setup.fingerprint, slide_id), paths, shas, self.setup, self.backbone,
            f.white_level, select=lambda m: filter_reasons(m, f) == "",
            batch_size=self.ccfg.batch_size, num_workers=self.ccfg.num_workers, device=self.device, desc=f"curating {slide_id}",
        )
        reasons = filter_reasons(emb.measures, f)
        failed = np.array([bool(e) for e in emb.errors], dtype=bool)
        reasons[failed] = "error"
        scored = reasons == ""
        per_head = self.ensemble.predict_proba_per_head(emb.features[scored])
        prob = np.full(len(paths), np.nan)
        prob[scored] = average_heads(per_head)
        heads: list[list[float]] = [[] for _ in paths]
        for i, row in zip(np.flatnonzero(scored), per_head):
            heads[i] = row.tolist()
        out = pd.DataFrame({"filter": reasons.astype(str), "error": [e or None for e in emb.errors]})
        for j, name in enumerate(MEASURE_NAMES):
            out[name] = emb.measures[:, j]
        out["head_probs"] = heads
        out["artifact_prob"] = prob
        out["kept"] = scored & (prob < self.ccfg.threshold)
        return out


def predict_dataset(
    layout: DatasetLayout,
    ensemble: HeadEnsemble,
    setup: BackboneSetup,
    cfg: PipelineConfig,
    heads_dir: str | Path,
) -> PredictSummary:
    """Curate every slide that has a tile manifest; write the predict report.

    A slide that fails is recorded with its reason and the others go on.
    """
    ccfg = cfg.curation or CurationConfig()
    device = resolve_device(ccfg.device)
    run = _Run(layout, cfg, ccfg, ensemble, setup, LazyBackbone(setup, device), device, curation_key(ensemble, setup, ccfg, cfg.seed))
    ids = sorted(p.stem for p in layout.tiles_dir.glob("*.parquet"))
    results = []
    for slide_id in tqdm(ids, desc="curation", unit="slide"):
        try:
            results.append(_curate_slide(run, slide_id))
        except Exception as exc:  # noqa: BLE001 - bad input never stops the batch
            reason = one_line(exc)
            results.append(SlideCuration(slide_id, status="error", error=reason))
    heads_dir = Path(heads_dir).resolve()
    shown = heads_dir.relative_to(layout.root) if heads_dir.is_relative_to(layout.root) else heads_dir
    summary = PredictSummary(results, str(shown), setup.describe(), ccfg.threshold, ccfg.top_up)
    write_predict_report(layout, summary)
    return summary


def _read_predictions(layout: DatasetLayout, slide_id: str) -> pd.DataFrame | None:
    path = layout.curation_predictions_path(slide_id)
    return pd.read_parquet(path) if path.exists() else None


def _curate_slide(run: _Run, slide_id: str) -> SlideCuration:
    layout = run.layout
    tiles_path = layout.tiles_path(slide_id)
    if not tiles_path.exists():
        raise FileNotFoundError(f"{tiles_path}: no tile manifest; run `cytosyn data build` for this dataset first")
    manifest = pd.read_parquet(tiles_path)
    prev = _read_predictions(layout, slide_id)
    prev_topups = set(prev.loc[prev["topup"], "tile_id"]) if prev is not None else set()

    if (
        prev is not None
        and all(c in manifest for c in CURATION_NAMES)
        and (prev["curation_key"] == run.key).all()
        and prev["tile_id"].tolist() == manifest["tile_id"].tolist()
    ):
        return _summarise(slide_id, prev, "skipped", run.ccfg.top_up)

    originals = manifest.loc[~manifest["tile_id"].isin(prev_topups)].drop(columns=CURATION_NAMES, errors="ignore").reset_index(drop=True)
    selection = pd.read_parquet(layout.selection_path(slide_id))
    original_selection = selection.loc[~selection["tile_id"].isin(prev_topups)].reset_index(drop=True)

    preds = run.score(slide_id, [str(layout.resolve(p)) for p in originals["image_path"]], originals["image_sha256"].tolist())
    preds.insert(0, "topup", False)
    topup_tiles = originals.iloc[0:0]
    drawn_ids: list[str] = []
    if run.ccfg.top_up:
        deficit = len(originals) - int(preds["kept"].sum())
        if deficit > 0:
            topup_tiles, topup_preds, drawn_ids = _top_up(run, slide_id, originals, preds, original_selection, deficit)
            preds = pd.concat([preds, topup_preds], ignore_index=True)

    final_tiles = pd.concat([originals, topup_tiles], ignore_index=True)
    new_topups = set(topup_tiles["tile_id"])
    if prev_topups and prev_topups != new_topups:
        # Drop the old top-ups from the manifests before the new predictions name other ones, so a run
        # killed in between can still tell the build's own tiles from replacements.
        _write_manifests(layout, slide_id, original_selection, originals, None)
    preds.insert(0, "image_sha256", final_tiles["image_sha256"].to_numpy())
    preds.insert(0, "tile_id", final_tiles["tile_id"].to_numpy())
    preds["curation_key"] = run.key
    write_parquet_atomic(layout.curation_predictions_path(slide_id), preds[schema.CURATION_PREDICTIONS.names], schema.CURATION_PREDICTIONS)
    topup_selection = topup_tiles[[c for c in original_selection.columns]]
    _write_manifests(layout, slide_id, pd.concat([original_selection, topup_selection], ignore_index=True), final_tiles, preds)
    _remove_unused_pngs(layout, originals, (prev_topups | set(drawn_ids)) - new_topups)
    return _summarise(slide_id, preds, "ok", run.ccfg.top_up)


def _write_manifests(layout: DatasetLayout, slide_id: str, selection: pd.DataFrame, tiles: pd.DataFrame, preds: pd.DataFrame | None) -> None:
    """selection/ then tiles/ (the build re-extracts a slide only when its tiles manifest is gone)."""
    write_parquet_atomic(layout.selection_path(slide_id), selection, schema.SELECTION)
    frame = tiles.drop(columns=CURATION_NAMES, errors="ignore").reset_index(drop=True)
    extra = [c for c in frame.columns if c not in schema.TILES.names]
    table = pa.Table.from_pandas(frame[schema.TILES.names], schema=schema.TILES, preserve_index=False)
    for col in extra:
        table = table.append_column(col, pa.array(frame[col].tolist()))
    if preds is not None:
        table = table.append_column("artifact_prob", pa.array(preds["artifact_prob"].to_numpy(), pa.float64()).cast(pa.float32()))
        table = table.append_column("kept", pa.array(preds["kept"].to_numpy(dtype=bool)))
    write_parquet_atomic(layout.tiles_path(slide_id), table)


def _top_up(
    run: _Run, slide_id: str, originals: pd.DataFrame, preds: pd.DataFrame, original_selection: pd.DataFrame, deficit: int
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Draw unused cells in the slide's fixed order until ``deficit`` of them are kept.

    Each drawn tile takes the split columns (split, guidance, …) of the next removed tile it is meant
    to replace, so every split keeps its size. Returns (tile rows, prediction rows, every drawn id —
    including extracted cells past the stopping point, whose PNGs the caller removes).
    """
    layout = run.layout
    cands = pd.read_parquet(layout.candidates_path(slide_id))
    pool = cands.loc[~cands["tile_id"].isin(set(original_selection["tile_id"]))].reset_index(drop=True)
    empty = originals.iloc[0:0]
    if pool.empty:
        return empty, preds.iloc[0:0], []
    order = slide_rng(stable_hash(run.cfg.seed, "curation-top-up"), slide_id).permutation(len(pool))
    inherit = [c for c in original_selection.columns if c not in schema.CANDIDATES.names]
    replaced = originals.loc[~preds["kept"].to_numpy(), inherit].reset_index(drop=True)
    project = Path(originals["image_path"].iloc[0]).parts[1]
    slides = read_slides(layout).set_index("slide_id")

    taken_tiles, taken_preds, drawn = [], [], []
    accepted, pos = 0, 0
    with open_recorded_slide(layout, slides.loc[slide_id]) as slide:
        while accepted < deficit and pos < len(order):
            chunk = pool.iloc[order[pos : pos + max(2 * (deficit - accepted), 8)]].reset_index(drop=True)
            pos += len(chunk)
            for col in inherit:
                chunk[col] = replaced.at[accepted, col]
            tiles = extract_tiles(slide, chunk, layout, project, run.cfg.tiling.png_compression)
            drawn += tiles["tile_id"].tolist()
            scored = run.score(slide_id, [str(layout.resolve(p)) for p in tiles["image_path"]], tiles["image_sha256"].tolist())
            for j in range(len(tiles)):
                row = tiles.iloc[[j]].copy()
                for col in inherit:
                    row[col] = replaced.at[accepted, col]
                taken_tiles.append(row)
                taken_preds.append(scored.iloc[[j]])
                accepted += int(scored["kept"].iat[j])
                if accepted == deficit:
                    break
    topup_preds = pd.concat(taken_preds, ignore_index=True)
    topup_preds.insert(0, "topup", True)
    return pd.concat(taken_tiles, ignore_index=True), topup_preds, drawn


def _remove_unused_pngs(layout: DatasetLayout, originals: pd.DataFrame, tile_ids: set[str]) -> None:
    """PNGs of drawn cells that are not in the manifest any more (an earlier top-up, or drawn past the stop)."""
    if not tile_ids or originals.empty:
        return
    folder = layout.resolve(str(Path(originals["image_path"].iloc[0]).parent))
    for tid in sorted(tile_ids):
        (folder / f"{tid}.png").unlink(missing_ok=True)


def _summarise(slide_id: str, preds: pd.DataFrame, status: str, top_up: bool) -> SlideCuration:
    original = ~preds["topup"].to_numpy()
    filters = preds["filter"].to_numpy(dtype=object)
    kept = preds["kept"].to_numpy(dtype=bool)
    topup = preds["topup"].to_numpy(dtype=bool)
    scored = filters == ""
    budget = int(original.sum())
    drawn = int(topup.sum())
    errors = [f"{slide_id}: {e}" for e in preds["error"].dropna().tolist() if e]
    return SlideCuration(
        slide_id=slide_id,
        status=status,
        budget=budget,
        n_tiles=len(preds),
        n_kept=int(kept.sum()),
        n_filtered=count_reasons(filters),
        n_classifier_removed=int((scored & ~kept).sum()),
        n_unreadable=int((filters == "error").sum()),
        n_topup_drawn=drawn,
        n_topup_kept=int((kept & topup).sum()),
        shortfall=max(0, budget - int(kept.sum())) if top_up else 0,
        tile_errors=errors,
    )


def write_predict_report(layout: DatasetLayout, summary: PredictSummary) -> tuple[Path, Path]:
    """curation/predict_report.json and .md: what was removed, by which stage, and what top-up achieved."""
    data = summary.to_json()
    json_path = layout.curation_dir / PREDICT_REPORT_JSON
    md_path = layout.curation_dir / PREDICT_REPORT_MD
    write_text_atomic(json_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    write_text_atomic(md_path, predict_markdown(data))
    return json_path, md_path


def predict_markdown(data: dict) -> str:
    t = data["totals"]
    lines = [
        "# Artifact curation: predictions",
        "",
        f"- heads: `{data['heads']}`; backbone: {data['backbone']}",
        f"- threshold {data['threshold']}: a tile is kept when its fold-averaged artifact probability is below it",
        f"- top-up: {'on' if data['top_up'] else 'off'}",
        "",
        "| slides | selected (budget) | manifest rows | kept | near-white | low saturation | blur | classifier | unreadable | top-up drawn | top-up kept | shortfall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {t['slides']} | {t['budget']} | {t['tiles']} | {t['kept']} | {t['filtered']['near_white']} | {t['filtered']['low_saturation']} | "
        f"{t['filtered']['blur']} | {t['classifier_removed']} | {t['unreadable']} | {t['topup_drawn']} | {t['topup_kept']} | {t['shortfall']} |",
    ]
    if data["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in data["errors"]]
    return "\n".join(lines) + "\n"


def curate_with_heads(
    layout: DatasetLayout,
    cfg: PipelineConfig,
    heads_dir: str | Path,
    weights: str | Path | None = None,
    weights_subkey: str | None = None,
) -> PredictSummary:
    """Curate a dataset with trained heads: the build's curation stage and `cytosyn data curate predict`.

    The heads were trained on one backbone's features, so the backbone is the one they record,
    weights path included; ``weights`` / ``weights_subkey`` only point to that file elsewhere (its
    sha256 is checked). ``curation.weights`` is not consulted: in a dataset's pipeline.yaml it records
    what the build used, not these heads. The threshold is a decision rule, not part of the heads:
    the config's when it sets one, else the heads' own.
    """
    ensemble = HeadEnsemble.load(heads_dir)
    ccfg = cfg.curation or CurationConfig()
    if "threshold" not in ccfg.model_fields_set:
        ccfg = ccfg.model_copy(update={"threshold": ensemble.meta.get("threshold", 0.5)})
    cfg = cfg.model_copy(update={"curation": ccfg})
    setup = setup_from_heads(ensemble.meta["backbone"], weights, weights_subkey)
    return predict_dataset(layout, ensemble, setup, cfg, heads_dir)
