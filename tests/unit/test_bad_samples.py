"""Every bad-sample kind is skipped and counted, and fuzzed shards never crash the reader."""

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from vlforge.config import ImageConfig, TokenizerConfig
from vlforge.data.pipeline import RAW_COLUMNS, decode_batch, read_stream, sample_id

pytestmark = pytest.mark.unit


class FakeCounters:
    """Stands in for the counters actor (unit tier)."""

    def __init__(self):
        self.counts = Counter()
        self.add = self

    def remote(self, delta):
        self.counts.update(delta)
        return None


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    was_up = ray.is_initialized()
    monkeypatch.setattr(ray, "get", lambda x: x)
    yield
    assert was_up or not ray.is_initialized(), "reading shards started Ray"


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def read_rows(path: Path) -> dict[str, list]:
    tables = list(read_stream(pa.input_stream(str(path)), str(path)))
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in RAW_COLUMNS})
    return {c: table[c].to_pylist() for c in RAW_COLUMNS}


def decode_all(paths, kind="captions"):
    counters = FakeCounters()
    ids = []
    for p in paths:
        rows = read_rows(p)
        batch = {k: np.array(v, dtype=object) for k, v in rows.items()}
        out = decode_batch(
            batch,
            image=ImageConfig(size=32),
            tokenizer=TokenizerConfig(max_length=8),
            kind=kind,
            answers=["yes"],
            counters=counters.add,
        )
        if not out:
            continue
        n = len(out["sample_id"])
        assert n > 0
        assert out["pixel_values"].shape == (n, 3, 32, 32) and out["pixel_values"].dtype == np.float32
        assert out["input_ids"].shape == (n, 8)
        ids.extend(out["sample_id"].tolist())
    return counters.counts, ids


def test_each_bad_kind_is_counted(bad_shards):
    counts, ids = decode_all(sorted(bad_shards["dir"].glob("*.tar")))
    skipped = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("skipped.")}
    assert skipped == bad_shards["bad"]
    assert counts["ok"] == len(bad_shards["good_keys"])
    assert counts["read"] == bad_shards["total"]
    assert sorted(ids) == sorted(sample_id(k) for k in bad_shards["good_keys"])


def test_vqa_without_answer_is_missing_field(tmp_path):
    from vlforge.data.shards import ShardWriter

    with ShardWriter(tmp_path) as w:
        w.write("a", image=_jpeg(1), text="q?", meta={"answer": "yes"})
        w.write("b", image=_jpeg(2), text="q?", meta={"question": "q?"})
    counts, _ = decode_all([tmp_path / "shard-00000.tar"], kind="vqa")
    assert counts["ok"] == 1 and counts["skipped.missing_field"] == 1


def test_fuzzed_shards_never_crash(bad_shards, tmp_path):
    rng = random.Random(1)
    source = sorted(bad_shards["dir"].glob("shard-0000*.tar"))[0].read_bytes()
    total_read = 0
    for trial in range(40):
        data = bytearray(source)
        mode = trial % 3
        if mode == 0:
            for _ in range(rng.randint(1, 30)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mode == 1:
            data = data[: rng.randrange(1, len(data))]
        else:
            start = rng.randrange(len(data))
            data[start : start + rng.randint(1, 2000)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 50)))
        p = tmp_path / f"fuzz{trial}.tar"
        p.write_bytes(bytes(data))
        try:
            counts, ids = decode_all([p])
        except Exception as exc:  # the test's point: report which mutation crashed
            pytest.fail(f"trial {trial} (mode {mode}) crashed: {type(exc).__name__}: {exc}")
        skipped = sum(v for k, v in counts.items() if k.startswith("skipped."))
        assert counts["read"] == counts["ok"] + skipped
        total_read += counts["read"]
    assert total_read > 0


def test_uint8_pixels_normalised_by_consumer_match_decode_side(bad_shards):
    import torch

    from vlforge.data.pipeline import finish_pixels

    path = sorted(bad_shards["dir"].glob("shard-0000*.tar"))[0]
    batch = {k: np.array(v, dtype=object) for k, v in read_rows(path).items()}
    cfgs = [ImageConfig(size=32, augment=False), ImageConfig(size=32, augment=False, normalize=False)]
    floats, uint8 = (decode_batch(batch, image=c, tokenizer=TokenizerConfig(max_length=8)) for c in cfgs)
    assert uint8["pixel_values"].dtype == np.uint8 and floats["pixel_values"].dtype == np.float32
    done = finish_pixels({"pixel_values": torch.from_numpy(uint8["pixel_values"])}, cfgs[1])
    assert torch.allclose(done["pixel_values"], torch.from_numpy(floats["pixel_values"]), atol=1e-6)
