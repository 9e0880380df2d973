"""Learning per minute: a recipe's training on the platform against plain torch in one process.

    curves = bench_learning(run_cfg, eval_shards="data/corpus/scenes/test", data=data_cfg, eval_every=10)
    print(format_curves(curves))

``run_cfg`` is one Ray Train run of a recipe (``jobs/bench_learning.py`` takes the default
two-stage job's ``teacher-pretrain`` run). Both sides train the same model, stages, objectives,
optimizer, schedule, global batch and seed, and are scored the same way (retrieval R@1 in both
directions with the model's ITC embeddings on ``eval_shards``) every ``eval_every`` steps:

* ``platform``: ``vlforge.train.runner.run_training`` as the job runs it: Ray Data decoding the
  shards, Ray Train workers, DeepSpeed, checkpoints, MLflow. A validator on rank 0 scores each
  checkpoint and records the wall clock since the driver called ``run_training`` (Ray start-up,
  worker and engine set-up, data start and checkpointing included), minus the time spent scoring.
* ``torch``: one process with every core's threads, the training shard sets decoded into memory
  once with the pipeline's decoder (that time counted; no augmentation), a torch optimizer and
  scheduler built by the same helpers the engine uses, the clock stopped while scoring.

The ratio of the times each side takes to reach the same R@1 is the cost of the platform in
learning per minute on this machine. Nothing here asserts a speed; the job prints the figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlforge.config import DataConfig, TrainRunConfig
from vlforge.evaluation.data import load_eval_set
from vlforge.evaluation.validation import RetrievalValidator
from vlforge.models.trainable import param_groups, set_trainable
from vlforge.runtime import tune_malloc
from vlforge.tasks import build_task, create
from vlforge.train.engine import make_optimizer, make_schedule
from vlforge.train.runner import run_training


@dataclass
class CurvePoint:
    system: str
    step: int
    seconds: float  # training wall clock when the step finished, scoring excluded
    samples: int
    i2t_r1: float
    t2i_r1: float

    @property
    def r1(self) -> float:
        return (self.i2t_r1 + self.t2i_r1) / 2


def checkpoint_steps(cfg: TrainRunConfig) -> list[int]:
    """Global steps at which the worker loop reports (every ``checkpoint_every`` and each stage end)."""
    out, done = [], 0
    for s in cfg.stages:
        for step in range(1, s.steps + 1):
            if step == s.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                out.append(done + step)
        done += s.steps
    return out


@dataclass
class CurveValidator:
    """Rank 0's validator in the platform run: scores the model and appends a row to ``path``."""

    scorer: RetrievalValidator  # retrieval on the scoring set, decoded once per process
    path: str
    t0: float  # driver's time.time() when run_training was called
    scoring_s: float = 0.0

    def __call__(self, model) -> dict[str, float]:
        start = time.time()
        scores = self.scorer(model)
        i2t, t2i = scores["val_i2t_r1"], scores["val_t2i_r1"]
        row = {"seconds": start - self.t0 - self.scoring_s, "i2t_r1": i2t, "t2i_r1": t2i}
        self.scoring_s += time.time() - start
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return {"val_i2t_r1": i2t, "val_t2i_r1": t2i}


def global_batch(cfg: TrainRunConfig, stage) -> int:
    data = stage.data or cfg.data
    return data.batch_size * cfg.num_workers * cfg.deepspeed.grad_accum


def platform_curve(cfg: TrainRunConfig, scorer: RetrievalValidator, work: Path) -> list[CurvePoint]:
    path = work / "platform_curve.jsonl"
    path.unlink(missing_ok=True)
    validator = CurveValidator(scorer, str(path), time.time())
    run_training(cfg, validator=validator)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps = checkpoint_steps(cfg)
    if len(rows) != len(steps):
        raise RuntimeError(f"platform run reported {len(rows)} times, expected {len(steps)} (a restart?)")
    return [
        CurvePoint("platform", s, r["seconds"], _samples(cfg, s), r["i2t_r1"], r["t2i_r1"]) for s, r in zip(steps, rows)
    ]


def _samples(cfg: TrainRunConfig, global_step: int) -> int:
    total, done = 0, 0
    for s in cfg.stages:
        n = min(s.steps, max(0, global_step - done))
        total += n * global_batch(cfg, s)
        done += s.steps
    return total


def torch_curve(
    cfg: TrainRunConfig, scorer: RetrievalValidator, log: Callable[[str], None] = print
) -> list[CurvePoint]:
    """The same stages in one process with plain torch; see the module docstring."""
    import torch

    tune_malloc()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    scorer(create(cfg))  # decode the scoring set outside the clock
    report = set(checkpoint_steps(cfg))
    points: list[CurvePoint] = []
    t0, scoring, global_step = time.perf_counter(), 0.0, 0
    model = create(cfg)
    for stage in cfg.stages:
        data = stage.data or cfg.data
        train = load_eval_set(
            data.shards,
            dataclasses.replace(data, image=dataclasses.replace(data.image, augment=False)),
            kind="captions",
        )
        task = build_task(cfg, stage, model, gather=False)
        set_trainable(model, stage.trainable)
        opt = make_optimizer(param_groups(task.module, stage.optimizer.weight_decay), stage.optimizer, False)
        sched = make_schedule(opt, stage.schedule, stage.steps)
        batch, n = global_batch(cfg, stage), len(train["input_ids"])
        g = torch.Generator().manual_seed(cfg.seed)
        order, pos = torch.randperm(n, generator=g), 0
        task.module.train()
        for _ in range(stage.steps):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos : pos + batch]
            pos += batch
            out = task.module({k: v[idx] for k, v in train.items()})
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.deepspeed.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.clip_grad)
            opt.step()
            sched.step()
            global_step += 1
            if global_step in report:
                seconds = time.perf_counter() - t0 - scoring
                s0 = time.perf_counter()
                model.eval()
                with torch.no_grad():
                    scores = scorer(model)
                i2t, t2i = scores["val_i2t_r1"], scores["val_t2i_r1"]
                task.module.train()
                scoring += time.perf_counter() - s0
                points.append(CurvePoint("torch", global_step, seconds, _samples(cfg, global_step), i2t, t2i))
                log(
                    f"[torch] step {global_step}: {seconds:.0f}s, R@1 i2t {i2t:.1f} t2i {t2i:.1f}, "
                    f"loss {float(out['loss']):.3f}"
                )
    return points


def time_to(points: list[CurvePoint], target: float) -> float | None:
    """Seconds at which mean R@1 first reaches ``target`` (linear between points; None if never)."""
    prev_t, prev_r = 0.0, None
    for p in points:
        if p.r1 >= target:
            if prev_r is None or p.r1 == prev_r:
                return p.seconds
            return prev_t + (target - prev_r) * (p.seconds - prev_t) / (p.r1 - prev_r)
        prev_t, prev_r = p.seconds, p.r1
    return None


def summarise(curves: dict[str, list[CurvePoint]], target_fraction: float = 0.8) -> dict[str, Any]:
    """Target R@1 (``target_fraction`` of the lower final mean R@1), each side's time to it, the
    ratio platform / torch, and each side's samples per second over the whole run."""
    finals = {k: v[-1] for k, v in curves.items() if v}
    target = target_fraction * min(p.r1 for p in finals.values())
    times = {k: time_to(v, target) for k, v in curves.items()}
    out: dict[str, Any] = {"target_r1": target, **{f"{k}_seconds_to_target": t for k, t in times.items()}}
    for k, p in finals.items():
        out[f"{k}_final_r1"] = p.r1
        out[f"{k}_seconds"] = p.seconds
        out[f"{k}_samples_per_s"] = p.samples / p.seconds if p.seconds > 0 else None
    if times.get("platform") and times.get("torch"):
        out["time_ratio"] = times["platform"] / times["torch"]
    if out.get("platform_samples_per_s") and out.get("torch_samples_per_s"):
        out["throughput_ratio"] = out["torch_samples_per_s"] / out["platform_samples_per_s"]
    return out


def format_curves(curves: dict[str, list[CurvePoint]], summary: dict[str, Any]) -> str:
    lines = [f"{'system':<9} {'step':>5} {'minutes':>8} {'samples':>8} {'i2t R@1':>8} {'t2i R@1':>8}"]
    for points in curves.values():
        for p in points:
            lines.append(
                f"{p.system:<9} {p.step:>5} {p.seconds / 60:>8.2f} {p.samples:>8} {p.i2t_r1:>8.1f} {p.t2i_r1:>8.1f}"
            )
    lines.append("")
    lines.append(f"target mean R@1 {summary['target_r1']:.1f} (0.8 of the lower final)")
    for k in curves:
        t = summary.get(f"{k}_seconds_to_target")
        sps = summary.get(f"{k}_samples_per_s")
        lines.append(f"{k:<9} reaches it after {t / 60:.2f} min" if t is not None else f"{k:<9} never reaches it")
        lines[-1] += f"; final mean R@1 {summary[f'{k}_final_r1']:.1f} after {summary[f'{k}_seconds'] / 60:.2f} min"
        if sps:
            lines[-1] += f", {sps:.1f} samples/s"
    if "time_ratio" in summary:
        lines.append(
            f"learning-per-minute ratio (platform time / torch time to the target): {summary['time_ratio']:.2f}"
        )
    if "throughput_ratio" in summary:
        lines.append(f"throughput ratio (torch / platform samples/s): {summary['throughput_ratio']:.2f}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[CurvePoint]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "t2i_r1", "text -> image R@1"), (axes[1], "i2t_r1", "image -> text R@1")):
        for name, points in curves.items():
            ax.plot([p.seconds / 60 for p in points], [getattr(p, key) for p in points], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("training wall clock (min)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R@1 (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bench_learning(
    cfg: TrainRunConfig,
    *,
    eval_shards: str,
    data: DataConfig,
    eval_every: int,
    max_samples: int,
    work: Path,
    systems: tuple[str, ...] = ("platform", "torch"),
    log: Callable[[str], None] = print,
) -> dict[str, list[CurvePoint]]:
    cfg = dataclasses.replace(cfg, checkpoint_every=eval_every, keep_checkpoints=1)
    scorer = RetrievalValidator(eval_shards, data, max_samples=max_samples)
    work.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[CurvePoint]] = {}
    if "platform" in systems:
        log(f"== platform: {cfg.name} on {cfg.num_workers} Ray Train workers, ZeRO-{cfg.deepspeed.zero_stage}")
        curves["platform"] = platform_curve(cfg, scorer, work)
    if "torch" in systems:
        log("== torch: one process")
        curves["torch"] = torch_curve(cfg, scorer, log)
    return curves
