"""Training shards: contents, determinism, resumable writing, ties to their features, and the DDP/worker-aware
resumable dataset."""

from __future__ import annotations

import hashlib
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
import zarr
from typer.testing import CliRunner

from cytosyn.cli.features import register
from cytosyn.config import FeaturesConfig
from cytosyn.features import compute_features, read_cls
from cytosyn.io.atomic import write_parquet_atomic
from cytosyn.io.layout import DatasetLayout
from cytosyn.shards import ShardDataset, ShardsError, build_shards, resume_point, shuffle_buffer_order
from test_features import H0_D2, SLIDES, build_tile_dataset, write_h0_mini_weights

SEED = 7


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> DatasetLayout:
    """19 kept tiles (13 train) with depth-2 H0-mini features, train shards of ≤ 3 samples (5 shards)."""
    base = tmp_path_factory.mktemp("shards")
    layout = build_tile_dataset(base / "root")
    weights = write_h0_mini_weights(base / "w.safetensors")
    fcfg = FeaturesConfig(weights=str(weights), chunk_rows=8, batch_size=8, num_workers=0, **H0_D2)
    assert compute_features(layout, fcfg, progress=False).complete
    result = build_shards(layout, "train", shard_size=3, seed=SEED, progress=False)
    assert result.complete and result.ok and (result.samples, result.shards, result.written) == (13, 5, 5)
    return layout


def train_tiles(layout: DatasetLayout) -> pd.DataFrame:
    tiles = pd.concat([pd.read_parquet(p) for p in sorted(layout.tiles_dir.glob("*.parquet"))], ignore_index=True)
    return tiles[(tiles["split"] == "train") & tiles["kept"].fillna(True).astype(bool)]


def read_all_shards(layout: DatasetLayout, split: str = "train") -> pd.DataFrame:
    files = sorted(layout.shards_dir(split).glob("shard-*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas().assign(file=f.name) for f in files], ignore_index=True)


def epoch_batches(ds: ShardDataset, num_workers: int) -> list[list[str]]:
    return [batch["tile_id"] for batch in ds.loader(num_workers=num_workers)]


def dataset(layout: DatasetLayout, **kw) -> ShardDataset:
    return ShardDataset(layout.shards_dir("train"), **{"batch_size": 2, "seed": 1, "shuffle_buffer": 4, **kw})


def test_shards_hold_each_train_sample_once_with_its_png_features_and_metadata(sharded):
    layout = sharded
    shards = read_all_shards(layout)
    expected = train_tiles(layout)
    assert sorted(shards["tile_id"]) == sorted(expected["tile_id"]) and shards["tile_id"].is_unique
    by_id = expected.set_index("tile_id")
    slides = {sid: (project, tss) for sid, project, tss in SLIDES}
    ids, cls = read_cls(layout)
    row_of = {t: i for i, t in enumerate(ids)}
    tokens = zarr.open_array(str(layout.features_tokens_path("h0-mini")), mode="r")
    for rec in shards.itertuples():
        assert rec.png == layout.resolve(by_id.loc[rec.tile_id, "image_path"]).read_bytes()
        assert rec.slide_id == by_id.loc[rec.tile_id, "slide_id"]
        assert (rec.project, rec.tss_code) == slides[rec.slide_id]
        np.testing.assert_array_equal(np.asarray(rec.cls, np.float32), cls[row_of[rec.tile_id]])
        np.testing.assert_array_equal(np.frombuffer(rec.tokens, np.float16).reshape(14, 14, 768), tokens[row_of[rec.tile_id]])
    # Shuffled: not in feature-row (manifest) order; balanced shard sizes.
    assert [row_of[t] for t in shards["tile_id"]] != sorted(row_of[t] for t in shards["tile_id"])
    assert shards.groupby("file").size().tolist() == [3, 3, 3, 2, 2]

    index = pq.read_table(layout.shards_index_path("train")).to_pandas()
    for rec in index.itertuples():
        in_file = pq.read_table(layout.shard_path("train", rec.shard), columns=["tile_id"])["tile_id"][rec.offset].as_py()
        assert in_file == rec.tile_id and ids[rec.feature_row] == rec.tile_id
    schema = pq.read_schema(layout.shard_path("train", 0))
    cls_type = schema.field("cls").type
    assert (cls_type.list_size, str(cls_type.value_type)) == (768, "float")
    assert schema.field("tokens").type.byte_width == 14 * 14 * 768 * 2


def test_shard_writing_is_deterministic_and_resumes_missing_shards(sharded, tmp_path):
    layout = DatasetLayout(tmp_path / "root")
    shutil.copytree(sharded.root, layout.root)
    out = layout.shards_dir("train")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    layout.shard_path("train", 2).unlink()
    layout.shards_manifest_path("train").unlink()
    result = build_shards(layout, "train", shard_size=3, seed=SEED, progress=False)
    assert result.complete and (result.written, result.skipped) == (1, 4)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())} == digest

    shutil.rmtree(out)
    build_shards(layout, "train", shard_size=3, seed=SEED, progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())} == digest

    with pytest.raises(ShardsError, match="delete .* and rerun"):
        build_shards(layout, "train", shard_size=3, seed=SEED + 1, progress=False)


def test_shards_are_tied_to_the_features_they_were_cut_from(sharded, tmp_path):
    layout = DatasetLayout(tmp_path / "root")
    shutil.copytree(sharded.root, layout.root)
    manifest = json.loads(layout.shards_manifest_path("train").read_text())
    assert manifest["features_compute_dtype"] == "float32" and len(manifest["features_weights_sha256"]) == 64
    # Half-written shards, then the features recomputed with other weights: finishing the shards would mix
    # both sets of features in one split.
    layout.shard_path("train", 2).unlink()
    layout.shards_manifest_path("train").unlink()
    shutil.rmtree(layout.features_dir("h0-mini"))
    fcfg = FeaturesConfig(weights="random-init", chunk_rows=8, batch_size=8, num_workers=0, **H0_D2)
    assert compute_features(layout, fcfg, progress=False).complete
    with pytest.raises(ShardsError, match=r"shards/train: cut from features with other weights_sha256 .* delete .*shards/train and rerun"):
        build_shards(layout, "train", shard_size=3, seed=SEED, progress=False)
    assert not layout.shard_path("train", 2).exists()

    # A tile manifest that changed after the features were computed no longer matches their rows.
    shutil.rmtree(layout.shards_dir("train"))
    tiles = pq.read_table(layout.tiles_path(SLIDES[1][0])).to_pandas()
    tiles.loc[0, "kept"] = False
    write_parquet_atomic(layout.tiles_path(SLIDES[1][0]), tiles, schema=pq.read_schema(layout.tiles_path(SLIDES[1][0])))
    with pytest.raises(ShardsError, match="another tile manifest .* delete .* rerun `cytosyn data features`"):
        build_shards(layout, "train", shard_size=3, seed=SEED, progress=False)


def test_one_epoch_over_2_ranks_x_2_workers_sees_every_sample_exactly_once(sharded):
    layout = sharded
    everything = sorted(train_tiles(layout)["tile_id"])
    per_rank = []
    for rank in (0, 1):
        ds = dataset(layout, rank=rank, world_size=2, even_ranks=False)
        ids = [t for batch in epoch_batches(ds, num_workers=2) for t in batch]
        assert len(ids) == len(ds)
        per_rank.append(ids)
    assert sorted(per_rank[0] + per_rank[1]) == everything
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1

    # Deterministic from (seed, epoch); the next epoch deals the samples out differently, again exactly once.
    again = dataset(layout, rank=0, world_size=2, even_ranks=False)
    assert [t for b in epoch_batches(again, num_workers=2) for t in b] == per_rank[0]
    assert again.state_dict()["epoch"] == 1
    epoch1 = [t for b in epoch_batches(again, num_workers=2) for t in b]
    other = dataset(layout, rank=1, world_size=2, even_ranks=False)
    other.set_epoch(1)
    epoch1_rank1 = [t for b in epoch_batches(other, num_workers=2) for t in b]
    assert sorted(epoch1 + epoch1_rank1) == everything and epoch1 != per_rank[0]


def test_even_ranks_take_the_same_steps_and_leave_out_fewer_than_world_size_samples(sharded):
    layout = sharded
    everything = set(train_tiles(layout)["tile_id"])
    assert len(everything) == 13
    # Without the option, 13 samples over 2 ranks × 2 workers in batches of 3 give 2 and 3 steps: a DDP
    # all-reduce on the third step would wait forever for rank 0.
    uneven = [len(epoch_batches(dataset(layout, batch_size=3, rank=r, world_size=2, even_ranks=False), 2)) for r in (0, 1)]
    assert uneven == [2, 3]
    for world in (2, 5):
        per_rank = [epoch_batches(dataset(layout, batch_size=3, rank=r, world_size=world), 2) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1 and len({sum(map(len, b)) for b in per_rank}) == 1
        ids = [t for batches in per_rank for batch in batches for t in batch]
        assert len(ids) == len(set(ids)) == world * (13 // world)
        assert len(everything - set(ids)) == 13 % world < world
    # Which sample is left out follows the epoch's shuffle.
    left_out = []
    for epoch in range(4):
        ids = set()
        for r in (0, 1):
            ds = dataset(layout, rank=r, world_size=2)
            ds.set_epoch(epoch)
            ids.update(t for batch in epoch_batches(ds, 0) for t in batch)
        left_out.append(everything - ids)
    assert all(len(x) == 1 for x in left_out) and len(set(map(frozenset, left_out))) > 1


def test_batches_carry_decoded_images_cls_and_tokens(sharded):
    layout = sharded
    shards = read_all_shards(layout).set_index("tile_id")
    batch = next(iter(dataset(layout, batch_size=4).loader(num_workers=0)))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["image"].dtype.is_floating_point is False
    assert batch["cls"].shape == (4, 768) and batch["tokens"].shape == (4, 14, 14, 768)
    for i, t in enumerate(batch["tile_id"]):
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(shards.loc[t, "png"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(batch["image"][i].permute(1, 2, 0).numpy(), rgb)
        np.testing.assert_array_equal(batch["cls"][i].numpy(), np.asarray(shards.loc[t, "cls"], np.float32))
        np.testing.assert_array_equal(batch["tokens"][i].numpy(), np.frombuffer(shards.loc[t, "tokens"], np.float16).reshape(14, 14, 768))
        assert batch["project"][i] == shards.loc[t, "project"] and batch["tss_code"][i] == shards.loc[t, "tss_code"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_from_a_mid_epoch_state_yields_exactly_the_remaining_samples(sharded, num_workers):
    layout = sharded
    reference = epoch_batches(dataset(layout, rank=1, world_size=2), num_workers)
    # Rank 1's part holds 7 of the 13 samples, of which it yields 6 (even ranks): 3 batches of 2 from one
    # stream, or 2 + 2 from two streams of 3.
    assert len(reference) == len(dataset(layout, rank=1, world_size=2).loader(num_workers)) == {0: 3, 2: 4}[num_workers]
    for stop in (1, len(reference) - 1):
        ds = dataset(layout, rank=1, world_size=2)
        ds.set_epoch(0)
        taken = []
        for batch in ds.loader(num_workers=num_workers):
            taken.append(batch["tile_id"])
            if len(taken) == stop:
                break
        state = ds.state_dict()
        assert state["samples_yielded"] == sum(len(b) for b in taken) and state["epoch"] == 0

        resumed = dataset(layout, rank=1, world_size=2)
        resumed.load_state_dict(state)
        rest = epoch_batches(resumed, num_workers)
        assert taken + rest == reference
        assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["samples_yielded"] == 0


def test_resume_state_is_checked(sharded):
    layout = sharded
    ds = dataset(layout, rank=0, world_size=2)
    it = iter(ds.loader(num_workers=2))
    next(it)
    state = ds.state_dict()
    del it
    other = dataset(layout, rank=0, world_size=2)
    other.load_state_dict(state)
    with pytest.raises(ShardsError, match="num_workers=2"):
        next(iter(other.loader(num_workers=0)))
    with pytest.raises(ShardsError, match="batch_size"):
        dataset(layout, rank=0, world_size=2, batch_size=3).load_state_dict(state)
    with pytest.raises(ShardsError, match="even_ranks=True"):
        dataset(layout, rank=0, world_size=2, even_ranks=False).load_state_dict(state)
    with pytest.raises(ShardsError, match="not the end of a batch"):
        resume_point([5, 4], 2, 3)


def test_resuming_under_the_documented_training_loop(sharded):
    """docs/shards.md's loop: the state is loaded before it, and set_epoch(epoch) opens every epoch."""
    layout, epochs = sharded, 2

    def train(ds: ShardDataset, start_epoch: int, stop_after: int | None = None) -> list[list[list[str]]]:
        loader = ds.loader(num_workers=2)
        seen: list[list[list[str]]] = []
        for epoch in range(start_epoch, epochs):
            ds.set_epoch(epoch)
            seen.append([])
            for batch in loader:
                seen[-1].append(batch["tile_id"])
                if len(seen[-1]) == stop_after:
                    return seen
        return seen

    reference = train(dataset(layout, rank=1, world_size=2), 0)
    assert len(reference[0]) == 4 and reference[0] != reference[1]
    interrupted = dataset(layout, rank=1, world_size=2)
    taken = train(interrupted, 0, stop_after=2)[0]
    checkpoint = {"data": interrupted.state_dict()}

    resumed = dataset(layout, rank=1, world_size=2)
    resumed.load_state_dict(checkpoint["data"])
    rest = train(resumed, checkpoint["data"]["epoch"])
    assert taken + rest[0] == reference[0] and rest[1:] == reference[1:]
    # Once the restored position is consumed, set_epoch starts an epoch from its beginning again.
    resumed.set_epoch(1)
    assert epoch_batches(resumed, 2) == reference[1]


def test_skipping_tokens_keeps_the_same_samples_in_the_same_order(sharded):
    layout = sharded
    with_tokens = list(dataset(layout).loader(num_workers=2))
    without = list(dataset(layout, load_tokens=False).loader(num_workers=2))
    assert [b["tile_id"] for b in with_tokens] == [b["tile_id"] for b in without]
    assert "tokens" not in without[0] and "tokens" in with_tokens[0]
    for a, b in zip(with_tokens, without):
        assert (a["image"] == b["image"]).all() and (a["cls"] == b["cls"]).all()


def test_shuffle_buffer_order_and_round_robin_replay():
    rng = np.random.default_rng(0)
    order = shuffle_buffer_order(100, 8, rng)
    assert sorted(order) == list(range(100)) and list(order) != list(range(100))
    assert all(order[i] < i + 8 for i in range(100))  # never needs input beyond the buffer
    assert list(shuffle_buffer_order(5, 1, rng)) == [0, 1, 2, 3, 4]
    # Streams of 5 and 4 samples, batches of 2, handed out w0 w1 | w0 w1 | w0 (1 sample).
    assert resume_point([5, 4], 2, 0) == ([0, 0], 0)
    assert resume_point([5, 4], 2, 2) == ([1, 0], 1)
    assert resume_point([5, 4], 2, 4) == ([1, 1], 0)
    assert resume_point([5, 4], 2, 9) == ([3, 2], 1)
    assert resume_point([3, 4], 2, 5) == ([2, 1], 1)


def test_cli_shards_for_another_split(sharded, tmp_path):
    layout = DatasetLayout(tmp_path / "root")
    shutil.copytree(sharded.root, layout.root)
    app, data = typer.Typer(), typer.Typer()
    app.add_typer(data, name="data")
    register(data)
    run = CliRunner().invoke(app, ["data", "shards", str(layout.root), "--split", "val_out", "--shard-size", "3"])
    assert run.exit_code == 0, run.output
    assert "samples=4 shards=2" in run.output and layout.shards_manifest_path("val_out").exists()
    ds = ShardDataset(layout.shards_dir("val_out"), batch_size=3)
    assert sorted(t for b in ds.loader() for t in b["tile_id"]) == sorted(read_all_shards(layout, "val_out")["tile_id"])
    missing = CliRunner().invoke(app, ["data", "shards", str(tmp_path / "nowhere"), "--split", "train"])
    assert missing.exit_code == 2 and "features" in missing.output
