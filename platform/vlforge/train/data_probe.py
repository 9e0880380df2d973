"""Data probe: stream a shard set into Ray Train workers and measure what arrives.

A Ray Train run whose workers only consume their dataset shard: samples per
epoch and rank, throughput, and optionally the ``sample_id`` of every sample
(``record_dir``), so callers can check that each sample arrives exactly once per
epoch. ``jobs/data_demo.py`` and the integration tests use it.

    result = run_probe(DataConfig(shards="data/corpus/scenes/train"), num_workers=2, epochs=2)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.config import DataConfig
from vlforge.data.pipeline import build_dataset, exact_split_config


def probe_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        ids, n, checksum = [], 0, 0.0
        t0 = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=config["batch_size"], local_shuffle_buffer_size=config.get("shuffle_buffer") or None
        ):
            n += len(batch["sample_id"])
            checksum += float(torch.as_tensor(batch["pixel_values"]).float().mean())
            if config.get("record_ids"):
                ids.append(batch["sample_id"].numpy())
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch, "rank": rank, "samples": n, "seconds": seconds}
        out = Path(config["metrics_dir"])
        (out / f"epoch{epoch}_rank{rank}.json").write_text(json.dumps(metrics))
        if config.get("record_ids"):
            arr = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            np.save(out / f"epoch{epoch}_rank{rank}.npy", arr)
        ray.train.report(metrics)


@dataclass
class ProbeResult:
    epochs: int
    num_workers: int
    seconds: float
    counters: dict[str, int]
    per_epoch: list[dict[str, Any]] = field(default_factory=list)  # samples per rank, seconds, samples/s
    metrics_dir: str = ""

    def ids(self, epoch: int) -> list:
        """Sample ids each rank received in ``epoch`` (needs ``record_ids=True``)."""
        import numpy as np

        return [np.load(Path(self.metrics_dir) / f"epoch{epoch}_rank{r}.npy") for r in range(self.num_workers)]


def run_probe(
    cfg: DataConfig,
    *,
    num_workers: int = 2,
    epochs: int = 1,
    record_ids: bool = False,
    storage_path: str | None = None,
    worker_cpus: float = 1.0,
    name: str | None = None,
) -> ProbeResult:
    """Run ``probe_loop`` on ``num_workers`` Train workers over ``cfg.shards``.

    Workers write per-epoch metrics (and with ``record_ids`` the sample ids they
    received) under ``storage_path/name/probe``, which must be shared by all
    workers (local disk on one machine, shared storage on a cluster).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds, counters = build_dataset(cfg, train=True)
    storage_path = storage_path or os.path.abspath(os.path.join("out", "ray_results"))
    name = name or f"data-probe-{uuid.uuid4().hex[:8]}"
    metrics_dir = Path(storage_path) / name / "probe"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config={
            "epochs": epochs,
            "batch_size": cfg.batch_size,
            "record_ids": record_ids,
            "metrics_dir": str(metrics_dir),
            "shuffle_buffer": cfg.shuffle_buffer,
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": worker_cpus}),
        datasets={"train": ds},
        dataset_config=exact_split_config(),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    per_epoch = []
    for e in range(epochs):
        ranks = [json.loads((metrics_dir / f"epoch{e}_rank{r}.json").read_text()) for r in range(num_workers)]
        samples = [m["samples"] for m in ranks]
        wall = max(m["seconds"] for m in ranks)
        per_epoch.append(
            {"epoch": e, "samples_per_rank": samples, "seconds": wall, "samples_per_s": sum(samples) / max(wall, 1e-9)}
        )
    return ProbeResult(epochs, num_workers, seconds, counters.snapshot(), per_epoch, str(metrics_dir))
