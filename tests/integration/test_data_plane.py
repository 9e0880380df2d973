"""Real services: local Ray, Ray Data, Ray Train with 2 workers, and an S3-compatible server."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from vlforge.config import DataConfig, ImageConfig, StorageConfig, TokenizerConfig
from vlforge.data.pipeline import build_dataset, sample_id
from vlforge.data.shards import iter_samples, list_shards
from vlforge.data.storage import StorageUnreachable, upload_dir
from vlforge.train.data_probe import run_probe

pytestmark = pytest.mark.integration


def _keys(uri, storage=None):
    return [s["__key__"] for shard in list_shards(uri, storage) for s in iter_samples(shard, storage)]


@pytest.fixture(scope="module")
def s3_corpus(s3_server, corpus):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/corpus"
    n = upload_dir(corpus, uri)
    assert n > 10
    return uri


def test_s3_listing_matches_local(s3_corpus, corpus):
    remote = list_shards(f"{s3_corpus}/scenes/train")
    local = list_shards(str(corpus / "scenes" / "train"))
    assert [u.rsplit("/", 1)[1] for u in remote] == [p.rsplit("/", 1)[1] for p in local]
    assert remote[0].startswith("s3://")
    assert _keys(f"{s3_corpus}/scenes/train") == _keys(str(corpus / "scenes" / "train"))


def test_s3_into_two_train_workers_exactly_once(ray_local, s3_corpus, tmp_path):
    """2 Train workers on this 2-core machine, 2 epochs, every sample once per epoch."""
    uri = f"{s3_corpus}/scenes/train"
    expected = sorted(sample_id(k) for k in _keys(uri))
    cfg = DataConfig(
        shards=uri,
        batch_size=16,
        decode_batch_size=32,
        image=ImageConfig(size=32),
        tokenizer=TokenizerConfig(max_length=24),
    )
    result = run_probe(cfg, num_workers=2, epochs=2, record_ids=True, storage_path=str(tmp_path / "ray"))
    for epoch in range(2):
        per_rank = result.ids(epoch)
        assert result.per_epoch[epoch]["samples_per_rank"] == [len(x) for x in per_rank]
        assert all(len(x) > 0 for x in per_rank), "a worker got no data"
        got = sorted(np.concatenate(per_rank).tolist())
        assert got == expected, f"epoch {epoch}: {len(got)} arrived, {len(expected)} expected"
    assert result.counters["ok"] == 2 * len(expected)
    assert result.counters["read"] == 2 * len(expected)


def test_bad_samples_counted_through_ray_data(ray_local, bad_shards):
    ds, counters = build_dataset(
        DataConfig(shards=str(bad_shards["dir"]), image=ImageConfig(size=32)), train=False, kind="captions"
    )
    ids = []
    for batch in ds.iter_torch_batches(batch_size=8):
        ids.extend(batch["sample_id"].tolist())
    assert sorted(ids) == sorted(sample_id(k) for k in bad_shards["good_keys"])
    counts = counters.snapshot()
    skipped = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("skipped.")}
    assert skipped == bad_shards["bad"]
    assert counts["read"] == bad_shards["total"]


@pytest.mark.parametrize("task, extra", [("vqa", {"answer_id"}), ("nlvr2", {"pixel_values_2", "label", "image_truth"})])
def test_task_batches_from_s3(ray_local, s3_corpus, corpus, task, extra):
    ds, counters = build_dataset(DataConfig(shards=f"{s3_corpus}/{task}/val", image=ImageConfig(size=32)), train=False)
    batches = list(ds.iter_torch_batches(batch_size=50))
    keys = {"pixel_values", "input_ids", "attention_mask", "sample_id"} | extra
    assert all(set(b) == keys for b in batches)
    n = sum(len(b["sample_id"]) for b in batches)
    assert n == len(_keys(str(corpus / task / "val")))
    if task == "vqa":
        answers = json.loads((corpus / "answers.json").read_text())
        ids = np.concatenate([b["answer_id"].numpy() for b in batches])
        assert (ids >= 0).all() and (ids < len(answers)).all()
    else:
        labels = Counter(np.concatenate([b["label"].numpy() for b in batches]).tolist())
        assert abs(labels[0] - labels[1]) <= 1
        b = batches[0]
        assert b["pixel_values_2"].shape == b["pixel_values"].shape == (len(b["label"]), 3, 32, 32)


def test_unreachable_storage_fails_before_reading(ray_local):
    bad = StorageConfig(s3_endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StorageUnreachable, match=r"127\.0\.0\.1:9 unreachable"):
        build_dataset(DataConfig(shards="s3://nobucket/x", storage=bad))


def test_cli_stream_from_s3(ray_local, s3_corpus, capsys):
    from vlforge.cli import main

    assert main(["data", "stream", f"{s3_corpus}/concepts/val", "--set", "image.size=32"]) == 0
    out = capsys.readouterr().out
    assert "skipped 0" in out and re.search(r'"pixel_values": "\(\d+, 3, 32, 32\) float32"', out)
    assert main(["data", "ls", f"{s3_corpus}/concepts/val"]) == 0
    assert "shard(s)" in capsys.readouterr().out
    assert main(["data", "verify", f"{s3_corpus}/concepts/val"]) == 0


def test_grouped_read_tasks_keep_the_stream_order(ray_local, tmp_path):
    """Adjacent shards read by one task (``data.task_samples``): the same ids in the same order, per rank."""
    from helpers import png
    from vlforge.data.pipeline import read_tasks
    from vlforge.data.shards import ShardWriter
    from vlforge.data.stream import EpochStream

    with ShardWriter(tmp_path / "set", samples_per_shard=5, params={"kind": "captions"}) as w:
        for i in range(60):
            w.write(f"s{i:04d}", image=png((4 * i % 256, 0, 0)), image_ext="png", text=f"sample {i}")

    def ids(task_samples: int) -> tuple[list[list[int]], int]:
        cfg = DataConfig(shards=str(tmp_path / "set"), image=ImageConfig(size=16), seed=3, task_samples=task_samples)
        stream = EpochStream.create(cfg)
        out = [[int(i) for b in stream.batches(1, rank, 2, batch_size=5) for i in b["sample_id"]] for rank in (0, 1)]
        stats = stream.dataset(1, 0, 2).materialize().stats()
        return out, int(re.search(r"(\d+) tasks executed", stats).group(1))

    one_each, tasks_one = ids(0)
    grouped, tasks_grouped = ids(10)
    assert tasks_one == 12 and tasks_grouped == read_tasks([5] * 12, 10) == 8
    assert grouped == one_each
    assert sorted(grouped[0] + grouped[1]) == sorted(sample_id(f"s{i:04d}") for i in range(60))


def test_decode_worker_warm_up_runs_once_per_cluster(ray_local, caplog):
    """``warm_decode_workers`` (run by the driver as each Train run starts) finishes its tiny Ray Data job
    on this cluster without a warning, and a second call on the same cluster starts nothing."""
    from vlforge.data import pipeline

    cluster = ray_local.get_runtime_context().gcs_address
    pipeline._WARMED.discard(cluster)  # an earlier Train run of this session may have warmed it
    cfg = DataConfig(shards="unused", tokenizer=TokenizerConfig(max_length=16))
    thread = pipeline.warm_decode_workers(cfg, slots=2)
    assert thread is not None
    thread.join(180)
    assert not thread.is_alive()
    assert "warm-up failed" not in caplog.text
    assert pipeline.warm_decode_workers(cfg, slots=2) is None
