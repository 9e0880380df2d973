"""Driver side of a training run: validate, build data, start Ray Train, export.

    from vlforge.config import TrainRunConfig, load
    result = run_training(load(TrainRunConfig, "jobs/configs/vlmo_stagewise_smoke.yaml"))
    print(result.summary())

Everything that can be checked without a cluster is checked first
(``validate``): objective names, ZeRO settings, trainable patterns against the
model's parameter names (the model is built on the meta device), image size and
tokenizer length against the model. Then paths are made absolute on the driver
(storage, shards, MLflow store and buffer), the corpus is built if the config
asks for it and it is absent, one Ray Data pipeline per stage is built, and one
Ray Train run (``RunConfig(name, storage_path)``; the same name resumes it) runs
``vlforge.train.loop.train_fn_per_worker`` on ``num_workers`` workers with
``FailureConfig(max_failures)``. The final checkpoint is exported to
``<storage_path>/<name>/export`` (``vlforge.train.export``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from vlforge.config import FINETUNE_TASKS, ConfigError, DataConfig, TrainRunConfig, load, to_dict
from vlforge.data.corpus import ensure_corpus
from vlforge.data.pipeline import Counters, build_dataset, warm_decode_workers
from vlforge.data.shards import list_shards
from vlforge.data.storage import StorageUnreachable, absolute, check_reachable, is_uri
from vlforge.data.stream import EpochStream
from vlforge.models.io import read_spec
from vlforge.runtime import init_ray as start_ray
from vlforge.tasks import check_stages, model_sizes
from vlforge.tracking import resolve_tracking_uri
from vlforge.tracking.store import experiment_id
from vlforge.train.checkpoint import STATE_FILE, CheckpointMismatch, check_resumable, convert_to_universal, read_state
from vlforge.train.export import export_checkpoint
from vlforge.train.loop import WorkerArgs, train_fn_per_worker


def validate(cfg: TrainRunConfig, check_paths: bool = True) -> None:
    """Raise ``ConfigError`` for settings that cannot work, before any Ray resource is taken.
    ``check_paths=False`` skips init and teacher paths (a workflow whose earlier runs make them)."""
    check_stages(cfg)
    try:
        sizes = model_sizes(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model {cfg.model!r} with overrides {cfg.model_overrides}: {exc}") from None
    names = sizes["param_names"]
    for s in cfg.stages:
        unmatched = [p for p in s.trainable if not any(fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ConfigError(f"stage {s.name}: trainable patterns match no parameter of {cfg.model}: {unmatched}")
        data = s.data or cfg.data
        if data.image.size != sizes["img_size"]:
            raise ConfigError(
                f"stage {s.name}: data image.size {data.image.size} != {cfg.model} img_size "
                f"{sizes['img_size']}; set data.image.size={sizes['img_size']}"
            )
        if sizes["max_text_len"] is not None and data.tokenizer.max_length != sizes["max_text_len"]:
            raise ConfigError(
                f"stage {s.name}: data tokenizer.max_length {data.tokenizer.max_length} != "
                f"{cfg.model} max_text_len {sizes['max_text_len']}; set "
                f"data.tokenizer.max_length={sizes['max_text_len']}"
            )
        if (
            check_paths
            and s.init not in ("previous", "fresh")
            and not s.init_stage
            and not is_uri(s.init)
            and not Path(s.init).exists()
        ):
            raise ConfigError(f"stage {s.name}: init path {s.init} does not exist")
        if check_paths and s.teacher and not is_uri(s.teacher):
            try:
                spec = read_spec(s.teacher)
            except FileNotFoundError as exc:
                raise ConfigError(f"stage {s.name}: teacher {exc}") from None
            if s.task in FINETUNE_TASKS and spec.get("method") != "fusion":
                raise ConfigError(
                    f"stage {s.name}: task {s.task} needs a fine-tuned fusion teacher "
                    f"(method 'fusion'), {s.teacher} is a {spec.get('method')!r} model"
                )
            if s.task == "vqa" and spec.get("num_answers") != cfg.num_answers:
                raise ConfigError(
                    f"stage {s.name}: teacher has {spec.get('num_answers')} VQA answers, "
                    f"this run num_answers={cfg.num_answers}"
                )
    if cfg.debug.fail_at_step is not None and cfg.debug.fail_rank >= cfg.num_workers:
        raise ConfigError(f"debug.fail_rank {cfg.debug.fail_rank} >= num_workers {cfg.num_workers}")


def check_data(uses: list[tuple[str, DataConfig]]) -> None:
    """Every shard set named (``(who uses it, its data config)``) is reachable and complete, checked
    once per set before any Ray resource is taken: ``ConfigError`` naming the user otherwise."""
    seen: set[str] = set()
    for who, data in uses:
        if data.shards in seen:
            continue
        seen.add(data.shards)
        try:
            check_reachable(data.shards, data.storage)
            list_shards(data.shards, data.storage)
        except (StorageUnreachable, FileNotFoundError) as exc:
            raise ConfigError(f"{who}: {exc}") from None


def _absolute_data(data: DataConfig) -> DataConfig:
    return dataclasses.replace(data, shards=absolute(data.shards))


def resolve(cfg: TrainRunConfig) -> TrainRunConfig:
    """Paths absolute and the MLflow store fixed on the driver (workers run elsewhere / in other dirs)."""
    tracking = dataclasses.replace(
        cfg.tracking,
        tracking_uri=resolve_tracking_uri(cfg.tracking),
        buffer_dir=os.path.abspath(cfg.tracking.buffer_dir),
    )
    stages = [
        dataclasses.replace(
            s,
            data=_absolute_data(s.data) if s.data else None,
            init=s.init if s.init in ("previous", "fresh") or s.init_stage else absolute(s.init),
            teacher=absolute(s.teacher) if s.teacher else None,
        )
        for s in cfg.stages
    ]
    name = cfg.name or f"{cfg.method}-{cfg.model}-{uuid.uuid4().hex[:8]}"
    overrides = dict(cfg.model_overrides)
    if isinstance(overrides.get("teacher"), str) and overrides["teacher"] != "random":  # VLKD's teacher directory
        overrides["teacher"] = absolute(overrides["teacher"])
    return dataclasses.replace(
        cfg,
        tracking=tracking,
        stages=stages,
        data=_absolute_data(cfg.data),
        storage_path=absolute(cfg.storage_path),
        name=name,
        model_overrides=overrides,
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory of a run on local storage (by its global step), or None."""
    found = [
        (read_state(d)["global_step"], d.stat().st_mtime, d)
        for d in run_dir.glob("checkpoint_*")
        if (d / STATE_FILE).exists()
    ]
    return max(found)[2] if found else None


def check_existing_run(cfg: TrainRunConfig) -> None:
    """When ``cfg.name`` already has checkpoints (a resume), check they fit this config before starting."""
    if is_uri(cfg.storage_path):
        return
    last = latest_checkpoint(Path(cfg.storage_path) / cfg.name)
    if last is None:
        return
    state = read_state(last)
    resized = state["world_size"] != cfg.num_workers and state["zero_stage"] > 0
    try:
        check_resumable(state, cfg.num_workers, cfg.deepspeed.zero_stage, universal=cfg.deepspeed.universal_resume)
    except CheckpointMismatch as exc:
        raise CheckpointMismatch(f"run {cfg.name} ({last}): {exc}") from None
    if resized:
        print(
            f"run {cfg.name}: checkpoint {last.name} has {state['world_size']} workers' shards, this run "
            f"{cfg.num_workers}: converting it to a DeepSpeed universal checkpoint",
            flush=True,
        )
        convert_to_universal(last)
    names = [s.name for s in cfg.stages]
    if state["stage"] not in names or names.index(state["stage"]) != state["stage_index"]:
        raise CheckpointMismatch(
            f"run {cfg.name}: its checkpoint is at stage {state['stage']!r} (index "
            f"{state['stage_index']}), which this config's stages {names} do not have there"
        )


def prepare_local_mlflow(tracking) -> None:
    """A local SQLite store gets its experiment from the driver, with artifacts in ``mlruns/<experiment>``
    beside the database file (``./mlruns`` for the default ``./mlflow.db``), not in a worker's directory."""
    uri = tracking.tracking_uri or ""
    if not tracking.enabled or not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    experiment_id(MlflowClient(uri), tracking.experiment, (db.parent / "mlruns" / tracking.experiment).as_uri())


SUMMARY_FILE = "summary.json"  # written beside a run's checkpoints when it has run to its end


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether the Train run in ``run_dir`` ran to its end (its ``summary.json``); an unfinished one resumes."""
    return (Path(run_dir) / SUMMARY_FILE).exists()


@dataclass
class TrainResult:
    name: str
    seconds: float
    checkpoint: str | None
    export_dir: str | None
    state: dict[str, Any] = field(default_factory=dict)  # vlforge_state.json of the final checkpoint
    metrics: dict[str, Any] = field(default_factory=dict)

    def losses(self, stage: str) -> list[tuple[int, float]]:
        return [tuple(p) for p in self.state.get("history", {}).get(f"{stage}/loss", [])]

    def summary(self) -> str:
        lines = [f"run {self.name}: {self.seconds:.0f}s, checkpoint {self.checkpoint}"]
        for key, points in self.state.get("history", {}).items():
            if points:
                first, last = points[0][1], points[-1][1]
                lines.append(f"  {key}: {first:.4f} -> {last:.4f} over {len(points)} steps")
        for r in self.state.get("resumes", []):
            lines.append(
                f"  resumed {r['stage']} at step {r['step']}: weights match {r['weights_match']}, "
                f"steps redone {r['lost_steps']}"
            )
        if self.export_dir:
            lines.append(f"  export: {self.export_dir}")
        return "\n".join(lines)


def run_training(
    cfg: TrainRunConfig, *, init_ray: bool = True, validator: Any = None, callbacks: list | None = None
) -> TrainResult:
    """Validate, then run all stages of ``cfg`` on Ray Train; returns paths and the loss history.

    ``validator``: a picklable callable ``model -> {name: value}`` that rank 0 runs on the current
    weights at every report (``vlforge.evaluation.validation.RetrievalValidator``); its figures
    join the reported metrics and the MLflow run. ``callbacks``: Ray Train callbacks for the run
    (a sweep passes ``TuneReportCallback()``)."""
    validate(cfg)
    cfg = resolve(cfg)
    if cfg.corpus is not None:
        ensure_corpus(cfg.corpus)
    if cfg.keep_checkpoints < 0:
        raise ConfigError("keep_checkpoints must be >= 0 (0 = keep all)")
    check_data([(f"stage {s.name}", s.data or cfg.data) for s in cfg.stages])
    check_existing_run(cfg)
    prepare_local_mlflow(cfg.tracking)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if init_ray:
        start_ray(num_train_workers=cfg.num_workers, worker_cpus=cfg.worker_cpus)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints progress lines instead
    datasets, streams, counters = {}, {}, Counters.create()
    for si, s in enumerate(cfg.stages):
        data = s.data or cfg.data
        if data.order == "deterministic":
            streams[s.name] = EpochStream.create(data, counters, salt=si)
        else:
            datasets[s.name], counters = build_dataset(data, train=True, counters=counters)
    run_dir = Path(cfg.storage_path) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cfg.worker_cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "args": WorkerArgs(
                to_dict(cfg),
                cfg.name,
                counters=counters.handle,
                streams=streams,
                progress_file=str(run_dir / "progress_step"),
                stage_dir=str(run_dir / "stages"),
                probe_file=str(run_dir / "probe_outputs.pt") if cfg.debug.probe_outputs else None,
                validator=validator,
            )
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets=datasets,
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
            callbacks=list(callbacks or []),
        ),
    )
    first = cfg.stages[0].data or cfg.data
    data_cpus = ray.cluster_resources().get("CPU", 0) - cfg.num_workers * cfg.worker_cpus
    warm_decode_workers(first, slots=max(1, min(4, int(data_cpus // max(first.decode_cpus, 0.01)))))
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    ckpt_path = result.checkpoint.path if result.checkpoint is not None else None
    state: dict[str, Any] = {}
    export_dir = None
    if ckpt_path and os.path.exists(ckpt_path):
        state = read_state(ckpt_path)
        if cfg.export:
            export_dir = str(export_checkpoint(ckpt_path, run_dir / "export", cfg))
    (run_dir / SUMMARY_FILE).write_text(json.dumps({"checkpoint": ckpt_path, "export": export_dir, "seconds": seconds}))
    return TrainResult(cfg.name, seconds, ckpt_path, export_dir, state, dict(result.metrics or {}))


def _loop(config: dict[str, Any]) -> None:
    train_fn_per_worker(config)


def job_main(doc: str, default_config: str, argv=None) -> int:
    """The body of a training job script: ``--config`` / ``--set``, run, print the summary."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=default_config, help="TrainRunConfig YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = p.parse_args(argv)
    try:
        cfg = load(TrainRunConfig, args.config, args.set)
        validate(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_training(cfg)
    print(result.summary())
    return 0
