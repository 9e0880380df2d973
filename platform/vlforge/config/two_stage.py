"""The two-stage distillation job (``jobs/two_stage.py``): teacher, student, evaluation, registration."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vlforge.config.data import CorpusConfig
from vlforge.config.tasks import FINETUNE_TASKS, TASKS
from vlforge.config.tracking import TrackingConfig
from vlforge.config.train import DeepSpeedConfig, PlacementStrategy, StageConfig

# ---- the two-stage distillation job (jobs/two_stage.py)

ABLATIONS = ("soft_only", "hard_only")


@dataclass
class TeacherConfig:
    """The fusion teacher: VLMo pretraining stages (method ``vlmo``), then one fine-tuning stage per
    downstream task (method ``fusion``, each starting from the pretrained weights). ``checkpoint``:
    a teacher directory of an earlier job (``pretrain/`` and one model directory per fine-tuning
    stage) to reuse instead of training one."""

    model: str = "vlmo_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrain: list[StageConfig] = field(default_factory=list)
    finetune: list[StageConfig] = field(default_factory=list)


@dataclass
class StudentConfig:
    """The dual-encoder student's stages (method ``distill``). A stage's ``teacher`` names the
    teacher model: ``pretrain`` (the pretrained VLMo) or a teacher fine-tuning stage's name. A
    stage's ``init`` may also be ``teacher:<model>`` (same names): the student starts from that
    teacher model's weights (its image-only and text-only paths; the VL experts are left out)."""

    model: str = "vlmo_small"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"vl_layers": 0})
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Evaluation on the driver after training. Sets are ``<data_root>/<set>/<split>`` unless ``sets`` names
    another for a task and split; ``test``
    holds concept pairs never seen together in training (held-out combinations), reported apart
    from ``val``."""

    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    # Your own evaluation sets: "<task>/<split>" (task itm, nlvr2 or vqa) -> a shard set (path relative
    # to data_root, absolute, or s3://), in place of <data_root>/<scenes|nlvr2|vqa>/<split>.
    sets: dict[str, str] = field(default_factory=dict)
    max_samples: int = 300  # per set and split
    batch_size: int = 64
    rerank_k: int = 16  # teacher retrieval: ITC top-k re-scored by the fusion ITM head (0: ITC scores only)
    latency: bool = True
    latency_ns: list[int] = field(default_factory=lambda: [100, 300, 1000])
    max_teacher_pairs: int = 20000  # larger N: time this many fusion pairs and extrapolate

    def __post_init__(self):
        if not self.splits or self.max_samples < 2 or self.batch_size < 1 or self.rerank_k < 0:
            raise ValueError("eval: splits must be non-empty, max_samples >= 2, batch_size >= 1, rerank_k >= 0")
        if any(n < 1 for n in self.latency_ns):
            raise ValueError("eval.latency_ns must be positive")
        for key in self.sets:
            task, _, split = key.partition("/")
            if task not in TASKS or not split:
                raise ValueError(f"eval.sets: keys are '<task>/<split>' with task itm, nlvr2 or vqa, got {key!r}")


@dataclass
class RegisterConfig:
    """Registration of the distilled student (the retrieval model: embed images, embed texts,
    score pairs) as a new version of ``model_name``, with the evaluation figures as tags."""

    enabled: bool = True
    model_name: str = "vlforge-dual-encoder"
    alias: str = "challenger"


@dataclass
class FeatureCacheConfig:
    """Features of a locked image tokenizer computed once per training shard set and trained on
    (``vlforge.workflows.features``): for runs whose models (and teachers) share one locked
    tokenizer; other runs read pixels. Cached runs train without pixel augmentation."""

    enabled: bool = True
    actors: int = 2  # tokenizer actors, 1 CPU and 1 torch thread each
    batch_size: int = 64

    def __post_init__(self):
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError("features: actors and batch_size must be >= 1")


@dataclass
class TwoStageConfig:
    """``jobs/two_stage.py``: teacher (pretrain + fine-tune), student distillation in two stages
    (pretraining distillation, then fine-tuning distillation per task), the ablations, evaluation,
    registration. Runs are named ``<name>.teacher-pretrain``, ``<name>.teacher-finetune`` and
    ``<name>.student-<variant>``; a finished run is reused and an unfinished one resumes when the
    job is started again with the same ``name``."""

    name: str | None = None  # None: two-stage-<random>
    seed: int = 0
    data_root: str = "data/corpus"  # a stage's relative data.shards is <data_root>/<shards>; local or s3://
    corpus: CorpusConfig | None = field(default_factory=CorpusConfig)  # built at a local data_root when absent
    max_steps: int = 0  # > 0: cap every stage at this many steps (tests, dry runs)
    max_batch_size: int = 0  # > 0: cap every stage's per-worker batch size (tests, dry runs)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    ablations: list[str] = field(default_factory=lambda: ["soft_only"])
    eval: EvalConfig = field(default_factory=EvalConfig)
    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="two_stage"))
    storage_path: str = "out/two_stage"
    num_workers: int = 2
    worker_cpus: float = 1.0
    use_gpu: bool = False
    placement_strategy: PlacementStrategy = "PACK"  # of each run's Train workers; STRICT_SPREAD: one per node
    checkpoint_every: int = 0
    max_failures: int = 1
    progress_every: int = 10

    def __post_init__(self):
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ValueError(f"ablations: unknown {bad}; known: {list(ABLATIONS)}")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-'")
        if self.max_steps < 0 or self.max_batch_size < 0:
            raise ValueError("max_steps and max_batch_size must be >= 0")
        if not self.student.stages:
            raise ValueError("student.stages: at least one stage")
        if not self.teacher.checkpoint and not self.teacher.pretrain:
            raise ValueError("teacher: give pretrain stages or a checkpoint to reuse")
        ft = [s.name for s in self.teacher.finetune]
        for s in self.teacher.finetune:
            if s.task not in FINETUNE_TASKS:
                raise ValueError(f"teacher.finetune stage {s.name}: task must be vqa or nlvr2")
        for s in self.student.stages:
            if s.task is None:
                raise ValueError(f"student stage {s.name}: needs a task ({list(TASKS)})")
            if s.teacher is not None and s.teacher != "pretrain" and s.teacher not in ft:
                raise ValueError(
                    f"student stage {s.name}: teacher {s.teacher!r} is neither 'pretrain' nor a "
                    f"teacher.finetune stage ({ft})"
                )
            if s.task in FINETUNE_TASKS and s.teacher == "pretrain":
                raise ValueError(f"student stage {s.name}: task {s.task} needs a fine-tuned teacher")
