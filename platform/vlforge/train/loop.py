"""The Ray Train worker loop shared by every method: ``train_fn_per_worker(config)``.

Started by ``vlforge.train.runner.run_training`` (never called directly). Each
worker rebuilds the typed ``TrainRunConfig`` from ``config["cfg"]`` and runs
the stages in order. Per stage it builds the task (``vlforge.train.tasks``),
loads its starting weights, marks the trainable parameters, wraps it in a
DeepSpeed engine (``vlforge.train.engine``) and runs ``stage.steps`` optimizer
steps over its Ray Data shard (``get_dataset_shard(stage.name)``), epoch after
epoch, ``iter_torch_batches(drop_last=True)``.

Every step all ranks agree that each still has a batch (one tiny all-reduce),
so an uneven shard can never leave one rank waiting in a DeepSpeed collective.

Checkpoints (every ``checkpoint_every`` steps and at each stage end) go through
``ray.train.report(metrics, checkpoint=...)`` from every rank. On (re)start the
loop reads ``ray.train.get_checkpoint()``: inside a stage it restores module,
optimizer and schedule and skips the batches that stage already consumed in
the current epoch (the same number of batches; Ray Data's streaming split does
not promise the same samples in the same order, so it is a count-exact, not a
sample-exact, resume); at a stage boundary it hands the module weights on.
A checkpoint from another worker count resumes only from its DeepSpeed
universal conversion (``ds_universal/``, made by the driver when
``deepspeed.universal_resume`` is set); each rank then skips the consumed
batches rescaled to the new worker count.

Rank 0 logs to MLflow (``vlforge.tracking``) and prints progress lines.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

import torch

from vlforge.config import StageConfig, TrainRunConfig, from_dict
from vlforge.data.pipeline import finish_pixels
from vlforge.tracking.logging import print0, say


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
    from vlforge.train.engine import fit_shapes

    if hasattr(model, "encoder") and not any(k.startswith("encoder.") for k in weights):
        own = model.state_dict()
        weights = fit_shapes({f"encoder.{k}": v for k, v in weights.items() if f"encoder.{k}" in own}, model)
        if not weights:
            raise ValueError(f"{what}: no weight matches the model's encoder")
        missing = model.load_state_dict(weights, strict=False).missing_keys
        if rank == 0:
            heads = sorted({".".join(k.split(".")[:2]) for k in missing if not k.startswith("encoder.")})
            say(f"init {what}: encoder weights loaded ({len(weights)} tensors); starting fresh: "
                f"{', '.join(heads) or '-'} ({len(missing)} tensors)")
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


def _validate(validator, cfg: TrainRunConfig, weights: dict[str, torch.Tensor], device) -> dict[str, float]:
    """``validator(model)`` on a copy of the current weights (whole, also under ZeRO-3), in fp32."""
    from vlforge.train.engine import fit_shapes
    from vlforge.train.tasks import create

    model = create(cfg)
    model.load_state_dict(fit_shapes({k: v.float() for k, v in weights.items()}, model), strict=True)
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
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


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
            fh.write(json.dumps({"stage": stage, "epoch": epoch, "global_step": global_step, "attempt": attempt,
                                 "ids": [int(i) for i in ids.tolist()]}) + "\n")


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
            print0(f"[{self.stage.name}] step {step}/{self.stage.steps} loss {loss:.4f} "
                   f"{self.rate:.1f} samples/s ETA {eta:.0f}s")


def train_fn_per_worker(config: dict[str, Any]) -> None:
    from vlforge.train.engine import prepare_env

    cfg = from_dict(TrainRunConfig, config["cfg"])
    prepare_env(cfg.use_gpu)
    import warnings

    # DeepSpeed's ZeRO collectives call a torch API deprecated in torch 2.13, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

    import ray.train
    import torch.distributed as dist

    from vlforge.models.trainable import set_trainable
    from vlforge.tracking import ConfigChangedError, make_tracker
    from vlforge.train import checkpoint as ckpt_io
    from vlforge.train.engine import build_engine, fit_shapes, full_state_dict, resolve_precision
    from vlforge.train.tasks import build_task, create, task_prefix

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(ctx.get_local_rank()))
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR is set)

    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    bf16 = resolve_precision(cfg.deepspeed, cfg.use_gpu) == "bf16"
    run_name = config["run_name"]
    counters = config.get("counters")
    validator = config.get("validator")
    streams = config.get("streams") or {}
    sample_log = SampleLog(cfg.debug.sample_log, rank)

    tracker = make_tracker(cfg.tracking, rank)
    tracker.start(run_name)
    try:
        tracker.log_config(cfg)
    except ConfigChangedError as exc:
        say(f"WARNING: run {run_name} resumes with a changed config; MLflow keeps the first values: {exc}")
        tracker.set_tags({"vlforge.config_changed_on_resume": "true"})
    nodes: list[str | None] = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0 and world > 1:
        say(f"[{run_name}] {world} workers on {len(set(nodes))} node(s): "
            + ", ".join(f"rank {r} {n[:8]}" for r, n in enumerate(nodes)))
    tracker.log_environment({"cluster_workers": world, "cluster_nodes": len(set(nodes)),
                             "zero_stage": cfg.deepspeed.zero_stage, "precision": "bf16" if bf16 else "fp32"})

    restored = ray.train.get_checkpoint()
    state: dict[str, Any] | None = None
    restored_dir, universal = None, False
    if restored is not None:
        restored_dir, _ = _checkpoint_dir(restored)
        state = ckpt_io.read_state(restored_dir)
        universal = state["world_size"] != world and os.path.isdir(os.path.join(restored_dir, ckpt_io.UNIVERSAL_TAG))
        ckpt_io.check_resumable(state, world, cfg.deepspeed.zero_stage, universal=universal)
        if rank == 0:
            say(f"resuming {run_name} from {restored.path}: stage {state['stage']} step {state['step']}")

    history: dict[str, list] = {k: [list(p) for p in v] for k, v in (state or {}).get("history", {}).items()}
    global_step = state["global_step"] if state else 0
    executed = state.get("executed_steps", global_step) if state else 0
    resumes = list(state.get("resumes", [])) if state else []
    data_wait: dict[str, list[float]] = {k: list(v) for k, v in (state or {}).get("data_wait", {}).items()}
    start_index, mid_stage = 0, False
    if state is not None:
        start_index = state["stage_index"]
        mid_stage = state["step"] < cfg.stages[start_index].steps
        if not mid_stage:
            start_index += 1
    handoff: dict[str, torch.Tensor] | None = None
    micro_batch = None
    prefix = task_prefix(cfg.method)
    referenced = {s.init_stage for s in cfg.stages if s.init_stage}

    for si in range(start_index, len(cfg.stages)):
        stage = cfg.stages[si]
        data_cfg = stage.data or cfg.data
        micro_batch = data_cfg.batch_size
        resume_here = mid_stage and si == start_index
        torch.manual_seed(cfg.seed + si)  # same initial weights on every rank
        model = create(cfg)
        if not resume_here:
            weights = None
            if stage.init == "previous" and si > 0:
                weights = handoff if handoff is not None else ckpt_io.module_weights(restored_dir, prefix)
            elif stage.init_stage:
                weights = ckpt_io.module_weights(os.path.join(config["stage_dir"], stage.init_stage))
            elif stage.init not in ("previous", "fresh"):
                weights = ckpt_io.module_weights(stage.init)
            if weights is not None:
                load_init(model, weights, rank, f"{stage.name} from {stage.init}")
        handoff = None
        task = build_task(cfg, stage, model, gather=world > 1)
        set_trainable(task.model, stage.trainable)
        task.module.to(device)
        from_universal = resume_here and universal
        engine = build_engine(task.module, stage, cfg.deepspeed, micro_batch=micro_batch, world_size=world,
                              on_gpu=cfg.use_gpu,
                              extra={"checkpoint": {"load_universal": True}} if from_universal else None)
        step, epoch, skip = 0, 0, 0
        stream_check = None
        if resume_here:
            loaded = ckpt_io.load(engine, restored_dir, universal=from_universal)
            step, epoch, skip = loaded["step"], loaded["epoch"], loaded["batches_in_epoch"]
            if from_universal:
                # Batches per epoch change with the worker count: rescale what each rank skips.
                skip = skip * state["world_size"] // world
            elif stage.name in streams:
                stream_check = state.get("stream_last_ids")
            digest = _weights_digest(full_state_dict(engine, cfg.deepspeed.zero_stage))
            reached = _read_progress(config.get("progress_file"))
            resumes.append({"stage": stage.name, "step": step, "global_step": global_step,
                            "workers": f"{state['world_size']}->{world}",
                            "weights_match": digest == loaded.get("weights_digest"),
                            "lost_steps": max(0, reached - global_step) if reached is not None else None})
            executed += resumes[-1]["lost_steps"] or 0
            if rank == 0:
                say(f"[{stage.name}] restored step {step}: weights digest "
                    f"{'matches' if resumes[-1]['weights_match'] else 'DIFFERS from'} the saved one; "
                    f"{resumes[-1]['lost_steps']} steps are redone")
        engine.train()

        def save(batches_in_epoch: int) -> None:
            sd = full_state_dict(engine, cfg.deepspeed.zero_stage)
            st = {"stage_index": si, "stage": stage.name, "step": step, "epoch": epoch,
                  "batches_in_epoch": batches_in_epoch, "global_step": global_step, "world_size": world,
                  "zero_stage": cfg.deepspeed.zero_stage, "history": history, "executed_steps": executed,
                  "resumes": resumes, "weights_digest": _weights_digest(sd), "data_wait": data_wait,
                  "stream": "deterministic" if stream is not None else "streaming",
                  "stream_last_ids": _gather(last_id, world)}
            metrics = {"stage": stage.name, "step": step, "global_step": global_step,
                       "loss": history[f"{stage.name}/loss"][-1][1] if history.get(f"{stage.name}/loss") else None,
                       "final_report": si == len(cfg.stages) - 1 and step == stage.steps}
            if validator is not None and rank == 0:
                metrics.update(_validate(validator, cfg, ckpt_io.strip_prefix(sd, task.prefix), device))
                tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, global_step)
            with tempfile.TemporaryDirectory(prefix="vlforge-ckpt-") as tmp:
                ckpt_io.save(engine, tmp, st, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            if counters is not None and rank == 0:
                from vlforge.data.pipeline import Counters

                tracker.log_counters(Counters(counters).snapshot(), global_step)

        stream = streams.get(stage.name)
        shard = ray.train.get_dataset_shard(stage.name) if stream is None else None
        accum = cfg.deepspeed.grad_accum
        progress = _Progress(stage, step, cfg.progress_every, micro_batch * accum * world, rank)
        micro, sums = 0, {}
        last_id: int | None = None
        wait = data_wait.setdefault(stage.name, [0.0, 0.0])  # [seconds waiting for data, seconds of steps]
        while step < stage.steps:
            if stream is not None:
                batches = stream.batches(epoch, rank, world, micro_batch, device)
            else:
                batches = iter(shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, device=device))
            consumed = 0
            for _ in range(skip):
                batch = next(batches, None)
                if batch is None:
                    break
                consumed += 1
                last_id = int(batch["sample_id"][-1])
            skip = 0
            if stream_check is not None:
                match = _gather(last_id, world) == stream_check
                resumes[-1]["stream_match"] = match
                if rank == 0:
                    say(f"[{stage.name}] stream position restored: epoch {epoch}, {consumed} batches per rank "
                        f"skipped; the last skipped samples {'match' if match else 'DIFFER from'} the saved ones")
                stream_check = None
            t_step = time.perf_counter()
            while step < stage.steps:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                wait[0] += time.perf_counter() - t_wait
                if not _all_true(batch is not None):
                    break
                consumed += 1
                last_id = int(batch["sample_id"][-1])
                sample_log.write(stage.name, epoch, global_step + 1, len(resumes), batch["sample_id"])
                batch = finish_pixels(batch, data_cfg.image)
                if bf16:
                    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
                torch.manual_seed(cfg.seed * 1_000_003 + global_step * 1009 + micro * 31 + rank)
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                for k, v in out.items():
                    if torch.is_tensor(v) and v.numel() == 1 and v.is_floating_point():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
                micro += 1
                if micro % accum:
                    continue
                step += 1
                global_step += 1
                executed += 1
                now = time.perf_counter()
                wait[1] += now - t_step
                t_step = now
                if rank == 0:
                    _write_progress(config.get("progress_file"), global_step)
                metrics = _mean_across(sums)
                sums = {}
                history.setdefault(f"{stage.name}/loss", []).append([global_step, metrics["loss"]])
                progress.update(step, metrics["loss"])
                lr = engine.get_lr()[0] if engine.get_lr() else 0.0
                tracker.log_metrics({**{f"{stage.name}/{k}": v for k, v in metrics.items()}, "lr": lr,
                                     "samples_per_s": progress.rate, "stage_index": si,
                                     "data_wait_frac": wait[0] / max(wait[1], 1e-9)}, global_step)
                last = step == stage.steps
                if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save(consumed)
                _maybe_fail(cfg, rank, global_step)
            epoch += 1
        handoff = ckpt_io.strip_prefix(full_state_dict(engine, cfg.deepspeed.zero_stage), task.prefix)
        if rank == 0 and config.get("stage_dir") and (cfg.stage_exports or stage.name in referenced):
            from vlforge.models.io import save_model_dir
            from vlforge.train.tasks import model_spec

            save_model_dir(fit_shapes(handoff, task.model), model_spec(cfg),
                           os.path.join(config["stage_dir"], stage.name), {"stage": stage.name})
        if config.get("probe_file") and si == len(cfg.stages) - 1:
            _save_probe(engine, task, config["probe_file"], rank, device)
        tracker.log_loss_curve(history)
        engine = None  # frees the engine before the next stage builds its own
        dist.barrier()

    delivery = tracker.end("FINISHED")
    if rank == 0 and cfg.tracking.enabled:
        say(f"[{run_name}] MLflow: {delivery.summary()}")
