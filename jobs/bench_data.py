"""Benchmark: images/s of the Ray Data pipeline per core vs a single-process loop.

    python jobs/bench_data.py                      # a 12k-scene corpus under data/bench (built if absent)
    python jobs/bench_data.py --shards s3://bucket/corpus/scenes/train --epochs 3

Both sides do the same work per sample through the same function
(``vlforge.data.pipeline.decode_batch``: JPEG decode + resize + normalise +
augmentation + tokenisation). The single-process loop reads the tar files with
``tarfile`` in one Python process: the machine's per-core ceiling. The Ray side
streams the shards through ``build_dataset`` on a local Ray, consumed in the
driver; its rate is divided by the machine's physical cores (``--cores``), while
Ray may run more decode tasks than that (``--data-cpus``, logical CPUs, default
2 per core) so that no core
idles while a task waits on I/O or scheduling. The first epoch of each side warms
caches and is not timed. Prints both rates, Ray's rate per core, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def single_process(shards: list[str], cfg, epochs: int) -> tuple[float, int]:
    from vlforge.data.pipeline import RAW_COLUMNS, decode_batch, detect_task
    from vlforge.data.shards import iter_samples

    task = detect_task(cfg.shards, cfg.storage)

    def rows():
        for shard in shards:
            for s in iter_samples(shard, cfg.storage):
                yield {"key": s["__key__"], "url": shard, "image": s.get("jpg") or s.get("png"),
                       "image_2": s.get("right.jpg"), "text": s.get("txt"), "json": s.get("json"), "error": None}

    def one_epoch() -> int:
        n, chunk = 0, []
        for r in rows():
            chunk.append(r)
            if len(chunk) == cfg.decode_batch_size:
                n += _decode(chunk)
                chunk = []
        if chunk:
            n += _decode(chunk)
        return n

    def _decode(chunk) -> int:
        batch = {c: np.array([r[c] for r in chunk], dtype=object) for c in RAW_COLUMNS}
        out = decode_batch(batch, image=cfg.image, tokenizer=cfg.tokenizer, task=task, train=True)
        return len(out["sample_id"])

    one_epoch()
    t0 = time.perf_counter()
    n = sum(one_epoch() for _ in range(epochs))
    return n / (time.perf_counter() - t0), n


def ray_pipeline(cfg, epochs: int, data_cpus: int) -> tuple[float, int, dict]:
    import ray

    from vlforge.data.pipeline import build_dataset
    from vlforge.runtime import init_ray

    init_ray(num_train_workers=0, data_cpus=data_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds, counters = build_dataset(cfg, train=True)

    def one_epoch() -> int:
        return sum(len(b["sample_id"]) for b in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                                                  prefetch_batches=4))

    one_epoch()
    t0 = time.perf_counter()
    n = sum(one_epoch() for _ in range(epochs))
    rate = n / (time.perf_counter() - t0)
    return rate, n, counters.snapshot()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shards", default=None, help="shard set to read (default: scenes/train of --corpus)")
    p.add_argument("--corpus", default="data/bench", help="where the benchmark corpus lives / is built")
    p.add_argument("--scenes", type=int, default=12000, help="scenes in the benchmark corpus when built")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up epoch)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--decode-batch-size", type=int, default=256)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="physical cores to divide Ray's rate by")
    p.add_argument("--data-cpus", type=int, default=None, help="logical CPUs Ray Data may use (default 2 x cores)")
    args = p.parse_args(argv)

    from vlforge.config import CorpusConfig, DataConfig, ImageConfig
    from vlforge.data.corpus import ensure_corpus
    from vlforge.data.shards import list_shards

    shards_uri = args.shards
    if shards_uri is None:
        ensure_corpus(CorpusConfig(out=args.corpus, n_concepts=0, n_scenes=args.scenes, n_vqa=0, n_nlvr=0,
                                   samples_per_shard=500, second_style=False))
        shards_uri = os.path.join(args.corpus, "scenes", "train")
    cfg = DataConfig(shards=shards_uri, image=ImageConfig(size=args.image_size), batch_size=256,
                     decode_batch_size=args.decode_batch_size)
    shards = list_shards(shards_uri, cfg.storage)
    data_cpus = args.data_cpus or 2 * args.cores
    print(f"shards: {shards_uri} ({len(shards)} files), image size {args.image_size}, "
          f"{args.epochs} timed epochs, {args.cores} cores, {data_cpus} logical CPUs for Ray Data")

    single, n1 = single_process(shards, cfg, args.epochs)
    print(f"single-process loop : {single:8.0f} images/s  ({n1} images)")
    ray_rate, n2, counts = ray_pipeline(cfg, args.epochs, data_cpus)
    per_core = ray_rate / args.cores
    print(f"Ray Data pipeline   : {ray_rate:8.0f} images/s  ({n2} images, {args.cores} cores) "
          f"= {per_core:.0f} images/s per core")
    print(f"ratio per core      : {per_core / single:.2f}  (goal >= 0.8)")
    print(f"counters            : {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
