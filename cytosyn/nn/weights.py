"""Loading model weights from local files, safely.

Only safetensors or `torch.load(weights_only=True)` are used: a checkpoint is data, never code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

# Prefixes that wrap a backbone's keys in common checkpoints (DDP, iBOT/DINO teacher, timm heads).
_WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "encoder.")
# Checkpoint entries a frozen feature extractor has no part for: a classification or projection head,
# iBOT's masked-token embedding. They may sit in a file; a key the model has is never optional.
_UNUSED_EXTRAS = ("head.", "masked_embed")


class WeightsError(ValueError):
    """Weights that cannot be loaded into the model; the message names the file and the first bad key."""


def read_state_dict(path: str | Path, subkey: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (weights only).

    ``subkey`` selects a nested dict such as ``"teacher"`` in iBOT/DINO checkpoints; when None and the file
    holds one of the usual wrappers (``teacher``, ``state_dict``, ``model``) it is unwrapped automatically.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; pass an existing .safetensors or .pth file")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            # DINO/iBOT training checkpoints keep their argparse options under "args"; allowing that one
            # plain-data class lets them load without opening weights_only to arbitrary code.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not plain weights
            raise WeightsError(
                f"{path}: not loadable as plain weights ({exc.__class__.__name__}); convert it to safetensors"
            ) from None
    if subkey is not None:
        if subkey not in state:
            raise WeightsError(f"{path}: no '{subkey}' entry; top-level keys are {sorted(state)[:8]}")
        state = state[subkey]
    else:
        for wrapper in ("teacher", "state_dict", "model"):
            if wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors")
    return tensors


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.`` …) that every key shares."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def backbone_subtree(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the ``backbone.`` keys when a checkpoint also holds other modules.

    A DINO/iBOT teacher is ``MultiCropWrapper(backbone, head)``: its keys are ``backbone.*`` plus the
    projection head's ``head.*``, so the shared-prefix rule of ``strip_prefixes`` cannot apply.
    """
    for prefix in ("module.backbone.", "backbone."):
        if any(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_weights_into(model: torch.nn.Module, path: str | Path, subkey: str | None = None) -> None:
    """Load ``path`` into ``model`` strictly, naming the first missing, unexpected or mis-shaped key.

    Every key of the model must be in the file; the file may also hold the unused extras above
    (``head.*``, ``masked_embed``) when the model has no such key.
    """
    state = strip_prefixes(backbone_subtree(read_state_dict(path, subkey)))
    expected = model.state_dict()
    for key in sorted(expected):
        if key not in state:
            raise WeightsError(f"{path}: missing key '{key}' (model expects shape {tuple(expected[key].shape)})")
    for key in sorted(state):
        if key not in expected and not key.startswith(_UNUSED_EXTRAS):
            raise WeightsError(f"{path}: unexpected key '{key}' with shape {tuple(state[key].shape)}; wrong architecture?")
    for key in sorted(state):
        if key in expected and state[key].shape != expected[key].shape:
            raise WeightsError(
                f"{path}: key '{key}' has shape {tuple(state[key].shape)} but the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
