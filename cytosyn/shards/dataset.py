"""Reading shards for training: a deterministic, DDP- and worker-aware, resumable IterableDataset.

One epoch, for every rank and DataLoader worker (docs/shards.md has the full definition):

1. the shards are put in an order drawn from (seed, epoch) and read as one sequence of samples;
2. rank r of R takes the contiguous part [r·T/R, (r+1)·T/R) of that sequence (ranks differ by ≤ 1 sample),
   and its W loader workers split that part the same way; with ``even_ranks`` (the default under DDP) every
   rank yields ⌊T/R⌋ samples, so every rank takes the same number of steps;
3. each worker passes its part through a shuffle buffer whose draws come from (seed, epoch, rank, worker)
   and cuts the result into batches of ``batch_size`` (the last one shorter);
4. PyTorch's DataLoader hands the workers' batches out round-robin (worker 0, 1, …, skipping finished
   workers), so the sequence of batches a rank receives is a fixed function of (seed, epoch, R, W, batch size).

Resumption: the state is (epoch, samples this rank has received in this epoch). Replaying step 4 on batch
sizes alone tells how many batches each worker stream had delivered and which stream was next; each stream
skips its delivered batches, and the streams are rotated over the new workers so that the DataLoader's
cycle (which restarts at worker 0) continues where the interrupted one stopped: the resumed batches are
exactly those that would have followed. The shuffle buffer is computed on sample positions, so skipped
samples are never decoded and row groups holding only skipped samples are never read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cytosyn.io.images import decode_png_rgb
from cytosyn.shards.writer import ShardsError, read_shards_manifest

_META = ("tile_id", "slide_id", "project", "tss_code")


def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer_size`` emits positions 0..n-1 fed in sequence.

    Fill the buffer; for each further input emit a uniformly drawn buffered item and put the input in its
    place; at the end emit the rest in random order. Output position i never needs input beyond i + size.
    """
    size = min(buffer_size, n)
    if size <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    buf = list(range(size))
    for i, j in enumerate(rng.integers(0, size, n - size).tolist()):
        out[i] = buf[j]
        buf[j] = size + i
    out[n - size :] = rng.permutation(np.array(buf, dtype=np.int64))
    return out


def resume_point(lengths: list[int], batch_size: int, samples: int) -> tuple[list[int], int]:
    """Replay the round-robin hand-out of the streams' batches until ``samples`` were delivered.

    Returns how many batches each stream had delivered and which stream is next in the cycle.
    """
    batches = [-(-n // batch_size) for n in lengths]
    done = [0] * len(lengths)
    total, last, rnd = 0, -1, 0
    while total < samples and rnd < max(batches, default=0):
        for w, nb in enumerate(batches):
            if rnd < nb and total < samples:
                total += min(batch_size, lengths[w] - rnd * batch_size)
                done[w] += 1
                last = w
        rnd += 1
    if total != samples:
        raise ShardsError(
            f"resume state says {samples} samples were yielded, which is not the end of a batch of this loader "
            f"(batch size {batch_size}, {len(lengths)} worker(s), {sum(lengths)} samples per epoch); resume with the "
            f"batch size and num_workers the state was saved with"
        )
    return done, (last + 1) % max(len(lengths), 1)


def _split_range(a: int, b: int, parts: int, i: int) -> tuple[int, int]:
    n = b - a
    return a + i * n // parts, a + (i + 1) * n // parts


_REWRITE_SHARD = "rewrite this shard (delete it and rerun `cytosyn data shards`)"


class ShardDataset(IterableDataset):
    """Batches of a split's shards: ``image`` uint8 (B, 3, H, W) RGB (channels_last memory), ``cls`` float32 (B, D), ``tokens`` float16
    (B, 14, 14, D) unless ``load_tokens=False``, and lists ``tile_id``, ``slide_id``, ``project``, ``tss_code``.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised. ``even_ranks`` (default: on
    when ``world_size`` > 1) gives every rank ⌊T/R⌋ samples per epoch, hence the same number of batches with
    the same batch size and number of loader workers; it leaves out T mod R < R samples per epoch
    (docs/shards.md). Iterate it through ``loader()`` (a DataLoader that also keeps the resume state); a plain
    ``DataLoader(ds, batch_size=None)`` works too but only tracks the state with ``num_workers=0``.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        load_tokens: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        even_ranks: bool | None = None,
    ):
        super().__init__()
        self.dir = Path(shards_dir)
        manifest = read_shards_manifest(self.dir)
        self.files = [self.dir / s["file"] for s in manifest["shards"]]
        self.sizes = np.array([s["num_samples"] for s in manifest["shards"]], dtype=np.int64)
        self.token_shape = tuple(manifest["token_shape"])
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be ≥ 1")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        self.even_ranks = self.world_size > 1 if even_ranks is None else bool(even_ranks)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.load_tokens = load_tokens
        self.epoch = 0
        self.samples_yielded = 0
        self.num_streams = 1  # loader workers the current epoch is split over (1 without workers)
        self._restored = False  # a loaded state not yet iterated: set_epoch of its epoch keeps its position

    # ------------------------------------------------------------------ the epoch plan

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())

    def _rank_range(self) -> tuple[int, int]:
        return _split_range(0, self.num_samples, self.world_size, self.rank)

    def __len__(self) -> int:
        """Samples this rank receives per epoch."""
        if self.even_ranks:
            # The shortest rank part, computed locally: every rank knows T and R, no communication needed.
            return self.num_samples // self.world_size
        a, b = self._rank_range()
        return b - a

    def _streams(self, streams: int) -> list[tuple[int, int, int]]:
        """(first, stop, kept) per loader stream: positions [first, stop) of the epoch's sequence are fed to the
        stream's shuffle buffer, and the first ``kept`` positions it emits are yielded.

        The streams split ``len(self)`` samples the same way on every rank; a rank whose part is one sample longer
        (even_ranks) feeds it to its last stream, which then drops the sample its buffer would emit last.
        """
        a, b = self._rank_range()
        n = len(self)
        starts = [a + w * n // streams for w in range(streams)] + [b]
        return [(starts[w], starts[w + 1], (w + 1) * n // streams - w * n // streams) for w in range(streams)]

    def _pieces(self, epoch: int, a: int, b: int) -> list[tuple[int, int, int]]:
        """(shard, first, stop) row ranges covering [a, b) of the epoch's shard sequence."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        pieces, start = [], 0
        for k in order.tolist():
            end = start + int(self.sizes[k])
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                pieces.append((k, lo - start, hi - start))
            start = end
        return pieces

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the epoch of a state just loaded: then keep that
        state's position, so a training loop that calls ``set_epoch`` at the top of each epoch resumes exactly."""
        if self._restored and int(epoch) == self.epoch:
            return
        self._restored = False
        self.epoch = int(epoch)
        self.samples_yielded = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "samples_yielded": self.samples_yielded,
            "num_workers": self.num_streams,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "even_ranks": self.even_ranks,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "seed", "rank", "world_size", "even_ranks", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise ShardsError(
                    f"{self.dir}: resume state has {key}={state.get(key)} but this dataset has {getattr(self, key)}; "
                    f"build the dataset with the settings the state was saved with"
                )
        self.epoch = int(state["epoch"])
        self.samples_yielded = int(state["samples_yielded"])
        self.num_streams = int(state["num_workers"])
        self._restored = True

    def _finish_epoch(self) -> None:
        self.epoch += 1
        self.samples_yielded = 0

    def _check_streams(self, streams: int) -> None:
        """Called as an epoch's iteration starts: from here on, a loaded state is being consumed."""
        if self.samples_yielded and streams != self.num_streams:
            raise ShardsError(
                f"{self.dir}: resume state was saved with {self.num_streams} loader worker(s), now {streams}; "
                f"resume with num_workers={self.num_streams if self.num_streams > 1 else 0}"
            )
        self.num_streams = streams
        self._restored = False

    def loader(self, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None) -> ShardLoader:
        return ShardLoader(self, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            self._check_streams(1)
            for batch in self._worker_batches(0, 1):
                self.samples_yielded += len(batch["tile_id"])
                yield batch
            self._finish_epoch()
        else:
            yield from self._worker_batches(info.id, info.num_workers)

    def _worker_batches(self, worker: int, streams: int) -> Iterator[dict]:
        plan = self._streams(streams)
        done, next_stream = resume_point([kept for _, _, kept in plan], self.batch_size, self.samples_yielded)
        # The DataLoader's cycle restarts at worker 0: give worker 0 the stream that was next in the cycle,
        # so the resumed hand-out continues the interrupted one exactly.
        stream = (worker + next_stream) % streams
        skip = done[stream] * self.batch_size
        a, b, kept = plan[stream]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.world_size, stream, streams])
        emit = shuffle_buffer_order(b - a, self.shuffle_buffer, rng)[skip:kept]
        needed = np.zeros(b - a, dtype=bool)
        needed[emit] = True
        samples = self._read(self._pieces(self.epoch, a, b), needed)
        pending: dict[int, tuple] = {}
        batch: list[tuple] = []
        for pos in emit.tolist():
            while pos not in pending:
                p, sample = next(samples)
                pending[p] = sample
            batch.append(pending.pop(pos))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _read(self, pieces: list[tuple[int, int, int]], needed: np.ndarray) -> Iterator[tuple[int, tuple]]:
        """(position, sample) for every needed position, in position order, reading only useful row groups."""
        columns = [*_META, "png", "cls"] + (["tokens"] if self.load_tokens else [])
        pos = 0
        for shard, first, stop in pieces:
            # Memory-mapped and single-threaded: fewer copies, and the loader's workers are the parallelism.
            pf = pq.ParquetFile(self.files[shard], memory_map=True)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            for g in range(pf.num_row_groups):
                lo, hi = max(first, int(starts[g])), min(stop, int(starts[g + 1]))
                if lo >= hi or not needed[pos + lo - first : pos + hi - first].any():
                    continue
                table = pf.read_row_group(g, columns=columns, use_threads=False)
                meta = [table[c].to_pylist() for c in _META]
                pngs = table["png"].to_pylist()
                cls_col = table["cls"].combine_chunks()
                cls = cls_col.values.to_numpy().reshape(len(cls_col), -1)
                tokens = None
                if self.load_tokens:
                    col = table["tokens"].combine_chunks()
                    per = int(np.prod(self.token_shape))
                    tokens = np.frombuffer(col.buffers()[1], np.float16, count=len(col) * per, offset=col.offset * per * 2)
                    tokens = tokens.reshape(len(col), *self.token_shape)
                for i in range(lo, hi):
                    p = pos + i - first
                    if needed[p]:
                        j = i - int(starts[g])
                        # Copies, so a sample held in the shuffle buffer does not pin its whole row group.
                        sample = (
                            *(m[j] for m in meta),
                            pngs[j],
                            cls[j].copy(),
                            tokens[j].copy() if tokens is not None else None,
                            f"{self.files[shard]} row {i}",
                        )
                        yield p, sample
            pos += stop - first

    def _collate(self, samples: list[tuple]) -> dict:
        images = np.stack([decode_png_rgb(s[4], s[7], _REWRITE_SHARD) for s in samples])
        batch = {c: [s[i] for s in samples] for i, c in enumerate(_META)}
        # A (B, 3, H, W) view in channels_last memory: no copy here; .to(device) keeps the layout.
        batch["image"] = torch.from_numpy(images).permute(0, 3, 1, 2)
        batch["cls"] = torch.from_numpy(np.stack([s[5] for s in samples]))
        if self.load_tokens:
            batch["tokens"] = torch.from_numpy(np.stack([s[6] for s in samples]))
        return batch


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset that keeps the dataset's resume state in the main process."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # Workers must be recreated each epoch to see the new epoch and resume state.
            persistent_workers=False,
        )

    def __len__(self) -> int:
        """Batches this rank receives in a whole epoch with this loader's number of workers."""
        ds: ShardDataset = self.dataset
        return sum(-(-kept // ds.batch_size) for _, _, kept in ds._streams(max(self.num_workers, 1)))

    def __iter__(self) -> Iterator[dict]:
        ds: ShardDataset = self.dataset
        if self.num_workers == 0:
            yield from super().__iter__()
            return
        ds._check_streams(self.num_workers)
        for batch in super().__iter__():
            ds.samples_yielded += len(batch["tile_id"])
            yield batch
        ds._finish_epoch()
