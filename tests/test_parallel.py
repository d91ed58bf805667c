"""Per-slide fan-out on a real Dask LocalCluster: results, and a worker process that dies."""

from __future__ import annotations

import os

import pytest

from cytosyn.parallel import map_unordered


def _square_or_die(n: int) -> int:
    if n == 3:
        os._exit(1)  # what a native library's segfault does to the worker: no Python exception
    return n * n


@pytest.mark.slow
def test_a_dying_worker_fails_only_its_item():
    crashed = []

    def on_crash(item, exc):
        crashed.append((item, exc.__class__.__name__))
        return -1

    results = sorted(map_unordered(_square_or_die, [1, 2, 3, 4, 5], workers=2, on_crash=on_crash, desc="crash"))
    assert results == [-1, 1, 4, 16, 25]
    assert crashed == [(3, "KilledWorker")]


@pytest.mark.slow
def test_in_batches_every_item_comes_back_once_and_only_the_crashing_item_fails():
    results = sorted(map_unordered(_square_or_die, [1, 2, 3, 4, 5], workers=2, batch_size=2,
                                   on_crash=lambda item, exc: -item, desc="batches"))
    assert results == [-3, 1, 4, 16, 25]  # 3 crashed its batch (3, 4): 4 came back from its own task
    assert sorted(map_unordered(_square_or_die, [1, 2, 4, 5, 6], workers=2, batch_size=4)) == [1, 4, 16, 25, 36]


def test_a_python_error_is_not_a_crash_and_propagates():
    with pytest.raises(ZeroDivisionError):
        list(map_unordered(lambda n: 1 // n, [1, 0], workers=2, on_crash=lambda item, exc: None))
