"""The curation backbone: iBOT/plain/safetensors weights, wrong shapes named, seeded random init, frozen inference."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pydantic import ValidationError

from cytosyn.config import CurationConfig
from cytosyn.curation.features import (
    BackboneMismatchError,
    LazyBackbone,
    _read_cache,
    backbone_setup,
    cached_embed,
    embed_tiles,
    load_backbone,
    setup_from_heads,
)
from cytosyn.io.hashing import sha256_file
from cytosyn.nn.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from cytosyn.nn.weights import WeightsError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _vit_state(depth: int | None = None, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    kwargs = {"depth": depth} if depth else {}
    model = timm.create_model("vit_small_patch16_224", num_classes=0, **kwargs)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def test_a_vit_s_checkpoint_with_one_wrong_shape_fails_naming_the_key(tmp_path):
    state = _vit_state()  # the real ViT-S, 12 blocks
    assert state["blocks.7.mlp.fc1.weight"].shape == (1536, 384)
    state["blocks.7.mlp.fc1.weight"] = state["blocks.7.mlp.fc1.weight"].reshape(384, 1536).contiguous()
    path = tmp_path / "vit_s.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as info:
        create_backbone("ibot-vit-s", weights=path)
    message = str(info.value)
    assert "blocks.7.mlp.fc1.weight" in message and "(384, 1536)" in message and "(1536, 384)" in message
    assert str(path) in message
    # The curation path surfaces the same error.
    with pytest.raises(WeightsError, match="blocks.7.mlp.fc1.weight"):
        load_backbone(backbone_setup(CurationConfig(weights=path), seed=0))


def test_a_missing_key_is_named(tmp_path):
    state = _vit_state(depth=2)
    del state["blocks.1.norm2.bias"]
    path = tmp_path / "short.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="missing key 'blocks.1.norm2.bias'"):
        create_backbone("ibot-vit-s", weights=path, depth=2)


def test_an_architecture_with_its_own_fc_norm_needs_it_in_the_checkpoint(tmp_path):
    """With global_pool=avg timm's ViT normalises the pooled tokens with fc_norm: its values matter."""
    torch.manual_seed(8)
    avg = timm.create_model("vit_small_patch16_224", num_classes=0, depth=2, global_pool="avg").eval()
    state = {k: v.clone().contiguous() for k, v in avg.state_dict().items()}
    assert "fc_norm.weight" in state
    save_file(state, str(tmp_path / "avg.safetensors"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    loaded = create_backbone("ibot-vit-s", weights=tmp_path / "avg.safetensors", depth=2, global_pool="avg")
    assert np.array_equal(_features(loaded, x), _features(avg, x))
    save_file({k: v for k, v in state.items() if not k.startswith("fc_norm.")}, str(tmp_path / "no_fc_norm.safetensors"))
    with pytest.raises(WeightsError, match=r"no_fc_norm.safetensors: missing key 'fc_norm\.bias'"):
        create_backbone("ibot-vit-s", weights=tmp_path / "no_fc_norm.safetensors", depth=2, global_pool="avg")


def test_the_architecture_option_swaps_the_timm_model(tmp_path):
    torch.manual_seed(4)
    tiny = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2).eval()
    save_file({k: v.clone().contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    cfg = CurationConfig(weights=tmp_path / "tiny.safetensors", architecture="vit_tiny_patch16_224", timm_overrides={"depth": 2})
    setup = backbone_setup(cfg, 0)
    assert setup.timm_name == "vit_tiny_patch16_224"
    assert setup.fingerprint != backbone_setup(cfg.model_copy(update={"architecture": None}), 0).fingerprint
    model = load_backbone(setup)
    assert model.num_features == 192
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(_features(model, x), _features(tiny, x))
    # ViT-S weights do not fit the swapped architecture.
    save_file(_vit_state(depth=2), str(tmp_path / "vit_s.safetensors"))
    with pytest.raises(WeightsError, match="vit_s.safetensors: key .* has shape .* but the model expects"):
        load_backbone(backbone_setup(cfg.model_copy(update={"weights": str(tmp_path / "vit_s.safetensors")}), 0))


def _features(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


def test_an_ibot_teacher_checkpoint_loads_with_weights_only(tmp_path):
    """iBOT saves the whole MultiCropWrapper: `teacher` → backbone.* + head.*, plus args and optimiser state."""
    state = _vit_state(depth=2, seed=11)
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["backbone.masked_embed"] = torch.zeros(1, 384)  # iBOT's mask token: unused at inference
    teacher["head.mlp.0.weight"] = torch.randn(2048, 384)
    teacher["head.last_layer.weight_g"] = torch.ones(8192, 1)
    checkpoint = {
        "student": {f"module.{k}": v.clone() + 1 for k, v in teacher.items()},
        "teacher": teacher,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)

    setup = backbone_setup(CurationConfig(weights=path, timm_overrides={"depth": 2}), seed=0)
    model = load_backbone(setup)
    reference = timm.create_model("vit_small_patch16_224", num_classes=0, depth=2).eval()
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(_features(model, x), _features(reference, x))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # Selecting the student explicitly gives the student's (different) weights.
    student = load_backbone(backbone_setup(CurationConfig(weights=path, weights_subkey="student", timm_overrides={"depth": 2}), 0))
    assert not np.array_equal(_features(student, x), _features(reference, x))


class _Sneaky:
    """Any class that is not plain data: weights_only loading must refuse to build it."""


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": _vit_state(depth=2), "extra": _Sneaky()}, path)
    with pytest.raises(WeightsError, match="not loadable as plain weights"):
        load_backbone(backbone_setup(CurationConfig(weights=path, timm_overrides={"depth": 2}), 0))


def test_a_plain_state_dict_loads(tmp_path):
    state = _vit_state(depth=2, seed=5)
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    model = load_backbone(backbone_setup(CurationConfig(weights=path, timm_overrides={"depth": 2}), 0))
    reference = timm.create_model("vit_small_patch16_224", num_classes=0, depth=2).eval()
    reference.load_state_dict(state)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(_features(model, x), _features(reference, x))


def test_random_init_is_seeded_and_leaves_the_global_generator_alone():
    cfg = CurationConfig(weights="random-init", timm_overrides={"depth": 2})
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone(backbone_setup(cfg, seed=0))
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = load_backbone(backbone_setup(cfg, seed=0))
    c = load_backbone(backbone_setup(cfg, seed=1))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(_features(a, x), _features(b, x))
    assert not np.array_equal(_features(a, x), _features(c, x))
    assert backbone_setup(cfg, 0).fingerprint != backbone_setup(cfg, 1).fingerprint


def test_heads_refuse_weights_other_than_their_own(tmp_path):
    path_a, path_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_vit_state(depth=2, seed=1), str(path_a))
    save_file(_vit_state(depth=2, seed=2), str(path_b))
    recorded = backbone_setup(CurationConfig(weights=path_a, timm_overrides={"depth": 2}), 0).to_json()
    assert setup_from_heads(recorded, None, None).weights == str(path_a)
    with pytest.raises(BackboneMismatchError, match="b.safetensors: sha256 .* differs"):
        setup_from_heads(recorded, path_b, None)
    path_a.unlink()
    with pytest.raises(BackboneMismatchError, match="backbone weights not found"):
        setup_from_heads(recorded, None, None)


def test_embedding_reports_an_unreadable_tile_and_goes_on(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), rng.integers(0, 255, (100, 100, 3), dtype=np.uint8))
    setup = backbone_setup(CurationConfig(weights="random-init", timm_overrides={"depth": 2}), 0)
    out = embed_tiles(load_backbone(setup), setup, [good, bad, small, good], white_level=220, batch_size=3)
    assert out.embedded.tolist() == [True, False, False, True]
    assert "bad.png" in out.errors[1] and "rerun the tiling stage" in out.errors[1]
    assert "100×100" in out.errors[2]
    assert np.array_equal(out.features[0], out.features[3])  # same tile, different batch: same features
    assert np.isnan(out.measures[1]).all() and not np.isnan(out.measures[0]).any()


def test_missing_weights_is_an_error_that_names_both_ways_out():
    with pytest.raises(ValueError, match="curation.weights") as err:
        backbone_setup(CurationConfig(), 0)
    assert "random-init" in str(err.value)


def _png(path, rgb: np.ndarray):
    import cv2

    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return path


def test_normalisation_comes_from_the_config_when_set(tmp_path):
    with pytest.raises(ValidationError, match="std value must be > 0"):
        CurationConfig(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValidationError, match="mean"):
        CurationConfig(mean=(0.5, 0.5))
    base = CurationConfig(weights="random-init", timm_overrides={"depth": 1})
    custom = CurationConfig(weights="random-init", timm_overrides={"depth": 1}, mean=(0.7, 0.58, 0.7), std=(0.21, 0.23, 0.18))
    default, changed = backbone_setup(base, 0), backbone_setup(custom, 0)
    assert (default.mean, default.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (changed.mean, changed.std) == ((0.7, 0.58, 0.7), (0.21, 0.23, 0.18))
    assert changed.fingerprint != default.fingerprint
    spelled_out = CurationConfig(weights="random-init", timm_overrides={"depth": 1}, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert backbone_setup(spelled_out, 0).fingerprint == default.fingerprint  # same inputs, same features: same cache
    tile = _png(tmp_path / "tile.png", np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    a = embed_tiles(load_backbone(default), default, [tile], white_level=220)
    b = embed_tiles(load_backbone(changed), changed, [tile], white_level=220)
    assert a.embedded.all() and b.embedded.all() and not np.allclose(a.features, b.features)
    # Predict rebuilds the backbone from the heads, normalisation included.
    assert setup_from_heads(changed.to_json(), None, None) == changed


def test_a_changed_white_level_remeasures_cached_tiles_without_rerunning_the_backbone(tmp_path):
    grey = _png(tmp_path / "grey200.png", np.full((224, 224, 3), 200, np.uint8))
    noise = _png(tmp_path / "noise.png", np.random.default_rng(2).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    paths, shas = [grey, noise], [sha256_file(grey), sha256_file(noise)]
    setup = backbone_setup(CurationConfig(weights="random-init", timm_overrides={"depth": 1}), 0)
    backbone = LazyBackbone(setup)
    cache = tmp_path / "cache.parquet"
    at_220 = cached_embed(cache, paths, shas, setup, backbone, white_level=220)
    assert at_220.measures[0, 0] == 0.0 and at_220.embedded.all()
    forwards = []
    backbone().register_forward_hook(lambda *_: forwards.append(1))

    at_150 = cached_embed(cache, paths, shas, setup, backbone, white_level=150)
    assert at_150.measures[0, 0] == 1.0  # every channel of grey 200 reaches 150
    assert np.array_equal(at_150.measures[:, 1:], at_220.measures[:, 1:])
    assert np.array_equal(at_150.features, at_220.features) and forwards == []
    _, entries = _read_cache(cache)
    assert entries[shas[0]].white_level == 150 and entries[shas[0]].measures[0] == 1.0
    assert cached_embed(cache, paths, shas, setup, backbone, white_level=220).measures[0, 0] == 0.0 and forwards == []

    # A tile the near-white filter removed at 150 (measured, not embedded) passes at 220: it is embedded then.
    not_white = lambda m: m[:, 0] < 0.9  # noqa: E731
    other = tmp_path / "filtered.parquet"
    first = cached_embed(other, paths, shas, setup, backbone, white_level=150, select=not_white)
    assert first.embedded.tolist() == [False, True] and len(forwards) == 1
    second = cached_embed(other, paths, shas, setup, backbone, white_level=220, select=not_white)
    assert second.embedded.tolist() == [True, True] and len(forwards) == 2
    assert np.array_equal(second.features, at_220.features)
