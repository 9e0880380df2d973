"""Sweep planning: a file in ``sweeps/`` -> the trial configs (``SweepPlan``), checked on the driver.

    from vlforge.tune import load_sweep, make_plan
    plan = make_plan(load_sweep("sweeps/distill_weights_smoke.yaml"))
    print([r.name for r in plan.shared], plan.max_reports)
    run = plan.trial_run({"student.stages.1.temperature": 2.0})   # one trial's TrainRunConfig

The base experiment is split into shared runs (trained once per sweep: the teacher of a
``two_stage`` experiment, the stages before ``trial_stages``) and the trial run; a swept key
that would change a shared run is refused. ``vlforge sweep FILE --check`` runs this only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlforge.config import (
    ConfigError,
    SweepConfig,
    TrainRunConfig,
    TwoStageConfig,
    from_dict,
    load,
    to_dict,
)
from vlforge.data.corpus import corpus_current
from vlforge.data.storage import absolute, is_uri
from vlforge.evaluation.validation import CaptionValidator, RetrievalValidator
from vlforge.tasks import check_stages
from vlforge.tracking import resolve_tracking_uri
from vlforge.tracking.store import PARENT_TAG
from vlforge.train.runner import resolve
from vlforge.workflows.two_stage import plan

TRIAL_TAG = "vlforge.trial_id"
SWEEP_TAG = "vlforge.sweep"
ROLE_TAG = "vlforge.sweep.role"
STATUS_TAG = "vlforge.trial_status"

# ----------------------------------------------------------------------------- the sweep file


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read a sweep file; ``name`` defaults to the file's name, ``experiment`` is resolved to a path
    (as given, else beside the sweep file, else beside its folder)."""
    cfg = load(SweepConfig, path, list(overrides))
    here = Path(path).resolve().parent
    candidates = [Path(cfg.experiment), here / cfg.experiment, here.parent / cfg.experiment]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(
            f"{path}: experiment {cfg.experiment} not found (looked at {', '.join(str(c) for c in candidates)})"
        )
    return dataclasses.replace(cfg, name=cfg.name or Path(path).stem.replace(".", "_"), experiment=str(found.resolve()))


def _value_text(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def param_overrides(params: dict[str, Any]) -> list[str]:
    """``--set`` overrides for a trial's values; a key ``a.b,c.d`` sets both paths to the value."""
    return [f"{path.strip()}={_value_text(v)}" for k, v in params.items() for path in k.split(",")]


def load_experiment(sweep: SweepConfig, params: dict[str, Any] | None = None) -> TwoStageConfig | TrainRunConfig:
    """The base experiment with the sweep's ``set`` and then ``params`` applied."""
    cls = TwoStageConfig if sweep.job == "two_stage" else TrainRunConfig
    overrides = [*sweep.set, *param_overrides(params or {})]
    try:
        exp = load(cls, sweep.experiment, overrides)
        if isinstance(exp, TrainRunConfig):
            check_stages(exp)  # a two-stage job's runs are checked as its plan makes them (runner.validate)
    except ConfigError as exc:
        raise ConfigError(f"sweep {sweep.name}: {exc}") from None
    return exp


# ----------------------------------------------------------------------------- the plan


@dataclass
class SweepPlan:
    """Everything the trials need, resolved on the driver (absolute paths, tracking URI)."""

    sweep: SweepConfig
    root: Path  # <storage_path>/<name>: tune/, runs/, results and the best config
    experiment: dict[str, Any]  # the base experiment, paths absolute, as a dict (from_dict rebuilds it)
    shared: list[TrainRunConfig]  # trained once, in order, before the trials
    validation_shards: str
    max_reports: int  # reports of a trial that runs to the end
    parent_run_id: str | None = None

    @property
    def name(self) -> str:
        return self.sweep.name

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    def trial_name(self, trial_id: str) -> str:
        return f"{self.name}.{trial_id}"

    def trial_run(self, params: dict[str, Any], trial_id: str = "check") -> TrainRunConfig:
        """The trial's ``TrainRunConfig``: the experiment with ``params``, cut to ``trial_stages``."""
        cls = TwoStageConfig if self.sweep.job == "two_stage" else TrainRunConfig
        try:
            exp = from_dict(cls, self.experiment, param_overrides(params))
        except ConfigError as exc:
            raise ConfigError(f"sweep {self.name}: {exc}") from None
        full = _full_run(self, exp)
        before, trial = _split(full, self.sweep.trial_stages)
        base_dir = self.runs_dir / f"{self.name}.base" / "stages"
        stages = []
        for i, s in enumerate(trial):
            if s.init_stage and s.init_stage in [b.name for b in before]:
                s = dataclasses.replace(s, init=str(base_dir / s.init_stage))
            elif i == 0 and s.init == "previous" and before:
                s = dataclasses.replace(s, init=str(base_dir / before[-1].name))
            stages.append(s)
        res = self.sweep.resources
        tags = {
            **self.sweep.tracking.tags,
            SWEEP_TAG: self.name,
            TRIAL_TAG: trial_id,
            ROLE_TAG: "trial",
            **({PARENT_TAG: self.parent_run_id} if self.parent_run_id else {}),
        }
        name = self.trial_name(trial_id)
        return dataclasses.replace(
            full,
            name=name,
            stages=stages,
            data=stages[0].data or full.data,
            storage_path=str(self.runs_dir),
            num_workers=res.num_workers,
            worker_cpus=res.worker_cpus,
            use_gpu=res.use_gpu,
            checkpoint_every=self.sweep.report_every,
            export=False,
            stage_exports=False,
            corpus=None,
            tracking=dataclasses.replace(self.sweep.tracking, run_name=name, tags=tags),
        )

    def validator(self, run: TrainRunConfig):
        """The trial's validator (``validation.kind``), with the data settings of its first stage
        (image size and tokenizer: what the run validated against its model), unaugmented."""
        data = run.stages[0].data or run.data
        data = dataclasses.replace(
            data, shards=self.validation_shards, image=dataclasses.replace(data.image, augment=False)
        )
        v = self.sweep.validation
        if v.kind == "captioning":
            return CaptionValidator(
                self.validation_shards,
                data,
                max_samples=v.max_samples,
                batch_size=v.batch_size,
                max_new_tokens=v.max_new_tokens,
            )
        return RetrievalValidator(self.validation_shards, data, max_samples=v.max_samples, batch_size=v.batch_size)


def _split(run: TrainRunConfig, trial_stages: list[str]):
    """(stages before the trial's, the trial's stages); the trial's must be consecutive."""
    names = [s.name for s in run.stages]
    if not trial_stages:
        return [], list(run.stages)
    unknown = [n for n in trial_stages if n not in names]
    if unknown:
        raise ConfigError(f"trial_stages {unknown}: no such stage (stages: {names})")
    first = names.index(trial_stages[0])
    if names[first : first + len(trial_stages)] != list(trial_stages):
        raise ConfigError(f"trial_stages {trial_stages} must be consecutive stages in order (stages: {names})")
    return list(run.stages[:first]), list(run.stages[first : first + len(trial_stages)])


def _two_stage_plan(sweep_plan: SweepPlan, exp: TwoStageConfig):
    exp = dataclasses.replace(
        exp,
        name=sweep_plan.name,
        storage_path=str(sweep_plan.runs_dir),
        ablations=[],
        tracking=sweep_plan.sweep.tracking,
    )
    return plan(exp, ablations=False)


def _full_run(sweep_plan: SweepPlan, exp) -> TrainRunConfig:
    """The run a trial cuts its stages from: the distilled student of a two-stage job, or the run itself."""
    if isinstance(exp, TwoStageConfig):
        return _two_stage_plan(sweep_plan, exp).student_run()
    return resolve(dataclasses.replace(exp, tracking=sweep_plan.sweep.tracking))


def _shared_runs(sweep_plan: SweepPlan, exp) -> list[TrainRunConfig]:
    shared: list[TrainRunConfig] = []
    full = _full_run(sweep_plan, exp)
    before, trial = _split(full, sweep_plan.sweep.trial_stages)
    if isinstance(exp, TwoStageConfig) and not exp.teacher.checkpoint:
        p = _two_stage_plan(sweep_plan, exp)
        needs_finetune = any(s.teacher and Path(s.teacher).name != "pretrain" for s in [*before, *trial])
        shared += p.teacher_runs(finetune=needs_finetune)
    if before:
        shared.append(
            dataclasses.replace(
                full,
                name=f"{sweep_plan.name}.base",
                stages=before,
                storage_path=str(sweep_plan.runs_dir),
                export=False,
                stage_exports=True,
                corpus=None,
                tracking=dataclasses.replace(full.tracking, run_name=f"{sweep_plan.name}.base"),
            )
        )
    return shared


def _comparable(run: TrainRunConfig) -> dict[str, Any]:
    d = to_dict(run)
    d.pop("tracking", None)
    return d


def _reports(run: TrainRunConfig, every: int) -> int:
    """How many times a run reports: every ``every`` steps and at each stage's end."""
    return sum(len({*range(every, s.steps + 1, every), s.steps}) for s in run.stages)


def _resolved_experiment(sweep: SweepConfig, params: dict[str, Any] | None = None):
    """``load_experiment`` with its paths made absolute here, on the driver (trials run elsewhere)."""
    exp = load_experiment(sweep, params)
    if isinstance(exp, TwoStageConfig):
        checkpoint = absolute(exp.teacher.checkpoint) if exp.teacher.checkpoint else None
        return dataclasses.replace(
            exp,
            data_root=absolute(exp.data_root),
            storage_path=absolute(exp.storage_path),
            teacher=dataclasses.replace(exp.teacher, checkpoint=checkpoint),
        )
    return resolve(exp)


def make_plan(sweep: SweepConfig) -> SweepPlan:
    """Resolve the sweep on the driver and check every swept key before any resource is taken."""
    tracking = dataclasses.replace(
        sweep.tracking,
        tracking_uri=resolve_tracking_uri(sweep.tracking),
        buffer_dir=os.path.abspath(sweep.tracking.buffer_dir),
    )
    sweep = dataclasses.replace(sweep, tracking=tracking, storage_path=absolute(sweep.storage_path))
    exp = _resolved_experiment(sweep)
    shards = sweep.validation.shards
    if isinstance(exp, TwoStageConfig) and not is_uri(shards) and not os.path.isabs(shards):
        val = absolute(f"{exp.data_root.rstrip('/')}/{shards}")
    else:
        val = absolute(shards)
    p = SweepPlan(sweep, Path(sweep.storage_path) / sweep.name, to_dict(exp), [], val, 0)
    if isinstance(exp, TwoStageConfig) and exp.corpus is not None:
        if not is_uri(exp.data_root) and not corpus_current(dataclasses.replace(exp.corpus, out=exp.data_root)):
            return p  # the corpus is built first (run_sweep), then the plan is made again
    p.shared = _shared_runs(p, exp)
    p.max_reports = _reports(p.trial_run({}), sweep.report_every)
    base = [_comparable(r) for r in p.shared]
    for key, space in sweep.space.items():
        for value in {_value_text(v): v for v in (space.example(), _other_example(space))}.values():
            if [_comparable(r) for r in _shared_runs(p, _resolved_experiment(sweep, {key: value}))] != base:
                raise ConfigError(
                    f"sweep {sweep.name}: space key {key} changes a shared run (the teacher or "
                    f"the stages before {sweep.trial_stages or 'the trial'}), which is trained once "
                    f"per sweep; sweep keys of the trial stages only"
                )
            p.trial_run({key: value})
    if sweep.scheduler.kind == "asha" and sweep.scheduler.grace_period >= (sweep.scheduler.max_t or p.max_reports):
        raise ConfigError(
            f"scheduler.grace_period {sweep.scheduler.grace_period} leaves ASHA nothing to stop: a "
            f"trial reports {p.max_reports} times (report_every {sweep.report_every})"
        )
    return p


def _other_example(space) -> Any:
    if space.values:
        return space.values[-1]
    return int(space.high) - 1 if space.type == "randint" else float(space.high)
