"""Proportional integer allocation under capacities, and the distance used to report its fidelity."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def apportion(total: int, weights: np.ndarray, caps: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights``, none above its ``cap``.

    What a capped item cannot take is redistributed to the others in proportion to their weights
    (water-filling), then the continuous shares are rounded by largest remainder; equal remainders
    are ordered by ``tiebreak`` (a stable hash per item, so no item wins by its position). Items with
    zero weight get nothing. The result sums to ``min(total, sum of caps of weighted items)``.
    """
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(caps, dtype=np.int64)
    out = np.zeros(len(w), dtype=np.int64)
    active = np.flatnonzero((w > 0) & (c > 0))
    total = int(total)
    if total <= 0 or active.size == 0:
        return out
    ca, wa = c[active], w[active]
    if total >= ca.sum():
        out[active] = ca
        return out
    # The level λ with Σ min(c, λw) = total: cap items by increasing c/w until the rest can share
    # what is left without exceeding their own cap.
    ratio = ca / wa
    order = np.argsort(ratio, kind="stable")
    capped_before = np.concatenate(([0], np.cumsum(ca[order])[:-1]))
    weight_from = np.cumsum(wa[order][::-1])[::-1]
    levels = (total - capped_before) / weight_from
    k = int(np.argmax(levels <= ratio[order]))
    exact = np.minimum(ca.astype(np.float64), levels[k] * wa)
    base = np.minimum(np.floor(exact).astype(np.int64), ca)
    frac = exact - base
    rank = np.lexsort((np.asarray(tiebreak)[active], -frac))
    left = total - int(base.sum())
    # Float error can leave the remainder a unit off what the fractional parts promise; the loop
    # (one pass in practice) keeps the sum exact anyway.
    while left > 0:
        room = rank[base[rank] < ca[rank]][:left]
        base[room] += 1
        left -= room.size
    while left < 0:
        spare = rank[::-1][base[rank[::-1]] > 0][:-left]
        base[spare] -= 1
        left += spare.size
    out[active] = base
    return out


def tvd(achieved: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Total variation distance between two distributions given as (unnormalised) counts per key."""
    keys = sorted(set(achieved) | set(target))
    a = np.array([float(achieved.get(k, 0.0)) for k in keys])
    t = np.array([float(target.get(k, 0.0)) for k in keys])
    if a.sum() == 0 or t.sum() == 0:
        return 0.0 if a.sum() == t.sum() else 1.0
    return float(0.5 * np.abs(a / a.sum() - t / t.sum()).sum())
