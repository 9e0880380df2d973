"""The deterministic stream's order functions (``vlforge.data.stream``) and the rank split in decoding,
without Ray: same seed same order, another seed or epoch another order, ranks disjoint and covering."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vlforge.config import DataConfig, ImageConfig
from vlforge.data.pipeline import _rows_for_rank
from vlforge.data.stream import EpochStream

pytestmark = pytest.mark.unit


def _stream(seed=0, counts=(5, 3, 4, 6), shuffle=True, salt=0, n=None) -> EpochStream:
    data = DataConfig(shards="unused", seed=seed, shuffle_files=shuffle)
    n = n if n is not None else len(counts)
    return EpochStream(
        data,
        "captions",
        None,
        [f"b/s{i}.tar" for i in range(n)],
        list(counts) if counts is not None else None,
        None,
        salt,
    )


def test_same_seed_same_order_other_seed_or_epoch_other_order():
    a, b = _stream(seed=7, counts=tuple(range(1, 21))), _stream(seed=7, counts=tuple(range(1, 21)))
    assert [a.order(e) for e in range(4)] == [b.order(e) for e in range(4)]
    assert sorted(a.order(0)) == list(range(20))
    assert a.order(0) != a.order(1)
    assert a.order(0) != _stream(seed=8, counts=tuple(range(1, 21))).order(0)
    assert a.order(0) != _stream(seed=7, counts=tuple(range(1, 21)), salt=1).order(0)  # another stage
    assert _stream(shuffle=False).order(3) == [0, 1, 2, 3]


def test_offsets_follow_the_epoch_order_and_the_manifest_counts():
    s = _stream()
    order = s.order(2)
    offsets = s.offsets(2)
    at = 0
    for i in order:
        assert offsets[s.shards[i]] == at
        at += s.counts[i]
    no_counts = _stream(counts=None, n=4)
    assert sorted(no_counts.offsets(2).values()) == [0, 1, 2, 3]  # the shard's ordinal without a manifest


def _raw(stream: EpochStream) -> dict[str, np.ndarray]:
    urls, index = [], []
    for i, n in enumerate(stream.counts):
        urls += [stream.shards[i]] * n
        index += list(range(n))
    return {
        "key": np.array([f"{u}#{j}" for u, j in zip(urls, index)], dtype=object),
        "url": np.array(urls, dtype=object),
        "index": np.array(index),
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_split_every_epoch_disjointly_and_evenly(world):
    s = _stream(counts=(5, 3, 4, 6, 7))
    raw = _raw(s)
    for epoch in range(3):
        parts = [_rows_for_rank(raw, r, world, s.offsets(epoch))["key"].tolist() for r in range(world)]
        assert sum(len(p) for p in parts) == len(raw["key"])
        assert set().union(*map(set, parts)) == set(raw["key"].tolist())
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1  # positions are global with the manifest's counts


def test_seeded_decoding_is_repeatable():
    import io

    from PIL import Image

    from vlforge.config import TokenizerConfig
    from vlforge.data.pipeline import decode_batch

    def png(c):
        b = io.BytesIO()
        Image.new("RGB", (16, 16), (c, 40, 200)).save(b, format="PNG")
        return b.getvalue()

    n = 6
    raw = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "url": np.array(["u"] * n, dtype=object),
        "index": np.arange(n),
        "image": np.array([png(20 * i) for i in range(n)], dtype=object),
        "image_2": np.array([None] * n, dtype=object),
        "text": np.array([b"a caption"] * n, dtype=object),
        "json": np.array([b'{"captions": ["one", "two", "three", "four"]}'] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }
    image = dataclasses.replace(ImageConfig(size=16), augment=True, max_shift=0.2, brightness=0.3)
    tok = TokenizerConfig(max_length=8)
    a, b = (decode_batch(dict(raw), image=image, tokenizer=tok, seed=5) for _ in range(2))
    assert np.array_equal(a["pixel_values"], b["pixel_values"]) and np.array_equal(a["input_ids"], b["input_ids"])
    c = decode_batch(dict(raw), image=image, tokenizer=tok, seed=6)
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])
    kept = decode_batch(dict(raw), image=image, tokenizer=tok, seed=5, keep=(1, 2, {"u": 0}))
    assert kept["sample_id"].tolist() == a["sample_id"][1::2].tolist()


def test_read_tasks_group_small_shards_but_keep_enough_tasks():
    from vlforge.data.pipeline import MIN_READ_TASKS, read_tasks

    assert read_tasks(None, 1000) is None  # no manifest counts: one task per shard
    assert read_tasks([500] * 52, 0) is None  # grouping off
    assert read_tasks([500] * 52, 1000) == 26  # two 500-sample shards a task
    assert read_tasks([60] * 100, 1000) == 8 == MIN_READ_TASKS  # 17 shards a task would leave 6
    assert read_tasks([500] * 5, 1000) == 5  # fewer shards than the floor: one each
    assert read_tasks([10_000] * 40, 1000) == 40  # big shards are never split
    assert read_tasks([0, 0, 0], 1000) == 3


def test_shard_counts_only_for_whole_sets_whose_manifest_matches(tmp_path):
    from helpers import png
    from vlforge.data.pipeline import shard_counts
    from vlforge.data.shards import ShardWriter

    with ShardWriter(tmp_path / "set", samples_per_shard=3, params={"kind": "captions"}) as w:
        for i in range(8):
            w.write(f"s{i:03d}", image=png((i, 0, 0)), image_ext="png", text=f"sample {i}")
    uri = str(tmp_path / "set")
    assert shard_counts(uri, None, 3) == [3, 3, 2]
    assert shard_counts(uri, None, 2) is None  # the listing and the manifest disagree
    assert shard_counts(f"{uri}/shard-00000.tar", None, 1) is None
    assert shard_counts(f"{uri}/*.tar", None, 3) is None
    assert shard_counts(str(tmp_path / "nothing"), None, 0) is None


def test_task_samples_must_not_be_negative():
    with pytest.raises(ValueError, match="task_samples"):
        DataConfig(task_samples=-1)


# ----------------------------------------------------------------------------- Prefetched


def test_prefetched_fetches_the_first_item_before_it_is_asked_for_and_keeps_the_order():
    import threading

    from vlforge.data.stream import Prefetched

    started = threading.Event()
    fetched_in: list[str] = []

    def items():
        fetched_in.append(threading.current_thread().name)
        started.set()
        yield from range(5)

    it = Prefetched(items())
    assert started.wait(10), "the first item was not fetched in the background"
    assert fetched_in == ["vlforge-prefetch"]
    assert list(it) == [0, 1, 2, 3, 4]


def test_prefetched_reraises_the_first_fetch_error_and_ends_on_an_empty_iterator():
    from vlforge.data.stream import Prefetched

    def broken():
        raise OSError("shard gone")
        yield  # a generator

    with pytest.raises(OSError, match="shard gone"):
        next(Prefetched(broken()))
    assert list(Prefetched(iter([]))) == []
