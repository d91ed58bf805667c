"""Fan-out of per-slide work: in-process for one worker, a Dask cluster otherwise.

Results come back in completion order; callers sort them by a stable key, so outputs never depend
on the number of workers or on scheduling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def dask_client(workers: int, address: str | None):
    """A client on an existing cluster (``address``) or on a local cluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        yield client


def map_unordered(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int = 1,
    dask_address: str | None = None,
    desc: str = "",
    unit: str = "slide",
    on_crash: Callable[[T, BaseException], R] | None = None,
    batch_size: int = 1,
) -> Iterator[R]:
    """Apply ``fn`` to every item; yield results as they finish, with a progress bar.

    ``fn`` reports its own failures in its result. What it cannot catch is its worker process dying
    (a native library crashing on a malformed file): Dask then gives up on the task with
    ``KilledWorker``. The items of a crashed batch are tried again one per task, so the items that
    did not crash it still come back, and ``on_crash(item, exc)`` becomes the result of the one that
    crashes on its own; the rest of the batch goes on. Without ``on_crash``, or for any other
    failure (a lost scheduler, a bug in ``fn``), the exception propagates.

    On a cluster, ``batch_size`` items go to each task: a Dask task costs a few milliseconds, as much
    as a whole item of cheap work (one slide's tile selection).
    """
    if not items:
        return
    with tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True) as bar:
        if workers <= 1 and not dask_address:
            for item in items:
                yield fn(item)
                bar.update()
            return
        from dask.distributed import KilledWorker, as_completed

        batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        with dask_client(workers, dask_address) as client:
            # pure=False: the same item submitted twice (a rerun) must run again, not hit Dask's cache.
            futures = client.map(_apply_to_each, [fn] * len(batches), batches, pure=False)
            batch_of = dict(zip((f.key for f in futures), batches))
            pending = as_completed(futures)
            for future in pending:
                batch = batch_of.pop(future.key)
                try:
                    results = future.result()
                except KilledWorker as exc:
                    if on_crash is None:
                        raise
                    if len(batch) > 1:
                        for item in batch:
                            retry = client.submit(_apply_to_each, fn, [item], pure=False)
                            batch_of[retry.key] = [item]
                            pending.add(retry)
                        continue
                    results = [on_crash(batch[0], exc)]
                for result in results:
                    yield result
                    bar.update()


def _apply_to_each(fn: Callable[[T], R], batch: list[T]) -> list[R]:
    return [fn(item) for item in batch]
