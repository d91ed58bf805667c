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
) -> Iterator[R]:
    """Apply ``fn`` to every item; yield results as they finish, with a progress bar."""
    if not items:
        return
    with tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True) as bar:
        if workers <= 1 and not dask_address:
            for item in items:
                yield fn(item)
                bar.update()
            return
        from dask.distributed import as_completed

        with dask_client(workers, dask_address) as client:
            # pure=False: the same item submitted twice (a rerun) must run again, not hit Dask's cache.
            futures = client.map(fn, list(items), pure=False)
            for future in as_completed(futures):
                yield future.result()
                bar.update()
