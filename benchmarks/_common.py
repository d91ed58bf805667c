"""Shared bits of the benchmark scripts: pinning to one core and printing a result line."""

from __future__ import annotations

import os
import time


def pin_to_one_core() -> None:
    """Measure single-core throughput regardless of what the BLAS/OpenCV pools would otherwise use."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def report(name: str, measured: float, floor: float, unit: str, target: float | None = None) -> None:
    """One result line: the measure, the floor of the same run, their ratio, and the verdict on a target."""
    ratio = measured / floor
    line = f"{name}: {measured:.1f} {unit} vs floor {floor:.1f} {unit} -> ratio {ratio:.3f}"
    if target is not None:
        line += f" (target >= {target}) {'OK' if ratio >= target else 'BELOW TARGET'}"
    print(line)
