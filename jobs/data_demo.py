"""Data plane demo: build the built-in corpus if absent, stream it into Ray Train workers.

    python jobs/data_demo.py                                   # laptop: local Ray, 2 CPU workers
    python jobs/data_demo.py --set data.shards=s3://bucket/corpus/scenes/train
    ray job submit --working-dir . -- python jobs/data_demo.py --config jobs/configs/data_demo.yaml

Prints, per epoch, how many samples each worker received and the pipeline's
throughput, then the data counters (read / kept / skipped by reason).
"""

from __future__ import annotations

import argparse
import sys

from vlforge import config as C


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="jobs/configs/data_demo_smoke.yaml", help="DataDemoConfig YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = p.parse_args(argv)

    import os

    cfg = C.load(C.DataDemoConfig, args.config if os.path.exists(args.config) else None, args.set)

    from vlforge.data.corpus import ensure_corpus
    from vlforge.data.pipeline import Counters
    from vlforge.data.shards import shard_set_summary
    from vlforge.data.storage import is_remote
    from vlforge.runtime import init_ray
    from vlforge.train.data_probe import run_probe

    if not is_remote(cfg.data.shards) and os.path.abspath(cfg.data.shards).startswith(os.path.abspath(cfg.corpus.out)):
        ensure_corpus(cfg.corpus)
    summary = shard_set_summary(cfg.data.shards, cfg.data.storage)
    print(f"shards: {cfg.data.shards}: {summary['shards']} files, {summary['samples']} samples")
    init_ray(num_train_workers=cfg.num_workers, worker_cpus=cfg.worker_cpus, log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    result = run_probe(
        cfg.data,
        num_workers=cfg.num_workers,
        epochs=cfg.epochs,
        storage_path=os.path.abspath(cfg.storage_path),
        worker_cpus=cfg.worker_cpus,
    )
    counts = result.counters
    print(f"\n{cfg.num_workers} Train workers, {cfg.epochs} epochs, {result.seconds:.1f}s wall")
    print(f"{'epoch':>5}  {'samples per worker':<20} {'seconds':>8} {'samples/s':>10}")
    for e in result.per_epoch:
        print(f"{e['epoch']:>5}  {str(e['samples_per_rank']):<20} {e['seconds']:>8.2f} {e['samples_per_s']:>10.0f}")
    print(
        f"data counters: read {counts.get('read', 0)}, kept {counts.get('ok', 0)}, "
        f"skipped {Counters.skipped(counts) or 'none'}"
    )
    expected = (summary["samples"] or 0) * cfg.epochs
    if summary["samples"] is not None and counts.get("read", 0) != expected:
        print(f"WARNING: read {counts.get('read', 0)} samples, expected {expected}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
