"""Benchmark: images/s of the Ray Data pipeline per core vs a single-process loop.

    python jobs/bench_data.py                      # a 40k-scene corpus under data/bench (built if absent)
    python jobs/bench_data.py --shards s3://bucket/corpus/scenes/train --epochs 3
    python jobs/bench_data.py --stream             # the deterministic training stream instead

Both sides do the same work per sample through the same functions
(``vlforge.data.pipeline.decode_batch``: JPEG decode + resize + normalise +
augmentation + tokenisation, then ``finish_pixels`` and torch tensors as a Train
worker receives them; with ``--uint8`` normalisation moves from the decode step
to ``finish_pixels`` on both sides). The single-process loop reads the tar files with
``tarfile`` in one Python process: the machine's per-core ceiling. The Ray side
streams the shards through ``build_dataset`` on a local Ray, consumed in the
driver; its rate is divided by the machine's physical cores (``--cores``), while
Ray may run more decode tasks than that (``--data-cpus``, logical CPUs, default
2 per core) so that no core
idles while a task waits on I/O or scheduling. The first epoch of each side warms
caches and is not timed; then the two sides alternate epoch by epoch, so that
drift on a shared machine hits both alike, and the medians are compared.

Where the Ray side's CPU goes is printed too: the CPU seconds of every process on
the machine during the timed Ray epochs (psutil, which DeepSpeed installs), by role:
decode workers (Ray worker processes running read + decode tasks), the driver
(consuming batches), Ray's services (raylet, GCS, dashboard, the stats and counter
actors), everything else, and idle core time. Rows per CPU-second of the decode
workers against the single-process loop separate the cost of the work from the
cost of running it on Ray.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def make_single_process(shards: list[str], cfg):
    """One epoch of the single-process loop: tarfile read + ``decode_batch`` in this process."""
    import torch

    from vlforge.data.pipeline import RAW_COLUMNS, decode_batch, detect_kind, finish_pixels, raw_row
    from vlforge.data.shards import iter_samples

    kind = detect_kind(cfg.shards, cfg.storage)

    def decode(chunk) -> int:
        batch = {c: np.array([r[c] for r in chunk], dtype=object) for c in RAW_COLUMNS}
        out = decode_batch(batch, image=cfg.image, tokenizer=cfg.tokenizer, kind=kind, train=True)
        out = finish_pixels({k: torch.from_numpy(v) for k, v in out.items()}, cfg.image)
        return len(out["sample_id"])

    def one_epoch() -> int:
        n, chunk = 0, []
        for shard in shards:
            for s in iter_samples(shard, cfg.storage):
                chunk.append(raw_row(s, shard))
                if len(chunk) == cfg.decode_batch_size:
                    n += decode(chunk)
                    chunk = []
        return n + (decode(chunk) if chunk else 0)

    return one_epoch


def make_ray_pipeline(cfg, data_cpus: int, stream: bool = False):
    """One epoch of the Ray Data pipeline, consumed in the driver: ``build_dataset`` (what Ray Train's
    streaming split reads), or with ``stream`` the deterministic ``EpochStream`` one rank of one reads."""
    import ray

    from vlforge.data.pipeline import build_dataset
    from vlforge.runtime import init_ray

    init_ray(num_train_workers=0, data_cpus=data_cpus, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from vlforge.data.pipeline import Counters, finish_pixels

    if stream:
        from vlforge.data.stream import EpochStream

        counters = Counters.create()
        epochs = EpochStream.create(cfg, counters)
        state = {"epoch": 0}

        def one_epoch() -> int:
            state["epoch"] += 1
            return sum(
                len(finish_pixels(b, cfg.image)["sample_id"])
                for b in epochs.batches(state["epoch"], 0, 1, cfg.batch_size)
            )

        return one_epoch, counters
    ds, counters = build_dataset(cfg, train=True)

    def one_epoch() -> int:
        return sum(
            len(finish_pixels(b, cfg.image)["sample_id"]) for b in ds.iter_torch_batches(batch_size=cfg.batch_size)
        )

    return one_epoch, counters


def timed(epoch_fn) -> float:
    t0 = time.perf_counter()
    n = epoch_fn()
    return n / (time.perf_counter() - t0)


DECODE_TASKS = ("IDLE", "ReadShard", "MapBatches", "Read", "Map")


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this machine's processes, by role (module docstring)."""
    import psutil

    me, out = os.getpid(), {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            t = proc.cpu_times()
            cmd = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.pid == me:
            role = "driver"
        elif cmd.startswith("ray::"):
            task = cmd[5:].split()[0] if cmd[5:].split() else ""
            role = "decode workers" if task.startswith(DECODE_TASKS) else "ray services"
        elif "ray" in cmd:
            role = "ray services"
        else:
            role = "other"
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def timed_with_cpu(epoch_fn, spent: dict[str, float]) -> float:
    """``timed``, adding each role's CPU seconds during the epoch (and ``wall``) to ``spent``."""
    before, t0 = cpu_by_role(), time.perf_counter()
    n = epoch_fn()
    wall = time.perf_counter() - t0
    after = cpu_by_role()
    for role, v in after.items():
        spent[role] = spent.get(role, 0.0) + max(0.0, v - before.get(role, 0.0))
    spent["wall"] = spent.get("wall", 0.0) + wall
    spent["rows"] = spent.get("rows", 0.0) + n
    return n / wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--shards", default=None, help="shard set to read (default: scenes/train of --corpus)")
    p.add_argument("--corpus", default="data/bench", help="where the benchmark corpus lives / is built")
    p.add_argument("--scenes", type=int, default=40000, help="scenes in the benchmark corpus when built")
    p.add_argument(
        "--samples-per-shard", type=int, default=500, help="samples per shard of the benchmark corpus when built"
    )
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per side, alternating (after one warm-up each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--task-samples",
        type=int,
        default=None,
        help="samples a Ray read task covers at least (data.task_samples; default the config's, 0 = a task per shard)",
    )
    p.add_argument("--decode-batch-size", type=int, default=256)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="physical cores to divide Ray's rate by")
    p.add_argument("--data-cpus", type=int, default=None, help="logical CPUs Ray Data may use (default 2 x cores)")
    p.add_argument(
        "--uint8",
        action="store_true",
        help="image.normalize=false: decode tasks ship uint8, the consumer normalises (both sides)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="time the deterministic training stream (vlforge.data.stream) instead of build_dataset",
    )
    args = p.parse_args(argv)

    from vlforge.config import CorpusConfig, DataConfig, ImageConfig
    from vlforge.data.corpus import ensure_corpus
    from vlforge.data.shards import list_shards

    shards_uri = args.shards
    if shards_uri is None:
        ensure_corpus(
            CorpusConfig(
                out=args.corpus,
                n_concepts=0,
                n_scenes=args.scenes,
                n_vqa=0,
                n_nlvr2=0,
                samples_per_shard=args.samples_per_shard,
                second_style=False,
            )
        )
        shards_uri = os.path.join(args.corpus, "scenes", "train")
    cfg = DataConfig(
        shards=shards_uri,
        image=ImageConfig(size=args.image_size, normalize=not args.uint8),
        batch_size=256,
        decode_batch_size=args.decode_batch_size,
        **({} if args.task_samples is None else {"task_samples": args.task_samples}),
    )
    shards = list_shards(shards_uri, cfg.storage)
    data_cpus = args.data_cpus or 2 * args.cores
    print(
        f"shards: {shards_uri} ({len(shards)} files), image size {args.image_size}, "
        f"{args.epochs} timed epochs, {args.cores} cores, {data_cpus} logical CPUs for Ray Data, "
        f"read tasks of at least {cfg.task_samples} samples"
    )

    single_epoch = make_single_process(shards, cfg)
    ray_epoch, counters = make_ray_pipeline(cfg, data_cpus, stream=args.stream)
    single_epoch(), ray_epoch()  # warm-up: page cache, Ray workers, tokenizer loads
    singles, rays, spent = [], [], {}
    for r in range(args.epochs):  # alternate, so drift on a shared machine hits both sides alike
        singles.append(timed(single_epoch))
        rays.append(timed_with_cpu(ray_epoch, spent))
        print(f"round {r}: single-process {singles[-1]:6.0f} images/s, Ray Data {rays[-1]:6.0f} images/s")
    single, ray_rate = statistics.median(singles), statistics.median(rays)
    per_core = ray_rate / args.cores
    print(f"single-process loop : {single:8.0f} images/s (median of {args.epochs} epochs)")
    print(f"Ray Data pipeline   : {ray_rate:8.0f} images/s on {args.cores} cores = {per_core:.0f} images/s per core")
    print(f"ratio per core      : {per_core / single:.2f}  (goal >= 0.8)")
    print(f"counters            : {counters.snapshot()}")
    wall, rows = spent.pop("wall"), spent.pop("rows")
    total = args.cores * wall
    print(f"CPU during the {args.epochs} Ray epochs ({wall:.1f} s x {args.cores} cores = {total:.1f} core-s):")
    for role in ("decode workers", "driver", "ray services", "other"):
        print(f"  {role:<15} {spent.get(role, 0.0):6.1f} core-s  {100 * spent.get(role, 0.0) / total:5.1f} %")
    idle = max(0.0, total - sum(spent.values()))
    print(f"  {'idle':<15} {idle:6.1f} core-s  {100 * idle / total:5.1f} %")
    work = spent.get("decode workers", 0.0)
    if work > 0:
        per_cpu = rows / work
        ratio = per_cpu / single
        print(f"decode workers      : {per_cpu:8.0f} images per CPU-second = {ratio:.2f} of the single-process loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
