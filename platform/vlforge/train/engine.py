"""DeepSpeed engine for one stage: JSON config from the typed config, torch optimizer and schedule.

    ds = deepspeed_config(cfg.deepspeed, micro_batch=cfg.data.batch_size, world_size=2, clip=..., on_gpu=False)
    engine = build_engine(task.module, stage, cfg.deepspeed, micro_batch, world_size, on_gpu)

The optimizer is a torch optimizer over the trainable parameters only
(``vlforge.models.trainable.param_groups``), passed to ``deepspeed.initialize``
as an object: naming an Adam optimizer in the DeepSpeed config would compile
``fused_adam`` (about 55 s on CPU). With ``offload_optimizer`` DeepSpeed's
``DeepSpeedCPUAdam`` is used instead (it compiles ``cpu_adam`` once). The
schedule is a torch scheduler (``LinearLR`` warm-up, then cosine / linear /
constant) that the engine steps once per optimizer step and saves in its
checkpoints. ``DeepSpeedConfig.overrides`` is merged last, recursively.

DeepSpeed is imported only inside functions: the driver never needs it.
C++ ops compile once per machine into ``extensions_dir()``; to do it ahead of any run::

    python -m vlforge.train.engine prebuild [--cpu-adam]
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlforge.config import DeepSpeedConfig, OptimizerConfig, ScheduleConfig, StageConfig
from vlforge.models.trainable import param_groups
from vlforge.runtime import tune_malloc


def extensions_dir() -> str:
    """Where DeepSpeed's C++ ops compile to once per machine (``VLFORGE_TORCH_EXTENSIONS_DIR``
    or ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/vlforge/torch_extensions``)."""
    return (
        os.environ.get("VLFORGE_TORCH_EXTENSIONS_DIR")
        or os.environ.get("TORCH_EXTENSIONS_DIR")
        or str(Path.home() / ".cache" / "vlforge" / "torch_extensions")
    )


STALE_LOCK_S = 300  # an op builds in under a minute on 2 cores


def clear_stale_locks(root: str, max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove op-build ``lock`` files under ``root`` older than ``max_age_s``; returns their paths.

    torch's extension builder holds ``<op>/lock`` while it compiles and every other process waits,
    without a timeout, until the file goes. A process killed mid-build leaves it behind, and every
    later run then hangs before its first step. A lock this old belongs to no live build."""
    import time

    removed = []
    for lock in Path(root).glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink(missing_ok=True)
                removed.append(str(lock))
        except OSError:
            continue
    return removed


def ninja_first_on_path() -> str | None:
    """Put the interpreter's own ``bin`` first on ``PATH`` when it holds ``ninja`` (DeepSpeed installs the
    ``ninja`` wheel); returns that directory, or None when there is no ninja beside the interpreter.

    torch's extension builder runs whichever ``ninja`` ``PATH`` finds. A machine with a system ninja
    (Debian's 1.11) next to the wheel's (1.13) then gets both: a driver started as ``.venv/bin/python``
    finds the system one, a ``ray start`` from an activated venv the other. Their build logs hash
    commands differently, so each switch recompiles ``shm_comm`` from scratch (about 35 s on 2 cores,
    while every other worker waits on the build lock). One ninja for every process builds it once."""
    bindir = os.path.dirname(sys.executable)
    if not os.access(os.path.join(bindir, "ninja"), os.X_OK):
        return None
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in path.split(os.pathsep) if p and p != bindir)])
    return bindir


def prepare_env(on_gpu: bool) -> None:
    """Environment DeepSpeed reads at import: the CPU accelerator without a GPU, the op cache and the
    ninja that builds into it (``ninja_first_on_path``); and the allocator setting every CPU training
    process wants (``vlforge.runtime.tune_malloc``)."""
    tune_malloc()
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    ninja_first_on_path()
    os.environ.setdefault("DS_BUILD_OPS", "0")
    for lock in clear_stale_locks(os.environ["TORCH_EXTENSIONS_DIR"]):
        print(f"removed a stale op-build lock left by a killed process: {lock}", flush=True)


def merge(base: dict, extra: Mapping) -> dict:
    """Recursive dict merge; values in ``extra`` win."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_precision(cfg: DeepSpeedConfig, on_gpu: bool) -> str:
    return ("bf16" if on_gpu else "fp32") if cfg.precision == "auto" else cfg.precision


def deepspeed_config(cfg: DeepSpeedConfig, *, micro_batch: int, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config (a dict) for ``cfg``; ``cfg.overrides`` merged last."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg, on_gpu) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.clip_grad > 0:
        ds["gradient_clipping"] = cfg.clip_grad
    return merge(ds, cfg.overrides)


def make_optimizer(params: list[dict], cfg: OptimizerConfig, offload: bool) -> torch.optim.Optimizer:
    """A torch optimizer (or DeepSpeedCPUAdam when the optimizer state is offloaded)."""
    groups = [g for g in params if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters")
    if offload:
        if cfg.name == "sgd":
            raise ValueError("offload_optimizer supports adam/adamw only")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=cfg.name == "adamw")
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def make_schedule(optimizer, cfg: ScheduleConfig, steps: int):
    """Warm-up (``LinearLR`` from ~0) then constant / cosine / linear decay to ``lr * min_lr_ratio``."""
    from torch.optim import lr_scheduler as sched

    rest = max(1, steps - cfg.warmup_steps)
    if cfg.kind == "cosine":
        base = [g["lr"] for g in optimizer.param_groups]
        main = sched.CosineAnnealingLR(optimizer, T_max=rest, eta_min=min(base) * cfg.min_lr_ratio)
    elif cfg.kind == "linear":
        main = sched.LinearLR(optimizer, start_factor=1.0, end_factor=max(cfg.min_lr_ratio, 1e-8), total_iters=rest)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not cfg.warmup_steps:
        return main
    warm = sched.LinearLR(
        optimizer, start_factor=1.0 / (cfg.warmup_steps + 1), end_factor=1.0, total_iters=cfg.warmup_steps
    )
    return sched.SequentialLR(optimizer, [warm, main], milestones=[cfg.warmup_steps])


def lift_scalars(module: nn.Module) -> list[str]:
    """Give 0-dim parameters (VLMo's ``heads.itc.logit_scale``) shape [1], in place.

    DeepSpeed views every parameter as bytes to broadcast it at start-up (ZeRO 0-2) and to
    partition it (ZeRO-3), which fails for 0-dim tensors. Broadcasting keeps the maths the
    same; ``fit_shapes`` restores the model's shapes when weights leave the engine."""
    lifted = []
    for name, p in module.named_parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
            lifted.append(name)
    return lifted


def fit_shapes(sd: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` with each tensor reshaped to ``module``'s shape where only the shape differs (same numel)."""
    ref = module.state_dict()
    out = {}
    for k, v in sd.items():
        want = ref[k].shape if k in ref else v.shape
        out[k] = v.reshape(want) if v.shape != want and v.numel() == ref[k].numel() else v
    return out


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def defer_muon_compile() -> bool:
    """Import DeepSpeed's Muon optimizer with its ``torch.compile`` applied on first call, not at import.

    ``deepspeed.initialize`` imports that module (the ZeRO optimizer check, the bf16 optimizer), and the module
    decorates three functions with ``torch.compile`` at import, which loads inductor: 3.2 s of every
    training process measured here (2 cores), for an optimizer vlforge does not use. During this one
    import DeepSpeed's ``compiler.compile`` returns a decorator that calls ``torch.compile`` on the
    function's first call, when torch would compile it anyway, so Muon behaves the same. Returns
    whether the module was imported this way (False: already imported, or another DeepSpeed layout).
    Written by hand: neither DeepSpeed nor torch has a switch for it."""
    if MUON_MODULE in sys.modules:
        return False
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return False
    eager = getattr(compiler, "compile", None)
    if eager is None:
        return False

    def lazy_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if torch.compiler.is_compiling():  # traced from another compiled function: inline it
                    return fn(*args, **kwargs)
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = lazy_compile
    try:
        importlib.import_module(MUON_MODULE)
    except Exception:  # a speed-up only: deepspeed.initialize imports it (or fails) as it would have
        return False
    finally:
        compiler.compile = eager
    return True


def build_engine(
    module: nn.Module,
    stage: StageConfig,
    cfg: DeepSpeedConfig,
    *,
    micro_batch: int,
    world_size: int,
    on_gpu: bool,
    extra: Mapping | None = None,
):
    """``deepspeed.initialize`` over ``module`` with the stage's optimizer and schedule; returns the engine.
    ``extra`` is merged into the DeepSpeed config after everything else (the loop's resume settings)."""
    import deepspeed

    defer_muon_compile()
    lift_scalars(module)
    ds = merge(deepspeed_config(cfg, micro_batch=micro_batch, world_size=world_size, on_gpu=on_gpu), extra or {})
    optimizer = make_optimizer(
        param_groups(module, stage.optimizer.weight_decay), stage.optimizer, cfg.offload_optimizer
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_schedule(opt, stage.schedule, stage.steps),
        config=ds,
        dist_init_required=False,
    )
    return engine


def _gather_full(param: torch.Tensor, zero_stage: int) -> torch.Tensor:
    if zero_stage == 3 and hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    return param.detach().float().cpu().clone()


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The module's complete fp32 weights on every rank (a collective: all ranks must call it).

    Trainable parameters come from the optimizer's fp32 master copy (``safe_get_full_fp32_param``)
    when DeepSpeed keeps one, frozen ones from the module (gathered under ZeRO-3); buffers as they are."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        out[name] = full.detach().float().cpu().clone() if full is not None else _gather_full(p, zero_stage)
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


def prebuild_ops(cpu_adam: bool = False) -> list[str]:
    """Compile DeepSpeed's CPU ops into ``extensions_dir()`` once (``shm_comm``, and ``cpu_adam`` for
    optimizer offload), so that no training run pays for it:
    ``python -m vlforge.train.engine prebuild [--cpu-adam]``."""
    prepare_env(on_gpu=False)
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in ("ShareMemCommBuilder",) + (("CPUAdamBuilder",) if cpu_adam else ()):
        get_accelerator().create_op_builder(name).load()
        built.append(name)
    return built


if __name__ == "__main__":
    if sys.argv[1:2] != ["prebuild"]:
        sys.exit("usage: python -m vlforge.train.engine prebuild [--cpu-adam]")
    print("built", prebuild_ops("--cpu-adam" in sys.argv), "in", extensions_dir())
