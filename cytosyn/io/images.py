"""Batched, normalised reading of tile PNGs for frozen-backbone inference (curation, features)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def read_png_rgb(path: str | Path) -> np.ndarray:
    """Decode a PNG to an RGB uint8 array; raises with the path when the file is missing or corrupt."""
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"{path}: not a readable PNG; delete it and rerun the tiling stage")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_normalised_tensor(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HWC uint8 RGB → CHW float32, (x/255 − mean)/std."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class TilePNGDataset(Dataset):
    """Tile PNGs as normalised tensors, with their position in the input list."""

    def __init__(self, paths: Sequence[str | Path], mean: Sequence[float], std: Sequence[float]):
        self.paths = [str(p) for p in paths]
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_normalised_tensor(read_png_rgb(self.paths[index]), self.mean, self.std), index


def tile_loader(
    paths: Sequence[str | Path],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An ordered DataLoader; with workers, PNG decoding overlaps the model forward."""
    return DataLoader(
        TilePNGDataset(paths, mean, std),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
