"""Training configs: optimizer, schedule, DeepSpeed, stages, debug hooks, and a training run."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vlforge.config.data import CorpusConfig, DataConfig
from vlforge.config.tasks import TASKS
from vlforge.config.tracking import TrackingConfig

# ---- training configs

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass
class OptimizerConfig:
    """A torch optimizer over the stage's trainable parameters (``param_groups``)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class ScheduleConfig:
    """Linear warm-up (``torch.optim.lr_scheduler.LinearLR``) then ``kind`` over the remaining steps."""

    kind: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine / linear)

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedConfig:
    """What the DeepSpeed engine gets; ``overrides`` is merged last into the generated JSON config."""

    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO >= 1 only; compiles cpu_adam on first use
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    universal_resume: bool = False  # resuming on another worker count: convert to a universal checkpoint first
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer)")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.clip_grad < 0:
            raise ValueError("clip_grad must be >= 0")


@dataclass
class StageConfig:
    """One training stage: objectives and weights, what trains, how long, on which data, from where.

    ``init``: ``previous`` (module weights of the stage before; the first stage starts fresh),
    ``fresh`` (the model's own initialisation), ``stage:<name>`` (the weights an earlier stage of
    this run ended with), or a path/URI of a Ray Train checkpoint directory, a DeepSpeed
    checkpoint or a model directory (``model.safetensors``). A VLMo's weights load into the
    encoder of a fusion/distill model (its task heads start fresh).

    ``task``, ``teacher``, ``temperature``: the ``fusion`` and ``distill`` methods only. ``task`` is
    ``itm`` (image-text pairs), ``vqa`` or ``nlvr2``; ``teacher`` is the model directory of the
    frozen teacher (a VLMo or a fine-tuned fusion model) for ``distill`` stages."""

    name: str
    objectives: dict[str, float]
    trainable: list[str] = field(default_factory=lambda: ["*"])
    steps: int = 100
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig | None = None  # None: the run's ``data``
    init: str = "previous"
    task: str | None = None
    teacher: str | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise ValueError(f"stage name {self.name!r} may hold only letters, digits, '_', '-', '.'")
        if self.steps < 1:
            raise ValueError(f"stage {self.name}: steps must be >= 1")
        if not self.objectives or not any(self.objectives.values()):
            raise ValueError(f"stage {self.name}: needs at least one objective with a non-zero weight")
        if not self.trainable:
            raise ValueError(f"stage {self.name}: trainable must list at least one pattern")
        if self.schedule.warmup_steps >= self.steps and self.schedule.warmup_steps:
            raise ValueError(f"stage {self.name}: warmup_steps ({self.schedule.warmup_steps}) must be < steps")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"stage {self.name}: task must be one of {list(TASKS)}, got {self.task!r}")
        if self.temperature <= 0:
            raise ValueError(f"stage {self.name}: temperature must be > 0")
        if self.init.startswith("stage:") and not self.init_stage:
            raise ValueError(f"stage {self.name}: init 'stage:' needs a stage name")

    @property
    def init_stage(self) -> str | None:
        """The earlier stage named by ``init: stage:<name>``, else None."""
        return self.init.removeprefix("stage:") if self.init.startswith("stage:") else None


@dataclass
class DebugConfig:
    """Test hooks. ``fail_at_step``: rank ``fail_rank`` raises once at that global step (the
    ``fail_marker`` file makes it raise only the first time). ``probe_outputs``: at the end,
    write the engine's outputs on a fixed seeded batch to ``<run dir>/probe_outputs.pt``.
    ``sample_log``: every rank appends one JSON line per micro-batch to ``<sample_log>/rank<r>.jsonl``
    (stage, epoch, global step, attempt, sample ids), for tests of the stream's order and resume."""

    fail_at_step: int | None = None
    fail_rank: int = 1
    fail_marker: str | None = None
    probe_outputs: bool = False
    sample_log: str | None = None  # a directory: each rank appends the sample ids of every batch it trains on


@dataclass
class TrainRunConfig:
    """A training run: a method, a model and a list of stages, run by Ray Train + DeepSpeed.

    The objective names a stage may weigh are declared by the method's task (``vlforge.tasks``,
    above this layer) and checked there (``vlforge.tasks.check_stages``, from ``train.runner.validate``)."""

    method: Literal["vlmo", "frozen", "vcgpt", "vlkd", "fusion", "distill"] = "vlmo"
    model: str = "vlmo_debug"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    corpus: CorpusConfig | None = None  # build this corpus first when its directory is absent
    name: str | None = None  # Ray Train run name; the same name resumes; None = method-model-<random>
    storage_path: str = "out/ray_results"
    num_workers: int = 2
    worker_cpus: float = 1.0
    use_gpu: bool = False
    placement_strategy: PlacementStrategy = "PACK"  # Ray placement of the workers; STRICT_SPREAD: one per node
    checkpoint_every: int = 0  # optimizer steps; 0 = only at stage ends
    max_failures: int = 1
    progress_every: int = 10  # steps between progress lines (rank 0)
    seed: int = 0
    export: bool = True  # fp32 safetensors + config under <storage_path>/<name>/export
    debug: DebugConfig = field(default_factory=DebugConfig)
    keep_checkpoints: int = 3  # newest checkpoints kept in storage
    num_answers: int = 0  # fusion/distill: VQA answer vocabulary size (0 = no VQA head)
    stage_exports: bool = False  # also write each stage's final weights to <storage_path>/<name>/stages/<stage>

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.checkpoint_every < 0 or self.progress_every < 0 or self.max_failures < -1:
            raise ValueError("checkpoint_every, progress_every must be >= 0 and max_failures >= -1")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-', '.'")
        for i, s in enumerate(self.stages):
            pair = self.method in ("fusion", "distill")
            if pair and s.task is None:
                raise ValueError(f"stage {s.name}: method {self.method!r} needs a task ({list(TASKS)})")
            if not pair and (s.task is not None or s.teacher is not None):
                raise ValueError(f"stage {s.name}: task/teacher are for methods 'fusion' and 'distill' only")
            if self.method == "distill" and (s.objectives.get("soft") or s.objectives.get("attn")) and not s.teacher:
                raise ValueError(f"stage {s.name}: soft/attn distillation needs a teacher model directory")
            if self.method == "fusion" and s.task == "itm":
                raise ValueError(f"stage {s.name}: method 'fusion' fine-tunes vqa or nlvr2; itm is VLMo pretraining")
            if s.objectives.get("itc") and self.method == "distill" and s.task != "itm":
                raise ValueError(f"stage {s.name}: the itc term exists only for task 'itm'")
            if s.task == "vqa" and self.num_answers < 1:
                raise ValueError(f"stage {s.name}: task vqa needs num_answers > 0 (the size of answers.json)")
            if s.init_stage is not None and s.init_stage not in [t.name for t in self.stages[:i]]:
                raise ValueError(f"stage {s.name}: init {s.init!r} names no earlier stage of this run")
