"""The Ray Train worker loop shared by every method: ``Trainer(WorkerArgs).train()``.

Started by ``vlforge.train.runner.run_training`` through ``train_fn_per_worker`` (never called
directly). Each worker rebuilds the typed ``TrainRunConfig`` from ``WorkerArgs.cfg`` and runs the
stages in order. Per stage (``Trainer._start_stage``) it builds the task (``vlforge.tasks``),
loads its starting weights, marks the trainable parameters and wraps it in a DeepSpeed engine
(``vlforge.train.engine``); ``_train_stage`` then runs ``stage.steps`` optimizer steps
(``train_step`` per micro-batch, ``_after_step`` per optimizer step), epoch after epoch, over the
stage's data: the deterministic ``EpochStream`` (``vlforge.data.stream``, the default) or Ray
Train's dataset shard (``data.order: streaming``), ``drop_last`` either way.

Every step all ranks agree that each still has a batch (one tiny all-reduce), so an uneven
shard can never leave one rank waiting in a DeepSpeed collective.

Checkpoints (every ``checkpoint_every`` steps and at each stage end, ``Trainer.save``) go through
``ray.train.report(metrics, checkpoint=...)`` from every rank; their state file is a
``LoopState``. On (re)start the loop reads ``ray.train.get_checkpoint()``: inside a stage it
restores module, optimizer and schedule and skips the batches that stage already consumed in
the current epoch. With the deterministic stream those are the same samples (sample-exact; the
last skipped ids are checked against the saved ones and recorded as ``stream_match``); with
Ray Train's streaming split only the same number (count-exact). At a stage boundary it hands
the module weights on. A checkpoint from another worker count resumes only from its DeepSpeed
universal conversion (``ds_universal/``, made by the driver when ``deepspeed.universal_resume``
is set); each rank then skips the consumed batches rescaled to the new worker count.

Rank 0 logs to MLflow (``vlforge.tracking``) and prints progress lines. Each step logs
``data_wait_frac``: the share of the stage's step time spent waiting for the next batch.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from vlforge.config import StageConfig, TrainRunConfig, from_dict
from vlforge.data.pipeline import Counters, finish_pixels
from vlforge.data.stream import Prefetched
from vlforge.models.io import save_model_dir
from vlforge.models.trainable import set_trainable
from vlforge.tasks import build_task, create, model_spec, task_prefix
from vlforge.tracking import ConfigChangedError, make_tracker
from vlforge.tracking.logging import print0, say
from vlforge.train import checkpoint as ckpt_io
from vlforge.train.engine import build_engine, fit_shapes, full_state_dict, prepare_env, resolve_precision


def _weights_digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _checkpoint_dir(ckpt) -> tuple[str, bool]:
    """A local directory holding ``ckpt`` and whether it is a temporary download."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return ckpt.path, False
    return ckpt.to_directory(), True


def _all_true(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _mean_across(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def load_init(model: torch.nn.Module, weights: dict[str, torch.Tensor], rank: int = 0, what: str = "") -> None:
    """Load a stage's starting weights. Weights of the model itself load strictly; a VLMo's weights
    load into the ``encoder`` of a fusion/distill model, whose heads (and, for a dual-encoder
    student, the teacher's VL experts it does not have) are reported and left as initialised."""
    if hasattr(model, "encoder") and not any(k.startswith("encoder.") for k in weights):
        own = model.state_dict()
        weights = fit_shapes({f"encoder.{k}": v for k, v in weights.items() if f"encoder.{k}" in own}, model)
        if not weights:
            raise ValueError(f"{what}: no weight matches the model's encoder")
        missing = model.load_state_dict(weights, strict=False).missing_keys
        if rank == 0:
            heads = sorted({".".join(k.split(".")[:2]) for k in missing if not k.startswith("encoder.")})
            say(
                f"init {what}: encoder weights loaded ({len(weights)} tensors); starting fresh: "
                f"{', '.join(heads) or '-'} ({len(missing)} tensors)"
            )
        return
    model.load_state_dict(fit_shapes(weights, model), strict=True)


def _maybe_fail(cfg: TrainRunConfig, rank: int, global_step: int) -> None:
    f = cfg.debug
    if f.fail_at_step is None or global_step != f.fail_at_step or rank != f.fail_rank:
        return
    marker = f.fail_marker
    if marker and os.path.exists(marker):
        return
    if marker:
        with open(marker, "w") as fh:
            fh.write(str(global_step))
    raise RuntimeError(f"injected failure on rank {rank} at global step {global_step} (debug.fail_at_step)")


def load_gathered(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load gathered weights strictly, except for the other names of tied parameters: a gathered copy
    holds a tied tensor once (BART's ``embed_tokens`` and ``lm_head`` share ``shared``)."""
    result = model.load_state_dict(weights, strict=False)
    names: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    tied = {n for group in names.values() if len(group) > 1 and group & set(weights) for n in group}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _validate(validator, cfg: TrainRunConfig, weights: dict[str, torch.Tensor], device) -> dict[str, float]:
    """``validator(model)`` on a copy of the current weights (whole, also under ZeRO-3), in fp32."""
    model = create(cfg)
    load_gathered(model, fit_shapes({k: v.float() for k, v in weights.items()}, model))
    out = validator(model.to(device))
    del model
    return out


def _read_progress(path: str | None) -> int | None:
    try:
        return int(open(path).read()) if path else None
    except (OSError, ValueError):
        return None


def _write_progress(path: str | None, global_step: int) -> None:
    """The last global step rank 0 finished (shared storage only; tells a resume how many steps it redoes)."""
    if path:
        try:
            with open(path, "w") as fh:
                fh.write(str(global_step))
        except OSError:
            pass


def probe_batch(model, seed: int = 1234, n: int = 2) -> dict[str, torch.Tensor]:
    """A fixed batch for the model's sizes (same on every call): images and BERT-like ids."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    size = c.img_size if hasattr(c, "img_size") else c.vision.img_size
    length = getattr(c, "max_text_len", 16)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    return {
        "pixel_values": torch.randn(n, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


def probe_outputs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What export tests compare: VLMo's fusion hidden states, or Frozen's logits."""
    with torch.no_grad():
        if hasattr(model, "forward_fusion"):
            return model.forward_fusion(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).hidden
        tokens = model.tokenize(["a probe caption", "another one"][: batch["pixel_values"].shape[0]])
        return model.compute_logits(batch["pixel_values"], tokens["input_ids"], tokens["attention_mask"])


def _save_probe(engine, task, path: str, rank: int, device) -> None:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        was = task.model.training
        task.model.eval()
        batch = {k: v.to(device) for k, v in probe_batch(task.model).items()}
        out = probe_outputs(task.model, batch).float().cpu()
        task.model.train(was)
    if rank == 0:
        torch.save(out, path)


def _gather(value: Any, world: int) -> list:
    """``value`` from every rank, in rank order (collective: every rank calls it at the same point)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


class SampleLog:
    """``debug.sample_log``: one JSON line per micro-batch a rank trains on (no-op when unset)."""

    def __init__(self, directory: str | None, rank: int):
        self.path = os.path.join(directory, f"rank{rank}.jsonl") if directory else None
        if self.path:
            os.makedirs(directory, exist_ok=True)

    def write(self, stage: str, epoch: int, global_step: int, attempt: int, ids: torch.Tensor) -> None:
        if self.path is None:
            return
        import json

        with open(self.path, "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "stage": stage,
                        "epoch": epoch,
                        "global_step": global_step,
                        "attempt": attempt,
                        "ids": [int(i) for i in ids.tolist()],
                    }
                )
                + "\n"
            )


class _Progress:
    def __init__(self, stage: StageConfig, start_step: int, every: int, samples_per_step: int, rank: int):
        self.stage, self.every, self.sps, self.rank = stage, every, samples_per_step, rank
        self.t0, self.step0 = time.perf_counter(), start_step
        self.rate = 0.0

    def update(self, step: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.t0
        done = step - self.step0
        self.rate = done * self.sps / max(elapsed, 1e-9)
        if self.rank == 0 and self.every and (step % self.every == 0 or step == self.stage.steps):
            eta = (self.stage.steps - step) * elapsed / max(done, 1)
            print0(
                f"[{self.stage.name}] step {step}/{self.stage.steps} loss {loss:.4f} "
                f"{self.rate:.1f} samples/s ETA {eta:.0f}s"
            )


@dataclass
class WorkerArgs:
    """What the driver (``runner.run_training``) hands every worker, as ``train_loop_config["args"]``."""

    cfg: dict[str, Any]  # the TrainRunConfig as a dict (``config.to_dict``)
    run_name: str
    counters: Any = None  # the DataCounters actor handle
    streams: dict[str, Any] = field(default_factory=dict)  # stage name -> EpochStream (data.order: deterministic)
    progress_file: str | None = None  # rank 0 writes the last finished global step here
    stage_dir: str | None = None  # stage exports: <stage_dir>/<stage>/
    probe_file: str | None = None  # debug.probe_outputs: the final engine's outputs on a fixed batch
    validator: Any = None  # model -> {"val_...": value}, run by rank 0 at every report


@dataclass
class LoopState:
    """Where a run stands: exactly what a checkpoint's state file holds (``checkpoint.save``)."""

    stage_index: int = 0
    stage: str = ""
    step: int = 0  # optimizer steps done in this stage
    epoch: int = 0  # epochs of this stage's data started
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    global_step: int = 0
    world_size: int = 1
    zero_stage: int = 0
    history: dict[str, list] = field(default_factory=dict)  # "<stage>/loss" -> [[global_step, loss], ...]
    executed_steps: int = 0  # steps run, redone ones included
    resumes: list[dict[str, Any]] = field(default_factory=list)
    weights_digest: str = ""
    data_wait: dict[str, list[float]] = field(default_factory=dict)  # stage -> [s waiting for data, s of steps]
    stream: str = "deterministic"
    stream_last_ids: list[int | None] | None = None  # per rank, the last sample id consumed

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopState:
        """A saved state; keys older checkpoints lack take their defaults (``executed_steps``: the global step)."""
        known = {f.name for f in fields(cls)}
        st = cls(**{k: v for k, v in raw.items() if k in known})
        if "executed_steps" not in raw:
            st.executed_steps = st.global_step
        st.history = {k: [list(p) for p in v] for k, v in st.history.items()}
        st.data_wait = {k: list(v) for k, v in st.data_wait.items()}
        st.resumes = list(st.resumes)
        return st

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _step_seed(seed: int, global_step: int, micro: int, rank: int) -> int:
    """The torch seed of one micro-batch: its own reproducible stream of masks, dropout and hard negatives
    per (run seed, step, micro-batch, rank), so a step redone after a resume draws what it drew before."""
    return seed * 1_000_003 + global_step * 1009 + micro * 31 + rank


@dataclass
class _Stage:
    """One stage's live objects and counters while it trains."""

    index: int
    cfg: StageConfig
    engine: Any
    task: Any
    stream: Any  # EpochStream, or None (Ray Train's dataset shard)
    shard: Any
    step: int = 0
    epoch: int = 0
    skip: int = 0  # batches to skip at the start of the current epoch (a resume)
    consumed: int = 0  # batches consumed in the current epoch
    last_id: int | None = None
    stream_check: list | None = None  # the saved last ids a resume compares its skipped batches with
    resumed: bool = False  # the first epoch after a resume: record how many batches it skipped
    micro: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    early: Any = None  # epoch 0's batches, started before the engine was built (a fresh stage's stream)


class Trainer:
    """One worker's run: ``Trainer(args).train()`` (called by ``train_fn_per_worker``)."""

    def __init__(self, args: WorkerArgs):
        import ray.train

        self.args = args
        self.cfg = cfg = from_dict(TrainRunConfig, args.cfg)
        prepare_env(cfg.use_gpu)
        import warnings

        # DeepSpeed's ZeRO collectives call a torch API deprecated in torch 2.13, once per step.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK=str(ctx.get_local_rank()))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
        self.bf16 = resolve_precision(cfg.deepspeed, cfg.use_gpu) == "bf16"
        self.sample_log = SampleLog(cfg.debug.sample_log, self.rank)
        self.state = LoopState(world_size=self.world, zero_stage=cfg.deepspeed.zero_stage)
        self.saved: LoopState | None = None  # the checkpoint this attempt starts from
        self.restored_dir: str | None = None
        self.universal = False
        self.handoff: dict[str, torch.Tensor] | None = None
        self.early: dict[int, Prefetched] = {}  # stage index -> its epoch 0, opened ahead of time

    # ------------------------------------------------------------------ run

    def train(self) -> None:
        start, mid_stage = self._restore()
        if not mid_stage:
            # Opened first, so that the data's cold start (README, "Cold starts") overlaps
            # DeepSpeed's import, tracking and the first engine build.
            self._open_first_epoch(start)
        import deepspeed  # noqa: F401  (after prepare_env set DS_ACCELERATOR; its cost overlaps the data's start)

        self._start_tracking()
        for si in range(start, len(self.cfg.stages)):
            st = self._start_stage(si, resume=mid_stage and si == start)
            self._train_stage(st)
            self._finish_stage(st)
        delivery = self.tracker.end("FINISHED")
        if self.rank == 0 and self.cfg.tracking.enabled:
            say(f"[{self.args.run_name}] MLflow: {delivery.summary()}")

    def _start_tracking(self) -> None:
        import ray
        import torch.distributed as dist

        cfg, name = self.cfg, self.args.run_name
        self.tracker = make_tracker(cfg.tracking, self.rank)
        self.tracker.start(name)
        try:
            self.tracker.log_config(cfg)
        except ConfigChangedError as exc:
            say(f"WARNING: run {name} resumes with a changed config; MLflow keeps the first values: {exc}")
            self.tracker.set_tags({"vlforge.config_changed_on_resume": "true"})
        nodes: list[str | None] = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.rank == 0 and self.world > 1:
            say(
                f"[{name}] {self.world} workers on {len(set(nodes))} node(s): "
                + ", ".join(f"rank {r} {n[:8]}" for r, n in enumerate(nodes))
            )
        self.tracker.log_environment(
            {
                "cluster_workers": self.world,
                "cluster_nodes": len(set(nodes)),
                "zero_stage": cfg.deepspeed.zero_stage,
                "precision": "bf16" if self.bf16 else "fp32",
            }
        )

    def _restore(self) -> tuple[int, bool]:
        """Read ``ray.train.get_checkpoint()``; returns (first stage to run, whether it resumes mid-stage)."""
        import ray.train

        restored = ray.train.get_checkpoint()
        if restored is None:
            return 0, False
        self.restored_dir, _ = _checkpoint_dir(restored)
        raw = ckpt_io.read_state(self.restored_dir)
        self.universal = raw["world_size"] != self.world and os.path.isdir(
            os.path.join(self.restored_dir, ckpt_io.UNIVERSAL_TAG)
        )
        ckpt_io.check_resumable(raw, self.world, self.cfg.deepspeed.zero_stage, universal=self.universal)
        if self.rank == 0:
            say(f"resuming {self.args.run_name} from {restored.path}: stage {raw['stage']} step {raw['step']}")
        self.saved = saved = LoopState.from_dict(raw)
        st = self.state
        st.history, st.global_step, st.executed_steps = saved.history, saved.global_step, saved.executed_steps
        st.resumes, st.data_wait = saved.resumes, saved.data_wait
        mid_stage = saved.step < self.cfg.stages[saved.stage_index].steps
        return (saved.stage_index if mid_stage else saved.stage_index + 1), mid_stage

    # ------------------------------------------------------------------ stages

    def _initial_weights(self, si: int, stage: StageConfig) -> dict[str, torch.Tensor] | None:
        if stage.init == "previous" and si > 0:
            if self.handoff is not None:
                return self.handoff
            return ckpt_io.module_weights(self.restored_dir, task_prefix(self.cfg.method))
        if stage.init_stage:
            return ckpt_io.module_weights(os.path.join(self.args.stage_dir, stage.init_stage))
        if stage.init not in ("previous", "fresh"):
            return ckpt_io.module_weights(stage.init)
        return None

    def _open_first_epoch(self, si: int) -> None:
        """Start fetching stage ``si``'s first batch of epoch 0 in the background (``Prefetched``), once,
        so that the stream's cold start overlaps whatever runs before the stage's first step."""
        if si >= len(self.cfg.stages) or si in self.early:
            return
        stage = self.cfg.stages[si]
        stream = self.args.streams.get(stage.name)
        if stream is None:
            return
        micro_batch = (stage.data or self.cfg.data).batch_size
        self.early[si] = Prefetched(stream.batches(0, self.rank, self.world, micro_batch, self.device))

    def _start_stage(self, si: int, resume: bool) -> _Stage:
        import ray.train

        cfg, stage = self.cfg, self.cfg.stages[si]
        stream = self.args.streams.get(stage.name)
        if not resume:
            self._open_first_epoch(si)
        early = self.early.pop(si, None)
        torch.manual_seed(cfg.seed + si)  # same initial weights on every rank
        model = create(cfg)
        if not resume:
            weights = self._initial_weights(si, stage)
            if weights is not None:
                load_init(model, weights, self.rank, f"{stage.name} from {stage.init}")
        self.handoff = None
        task = build_task(cfg, stage, model, gather=self.world > 1)
        set_trainable(task.model, stage.trainable)
        task.module.to(self.device)
        from_universal = resume and self.universal
        engine = build_engine(
            task.module,
            stage,
            cfg.deepspeed,
            micro_batch=(stage.data or cfg.data).batch_size,
            world_size=self.world,
            on_gpu=cfg.use_gpu,
            extra={"checkpoint": {"load_universal": True}} if from_universal else None,
        )
        shard = ray.train.get_dataset_shard(stage.name) if stream is None else None
        st = _Stage(si, stage, engine, task, stream, shard, early=early)
        if resume:
            self._resume_stage(st, from_universal)
        engine.train()
        return st

    def _resume_stage(self, st: _Stage, from_universal: bool) -> None:
        saved = self.saved
        loaded = ckpt_io.load(st.engine, self.restored_dir, universal=from_universal)
        st.step, st.epoch, st.skip = loaded["step"], loaded["epoch"], loaded["batches_in_epoch"]
        st.resumed = True
        if from_universal:
            # Batches per epoch change with the worker count: rescale what each rank skips.
            st.skip = st.skip * saved.world_size // self.world
        elif st.stream is not None:
            st.stream_check = saved.stream_last_ids
        digest = _weights_digest(full_state_dict(st.engine, self.cfg.deepspeed.zero_stage))
        reached = _read_progress(self.args.progress_file)
        gs = self.state.global_step
        record = {
            "stage": st.cfg.name,
            "step": st.step,
            "global_step": gs,
            "workers": f"{saved.world_size}->{self.world}",
            "weights_match": digest == loaded.get("weights_digest"),
            "lost_steps": max(0, reached - gs) if reached is not None else None,
        }
        self.state.resumes.append(record)
        self.state.executed_steps += record["lost_steps"] or 0
        if self.rank == 0:
            say(
                f"[{st.cfg.name}] restored step {st.step}: weights digest "
                f"{'matches' if record['weights_match'] else 'DIFFERS from'} the saved one; "
                f"{record['lost_steps']} steps are redone"
            )

    def _finish_stage(self, st: _Stage) -> None:
        import torch.distributed as dist

        cfg, stage, args = self.cfg, st.cfg, self.args
        self.handoff = ckpt_io.strip_prefix(full_state_dict(st.engine, cfg.deepspeed.zero_stage), st.task.prefix)
        referenced = {s.init_stage for s in cfg.stages if s.init_stage}
        if self.rank == 0 and args.stage_dir and (cfg.stage_exports or stage.name in referenced):
            save_model_dir(
                fit_shapes(self.handoff, st.task.model),
                model_spec(cfg),
                os.path.join(args.stage_dir, stage.name),
                {"stage": stage.name},
            )
        if args.probe_file and st.index == len(cfg.stages) - 1:
            _save_probe(st.engine, st.task, args.probe_file, self.rank, self.device)
        self.tracker.log_loss_curve(self.state.history)
        st.engine = None  # frees the engine before the next stage builds its own
        dist.barrier()

    # ------------------------------------------------------------------ steps

    def _epoch(self, st: _Stage):
        """The current epoch's batches, the ones a resume already consumed skipped."""
        micro_batch = (st.cfg.data or self.cfg.data).batch_size
        if st.early is not None:
            batches, st.early = st.early, None
        elif st.stream is not None:
            batches = st.stream.batches(st.epoch, self.rank, self.world, micro_batch, self.device)
        else:
            batches = iter(st.shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, device=self.device))
        st.consumed = 0
        for _ in range(st.skip):
            batch = next(batches, None)
            if batch is None:
                break
            st.consumed += 1
            st.last_id = int(batch["sample_id"][-1])
        st.skip = 0
        if st.resumed:
            self.state.resumes[-1]["skipped_batches"] = st.consumed  # per rank
            st.resumed = False
        if st.stream_check is not None:
            match = _gather(st.last_id, self.world) == st.stream_check
            self.state.resumes[-1]["stream_match"] = match
            if self.rank == 0:
                say(
                    f"[{st.cfg.name}] stream position restored: epoch {st.epoch}, {st.consumed} batches per rank "
                    f"skipped; the last skipped samples {'match' if match else 'DIFFER from'} the saved ones"
                )
            st.stream_check = None
        return batches

    def _train_stage(self, st: _Stage) -> None:
        cfg = self.cfg
        data_cfg = st.cfg.data or cfg.data
        accum = cfg.deepspeed.grad_accum
        progress = _Progress(st.cfg, st.step, cfg.progress_every, data_cfg.batch_size * accum * self.world, self.rank)
        wait = self.state.data_wait.setdefault(st.cfg.name, [0.0, 0.0])
        while st.step < st.cfg.steps:
            batches = self._epoch(st)
            t_step = time.perf_counter()
            while st.step < st.cfg.steps:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                wait[0] += time.perf_counter() - t_wait
                if not _all_true(batch is not None):
                    break
                self.train_step(st, batch)
                if st.micro % accum:
                    continue
                now = time.perf_counter()
                wait[1] += now - t_step
                t_step = now
                self._after_step(st, progress, wait)
            st.epoch += 1

    def train_step(self, st: _Stage, batch: dict[str, torch.Tensor]) -> None:
        """Forward, backward and (at a gradient-accumulation boundary) the optimizer on one micro-batch."""
        cfg = self.cfg
        st.consumed += 1
        st.last_id = int(batch["sample_id"][-1])
        self.sample_log.write(
            st.cfg.name, st.epoch, self.state.global_step + 1, len(self.state.resumes), batch["sample_id"]
        )
        batch = finish_pixels(batch, (st.cfg.data or cfg.data).image)
        if self.bf16:
            batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
        torch.manual_seed(_step_seed(cfg.seed, self.state.global_step, st.micro, self.rank))
        out = st.engine(batch)
        st.engine.backward(out["loss"])
        st.engine.step()
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1 and v.is_floating_point():
                st.sums[k] = st.sums.get(k, 0.0) + float(v.detach()) / cfg.deepspeed.grad_accum
        st.micro += 1

    def _after_step(self, st: _Stage, progress: _Progress, wait: list[float]) -> None:
        """Count an optimizer step, log it, and checkpoint when it is due."""
        cfg, state, name = self.cfg, self.state, st.cfg.name
        st.step += 1
        state.global_step += 1
        state.executed_steps += 1
        if self.rank == 0:
            _write_progress(self.args.progress_file, state.global_step)
        metrics = _mean_across(st.sums)
        st.sums = {}
        state.history.setdefault(f"{name}/loss", []).append([state.global_step, metrics["loss"]])
        progress.update(st.step, metrics["loss"])
        lr = st.engine.get_lr()[0] if st.engine.get_lr() else 0.0
        self.tracker.log_metrics(
            {
                **{f"{name}/{k}": v for k, v in metrics.items()},
                "lr": lr,
                "samples_per_s": progress.rate,
                "stage_index": st.index,
                "data_wait_frac": wait[0] / max(wait[1], 1e-9),
            },
            state.global_step,
        )
        if st.step == st.cfg.steps or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0):
            self.save(st)
        _maybe_fail(cfg, self.rank, state.global_step)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, st: _Stage, weights_digest: str) -> dict[str, Any]:
        """The state file of a checkpoint taken now (collective: gathers every rank's stream position)."""
        s = self.state
        s.stage_index, s.stage, s.step, s.epoch, s.batches_in_epoch = (
            st.index,
            st.cfg.name,
            st.step,
            st.epoch,
            st.consumed,
        )
        s.weights_digest = weights_digest
        s.stream = "deterministic" if st.stream is not None else "streaming"
        s.stream_last_ids = _gather(st.last_id, self.world)
        return s.to_dict()

    def save(self, st: _Stage) -> None:
        """Checkpoint every rank's DeepSpeed shard through ``ray.train.report`` (validation on rank 0 first)."""
        import ray.train

        cfg, stage, gs = self.cfg, st.cfg, self.state.global_step
        sd = full_state_dict(st.engine, cfg.deepspeed.zero_stage)
        state = self.state_dict(st, _weights_digest(sd))
        losses = self.state.history.get(f"{stage.name}/loss")
        metrics = {
            "stage": stage.name,
            "step": st.step,
            "global_step": gs,
            "loss": losses[-1][1] if losses else None,
            "final_report": st.index == len(cfg.stages) - 1 and st.step == stage.steps,
        }
        if self.args.validator is not None and self.rank == 0:
            metrics.update(_validate(self.args.validator, cfg, ckpt_io.strip_prefix(sd, st.task.prefix), self.device))
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, gs)
        with tempfile.TemporaryDirectory(prefix="vlforge-ckpt-") as tmp:
            ckpt_io.save(st.engine, tmp, state, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.args.counters is not None and self.rank == 0:
            self.tracker.log_counters(Counters(self.args.counters).snapshot(), gs)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``config["args"]`` is the driver's ``WorkerArgs``."""
    Trainer(config["args"]).train()
