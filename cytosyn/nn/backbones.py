"""A registry of frozen timm backbones (feature extractors) and the one factory that builds them.

Weights come from a local file (safetensors, or a torch file loaded with ``weights_only=True``), or from
``hf-hub:<repo>`` when the machine is online. ``weights=None`` keeps timm's initialisation (tests load
their own file afterwards); ``weights="random-init"`` asks for a seeded, reproducible random
initialisation explicitly — the demo's stand-in where no pretrained weights can be had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import timm
import torch

from cytosyn.nn.weights import load_weights_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus family normalisation (H0-mini's model config).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: the timm architecture, how to normalise its input, how to read its tokens."""

    name: str
    timm_name: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int  # CLS + register tokens before the patch tokens
    timm_kwargs: dict = field(default_factory=dict)
    hf_hub: str | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone '{name}'; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


register_backbone(
    BackboneSpec(
        name="h0-mini",
        timm_name="vit_base_patch14_reg4_dinov2",
        img_size=224,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        num_prefix_tokens=5,
        timm_kwargs={
            "mlp_layer": timm.layers.SwiGLUPacked,
            "act_layer": torch.nn.SiLU,
            "init_values": 1e-5,
            "dynamic_img_size": False,
        },
        hf_hub="hf-hub:bioptimus/H0-mini",
    )
)
register_backbone(
    BackboneSpec(
        name="ibot-vit-s",
        timm_name="vit_small_patch16_224",
        img_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_prefix_tokens=1,
    )
)


def create_backbone(
    spec: BackboneSpec | str,
    weights: str | Path | None = None,
    weights_subkey: str | None = None,
    init_seed: int = RANDOM_INIT_SEED,
    **timm_overrides,
) -> torch.nn.Module:
    """Build ``spec``'s architecture without a classification head, load ``weights``, freeze, eval mode.

    ``timm_overrides`` change the architecture (e.g. ``depth=2`` in tests); they are passed to timm.
    """
    if isinstance(spec, str):
        spec = get_backbone_spec(spec)
    kwargs = {**spec.timm_kwargs, **timm_overrides}
    online = isinstance(weights, str) and weights.startswith("hf-hub:")
    random_init = weights == RANDOM_INIT
    with torch.random.fork_rng(devices=[]):
        # Seeding inside fork_rng neither disturbs nor depends on anyone else's use of the global generator.
        if random_init:
            torch.manual_seed(int(init_seed))
        model = timm.create_model(
            weights if online else spec.timm_name,
            pretrained=online,
            img_size=spec.img_size,
            num_classes=0,
            **kwargs,
        )
    if weights is not None and not online and not random_init:
        load_weights_into(model, weights, subkey=weights_subkey)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def normalise_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB (…, 3, H, W) on any device → float32 (x/255 − mean)/std on that device: a backbone's input."""
    x = images.float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - m) / s


def to_normalised_tensor(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 RGB → CHW float32, (x/255 − mean)/std: a backbone's input."""
    return normalise_images(torch.from_numpy(rgb).permute(2, 0, 1), mean, std)


def with_overrides(spec: BackboneSpec, **changes) -> BackboneSpec:
    """A copy of ``spec`` with other fields (e.g. a different timm architecture for curation)."""
    return replace(spec, **changes)
