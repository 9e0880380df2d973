"""Sweeps (``vlforge sweep sweeps/<name>.yaml``): parameter spaces, search, scheduler, trial resources."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from vlforge.config.tracking import TrackingConfig

# ---- sweeps (vlforge sweep sweeps/<name>.yaml)

PARAM_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCH_ALGORITHMS = ("random", "grid", "optuna")
VALIDATION_METRICS: dict[str, tuple[str, ...]] = {
    "retrieval": (
        "val_rmean",
        "val_i2t_r1",
        "val_i2t_r5",
        "val_i2t_r10",
        "val_t2i_r1",
        "val_t2i_r5",
        "val_t2i_r10",
    ),
    "captioning": ("val_cider", "val_bleu4", "val_rouge_l", "val_objects_named"),
}
SWEEP_METRICS = (*VALIDATION_METRICS["retrieval"], *VALIDATION_METRICS["captioning"], "loss")


@dataclass
class ParamSpace:
    """One swept config key. ``choice`` / ``grid``: ``values``; ``uniform`` / ``loguniform``:
    floats in [low, high]; ``randint``: integers in [low, high)."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.type in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"{self.type}: give a non-empty values list (and no low/high)")
        else:
            if self.values is not None or self.low is None or self.high is None:
                raise ValueError(f"{self.type}: give low and high (and no values)")
            if not self.low < self.high:
                raise ValueError(f"{self.type}: low {self.low} must be < high {self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {self.low}")

    def example(self) -> Any:
        """A value of the space, for checking that the key exists before any trial runs."""
        if self.values:
            return self.values[0]
        return int(self.low) if self.type == "randint" else float(self.low)


@dataclass
class SearchConfig:
    """How trials get their values. ``random`` samples the space (``grid`` keys are crossed with
    the samples); ``grid`` runs every combination of the ``grid`` keys ``num_samples`` times;
    ``optuna`` is Ray Tune's ``OptunaSearch`` (TPE, in-memory study: no extra service)."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = 4  # the trial budget (grid: repeats of the whole grid)
    max_concurrent: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("num_samples and max_concurrent must be >= 1")


@dataclass
class SchedulerConfig:
    """``asha``: Ray Tune's ASHA stops trials whose metric trails at a rung; a trial runs at least
    ``grace_period`` reports. ``max_t`` 0 = the reports of a full trial. ``fifo``: no early stopping."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor <= 1 or self.max_t < 0:
            raise ValueError("scheduler: grace_period >= 1, reduction_factor > 1, max_t >= 0")


@dataclass
class TrialResources:
    """What one trial takes. A trial is a Tune driver function (``trial_cpus``) that runs a Ray
    Train run of ``num_workers`` workers of ``worker_cpus`` each. A local Ray gets enough logical
    CPUs for ``max_concurrent`` trials plus ``data_cpus`` for Ray Data (default: max(2, cores))."""

    num_workers: int = 1
    worker_cpus: float = 0.5
    trial_cpus: float = 0.01
    use_gpu: bool = False
    data_cpus: int | None = None

    def __post_init__(self):
        if self.num_workers < 1 or self.worker_cpus <= 0 or self.trial_cpus < 0:
            raise ValueError("resources: num_workers >= 1, worker_cpus > 0, trial_cpus >= 0")

    def per_trial(self) -> float:
        return self.trial_cpus + self.num_workers * self.worker_cpus


@dataclass
class ValidationConfig:
    """The metrics every report carries, on a held-out captions shard set. ``retrieval``: image-text
    retrieval with the model's dual-encoder (ITC) embeddings (``val_rmean``, ``val_i2t_r1``, ...);
    ``captioning``: a generative model's greedy captions scored against the set's (``val_cider``,
    ``val_bleu4``, ``val_rouge_l``, ``val_objects_named``). ``shards`` is relative to ``data_root``
    for a ``two_stage`` experiment and as given for a ``train`` one."""

    shards: str = "scenes/val"
    kind: Literal["retrieval", "captioning"] = "retrieval"  # what the model is scored on
    max_samples: int = 200
    batch_size: int = 64
    max_new_tokens: int = 20  # captioning: tokens generated per caption (a byte tokenizer needs more)

    def __post_init__(self):
        if self.max_samples < 2 or self.batch_size < 1:
            raise ValueError("validation: max_samples >= 2, batch_size >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"validation: max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class SweepConfig:
    """A sweep file in ``sweeps/``: a base experiment, its overrides, a search space over any of
    its config keys, the search algorithm and scheduler, the metric, the budget and resources.

    A trial trains ``trial_stages`` (a consecutive run of the experiment's training stages; for a
    ``two_stage`` experiment, of its student stages). Stages before them, and the teacher of a
    ``two_stage`` experiment, are shared: trained once per sweep, before the first trial. Stages
    after them are not run. Every ``report_every`` steps a trial checkpoints and reports the
    validation metric to Tune."""

    experiment: str  # the base experiment YAML (TwoStageConfig or TrainRunConfig)
    job: Literal["two_stage", "train"] = "two_stage"
    name: str | None = None  # None: the sweep file's name
    set: list[str] = field(default_factory=list)  # overrides of the base experiment, as --set
    trial_stages: list[str] = field(default_factory=list)  # empty: every stage
    space: dict[str, ParamSpace] = field(default_factory=dict)  # key: a config path; "a.b,c.d" sets both
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metric: str = "val_rmean"
    mode: Literal["max", "min"] = "max"
    report_every: int = 10  # steps between reports (and checkpoints) of a trial
    resources: TrialResources = field(default_factory=TrialResources)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    storage_path: str = "out/sweeps"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="sweeps"))

    def __post_init__(self):
        if not self.space:
            raise ValueError("space: give at least one config key to sweep")
        if self.metric not in SWEEP_METRICS:
            raise ValueError(f"metric {self.metric!r}: known metrics {list(SWEEP_METRICS)}")
        kind = self.validation.kind
        if self.metric != "loss" and self.metric not in VALIDATION_METRICS[kind]:
            other = next(k for k, names in VALIDATION_METRICS.items() if self.metric in names)
            raise ValueError(
                f"metric {self.metric} is a {other} metric, but validation.kind is {kind} (which reports "
                f"{list(VALIDATION_METRICS[kind])}); set validation.kind: {other} or pick one of those"
            )
        if self.report_every < 1:
            raise ValueError("report_every must be >= 1")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-'")
        grid = [k for k, p in self.space.items() if p.type == "grid"]
        if self.search.algorithm == "grid" and not grid:
            raise ValueError("search.algorithm grid: give at least one key of type grid")
        if self.search.algorithm == "optuna" and grid:
            raise ValueError(f"search.algorithm optuna samples its own points; use choice, not grid, for {grid}")
        if self.search.algorithm == "grid" and len(grid) != len(self.space):
            raise ValueError(
                f"search.algorithm grid: every key must be of type grid, not {sorted(set(self.space) - set(grid))}"
            )
        if len(set(self.trial_stages)) != len(self.trial_stages):
            raise ValueError(f"trial_stages: names must be unique, got {self.trial_stages}")
