"""The deterministic training stream: per epoch and rank, the same samples in the same order every run.

    stream = EpochStream.create(DataConfig(shards="s3://bucket/corpus/scenes/train", seed=7), salt=0)
    for batch in stream.batches(epoch=0, rank=1, world=2, batch_size=64):   # inside a Train worker
        batch["sample_id"]           # the same ids, in the same order, in every run of this config

What is fixed by ``(data.seed, salt, epoch)`` (``salt``: the stage's index):

1. **File order**: a permutation of the set's shards (``order``; the manifest's order when
   ``shuffle_files`` is off).
2. **Rank split**: each sample's stream position is its shard's offset in that order (the
   manifest's sample counts; without a manifest, the shard's ordinal) plus its index inside the
   shard; rank ``r`` of ``world`` trains on the positions equal to ``r`` modulo ``world``. Every
   rank reads every shard's bytes but decodes only its own samples, so the ranks' sets are
   disjoint, cover the epoch, and differ in size by at most one per shard.
3. **In-shard order and the shuffle buffer**: the tar's order, then Ray Data's local shuffle
   buffer (``data.shuffle_buffer`` rows, 0 = off) seeded by ``(seed, salt, epoch, rank)``.
4. **Augmentation and the caption drawn** for a sample with several: seeded per decoded block.

Each epoch is its own Ray Data dataset (read + decode fused; a read task per run of adjacent
shards, ``data.task_samples``) run with ``preserve_order``, so how many decode tasks run at once,
and which finishes first, changes nothing. The Train loop records how many batches of the epoch
each rank consumed; a resume on the same worker count skips exactly those batches, so it trains on
exactly the samples it had not yet seen (``vlforge.train.loop``).

What still varies: with another worker count the split is another one, so a resume from a
checkpoint of W workers on W' skips as many samples as were consumed (count-exact), not those
samples. Another ``data.seed`` or ``shuffle_buffer`` gives another order, by design. A shard
set changed on disk is another stream (``verify_sha256`` checks the bytes first).

A stage's first batch takes a cold start (Ray Data plans the epoch, starts its tasks, decodes
the first block). ``Prefetched`` fetches it in a background thread, so the Train loop starts an
epoch's iterator before it builds the model and DeepSpeed engine and that start overlaps them
(the first stage a worker runs, unless it resumes mid-stage: before it imports DeepSpeed and starts
tracking, too).

The stream is written here (not taken from Ray Data) because Ray Data's streaming split hands
blocks to whichever worker asks first, so its order is not reproducible (Ray issues #37633,
#48224); reading and decoding are still Ray Data's.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vlforge.config import DataConfig
from vlforge.data.pipeline import (
    Counters,
    check_against_manifest,
    decode,
    kind_inputs,
    read_raw,
    read_tasks,
    shard_counts,
)
from vlforge.data.shards import list_shards

if TYPE_CHECKING:
    import ray.data


def _mix(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's ``hash`` is not stable across processes for all types)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class EpochStream:
    """One stage's training data as a deterministic function of (epoch, rank, world)."""

    data: DataConfig
    kind: str
    answers: list[str] | None
    shards: list[str]  # paths as the datasource reads them (no ``s3://``), in the manifest's order
    counts: list[int] | None  # samples per shard from the manifest; None without one
    counters: Any = None  # the DataCounters actor handle
    salt: int = 0

    @classmethod
    def create(cls, data: DataConfig, counters=None, salt: int = 0) -> EpochStream:
        """Resolve the shard list, sample counts, data kind and VQA answers once (on the driver)."""
        kind, answers = kind_inputs(data)
        if data.verify_sha256:
            check_against_manifest(data.shards, data.storage)
        paths = list_shards(data.shards, data.storage)
        counts = shard_counts(data.shards, data.storage, len(paths))
        paths = [p.split("://", 1)[1] if "://" in p else p for p in paths]
        handle = (counters or Counters.create()).handle
        return cls(data, kind, answers, paths, counts, handle, salt)

    # ------------------------------------------------------------------ the order (pure functions)

    def epoch_seed(self, epoch: int) -> int:
        return _mix(self.data.seed, self.salt, epoch)

    def order(self, epoch: int) -> list[int]:
        """Shard indices in this epoch's reading order."""
        n = len(self.shards)
        if not self.data.shuffle_files:
            return list(range(n))
        return np.random.default_rng(self.epoch_seed(epoch)).permutation(n).tolist()

    def offsets(self, epoch: int) -> dict[str, int]:
        """Each shard's first stream position in this epoch."""
        out, at = {}, 0
        for k, i in enumerate(self.order(epoch)):
            out[self.shards[i]] = at if self.counts is not None else k
            at += self.counts[i] if self.counts is not None else 0
        return out

    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    # ------------------------------------------------------------------ Ray Data

    def dataset(self, epoch: int, rank: int, world: int) -> ray.data.Dataset:
        """This rank's decoded samples of ``epoch`` (read + decode fused, order preserved)."""
        d = self.data
        ordered = [self.shards[i] for i in self.order(epoch)]
        if d.shards.startswith("s3://"):
            ordered = [f"s3://{p}" for p in ordered]
        raw = read_raw(
            d.shards,
            d.storage,
            paths=ordered,
            chunk_rows=d.decode_batch_size,
            num_tasks=read_tasks(self.counts, d.task_samples),
            num_cpus=d.decode_cpus,
        )
        ds = decode(
            raw,
            d,
            kind=self.kind,
            answers=self.answers,
            train=True,
            counters=self.counters,
            keep=(rank, world, self.offsets(epoch)) if world > 1 else None,
            seed=self.epoch_seed(epoch) & 0xFFFF_FFFF,
        )
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = False
        return ds

    def batches(self, epoch: int, rank: int, world: int, batch_size: int, device=None) -> Iterator[dict]:
        """Torch batches of ``batch_size`` (the last partial one dropped) for this rank and epoch."""
        shuffle = self.data.shuffle_buffer or None
        return iter(
            self.dataset(epoch, rank, world).iter_torch_batches(
                batch_size=batch_size,
                drop_last=True,
                device=device if device is not None else "cpu",
                local_shuffle_buffer_size=shuffle,
                local_shuffle_seed=_mix(self.data.seed, self.salt, epoch, rank) & 0xFFFF_FFFF if shuffle else None,
            )
        )


_END = object()


class Prefetched(Iterator):
    """``iterator`` with its first item fetched in a background thread from construction on.

    ``next`` joins that thread (re-raising what it raised), then reads ``iterator`` directly; the
    items and their order are ``iterator``'s. Only the first item is fetched ahead, so at most one
    batch is held in memory beyond what the iterator itself buffers."""

    def __init__(self, iterator: Iterator):
        self._it = iterator
        self._first: Any = _END
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._fetch, name="vlforge-prefetch", daemon=True
        )
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it, _END)
        except BaseException as exc:  # re-raised in the caller's thread by __next__
            self._error = exc

    def __next__(self):
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        first, self._first = self._first, _END
        if first is _END:
            raise StopIteration
        return first
