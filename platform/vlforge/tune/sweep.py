"""Sweeps: a file in ``sweeps/`` -> a Ray Tune run whose trials are Ray Train runs, tracked in MLflow.

    vlforge sweep sweeps/distill_weights_smoke.yaml                  # laptop: local Ray, local MLflow
    vlforge sweep sweeps/distill_weights.yaml --set search.num_samples=32
    ray job submit --working-dir . -- python jobs/sweep.py sweeps/distill_weights.yaml

    from vlforge.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("sweeps/vlmo_stage3_lr_wd_smoke.yaml"))
    print(result.table)

What happens (``SweepConfig`` in ``vlforge.config`` says what a file holds):

1. The base experiment (``jobs/configs/*.yaml``, with the file's ``set`` overrides) is split
   into shared runs and the trial run. Shared runs are trained once per sweep, before any
   trial: the teacher of a ``two_stage`` experiment, and the stages before ``trial_stages``
   (one run named ``<sweep>.base``). A swept key that would change a shared run is refused.
2. Ray Tune runs the trials: each trial is a driver function (``_trial``, a fraction of a CPU)
   that applies its values to the experiment, builds the trial's ``TrainRunConfig`` and runs
   it with ``run_training`` (a ``TorchTrainer`` named ``<sweep>.<trial id>``), passing
   ``TuneReportCallback`` so every Train report reaches Tune. A report comes every
   ``report_every`` steps and carries the validation metric (retrieval, or for a captioning
   model such as VLKD its captions' CIDEr / BLEU-4 / ROUGE-L, on a held-out set:
   ``validation.kind``, ``vlforge.evaluation.validation``), which the scheduler (ASHA) and the searcher
   (random, grid, Optuna TPE) read. An early-stopped trial's actor is ended by Tune, which
   ends its Train run; its MLflow run is closed as KILLED and tagged ``stopped_early``.
3. Stop the sweep (Ctrl-C, a lost driver) and start it again with the same name: Tune's
   experiment state under ``<storage_path>/<name>/tune`` restores it, finished trials are kept
   and unfinished ones resume their Train run from its last checkpoint (same run name).
4. MLflow: a parent run ``<sweep>``; the shared runs and one run per trial are its children,
   each trial's tagged ``vlforge.trial_id``. A restarted trial continues its child run (the
   tracker finds it by run key). At the end the parent gets the results table, the best
   trial's experiment config as ``best_config.yaml`` (runs as is with the experiment's job
   script) and ``metric_vs_params.png``, the metric against each swept key.

On a small machine: a local Ray gets logical CPUs for ``max_concurrent`` trials plus
``resources.data_cpus`` for Ray Data, so trials and their data pipelines never wait on each
other (two trials of one 0.5-CPU worker share 2 cores). On a cluster the concurrency is
capped at what the cluster's CPUs hold next to the data reserve.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from vlforge.config import (
    ConfigError,
    SweepConfig,
    TrainRunConfig,
    TwoStageConfig,
    dump_yaml,
    from_dict,
    load,
    to_dict,
)
from vlforge.data.corpus import corpus_exists, ensure_corpus
from vlforge.data.storage import absolute
from vlforge.evaluation import format_table
from vlforge.evaluation.validation import CaptionValidator, RetrievalValidator
from vlforge.runtime import init_ray as start_ray
from vlforge.runtime import local_cpus
from vlforge.tracking import ConfigChangedError, make_tracker, resolve_tracking_uri
from vlforge.tracking.redact import redact_text, secret_env_values
from vlforge.tracking.store import PARENT_TAG, find_experiment, runs_with_key
from vlforge.train.runner import is_finished, prepare_local_mlflow, resolve, run_training
from vlforge.workflows.two_stage import fill_teacher_dir, plan, train_or_reuse

TRIAL_TAG = "vlforge.trial_id"
SWEEP_TAG = "vlforge.sweep"
ROLE_TAG = "vlforge.sweep.role"
STATUS_TAG = "vlforge.trial_status"

FINISHED, STOPPED, ERROR, PENDING = "finished", "stopped_early", "error", "unfinished"


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
        return load(cls, sweep.experiment, overrides)
    except ConfigError as exc:
        raise ConfigError(f"sweep {sweep.name}: {exc}") from None


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
            **({_parent_tag(): self.parent_run_id} if self.parent_run_id else {}),
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


def _parent_tag() -> str:
    return PARENT_TAG


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
        return _two_stage_plan(sweep_plan, exp).runs["student-distilled"]
    return resolve(dataclasses.replace(exp, tracking=sweep_plan.sweep.tracking))


def _shared_runs(sweep_plan: SweepPlan, exp) -> list[TrainRunConfig]:
    shared: list[TrainRunConfig] = []
    full = _full_run(sweep_plan, exp)
    before, trial = _split(full, sweep_plan.sweep.trial_stages)
    if isinstance(exp, TwoStageConfig) and not exp.teacher.checkpoint:
        p = _two_stage_plan(sweep_plan, exp)
        shared.append(p.runs["teacher-pretrain"])
        needs_finetune = any(s.teacher and Path(s.teacher).name != "pretrain" for s in [*before, *trial])
        if needs_finetune and "teacher-finetune" in p.runs:
            shared.append(p.runs["teacher-finetune"])
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
    if isinstance(exp, TwoStageConfig) and "://" not in shards and not os.path.isabs(shards):
        val = absolute(f"{exp.data_root.rstrip('/')}/{shards}")
    else:
        val = absolute(shards)
    p = SweepPlan(sweep, Path(sweep.storage_path) / sweep.name, to_dict(exp), [], val, 0)
    if isinstance(exp, TwoStageConfig) and exp.corpus is not None:
        if "://" not in exp.data_root and not corpus_exists(exp.data_root):
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


# ----------------------------------------------------------------------------- Tune pieces


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, s in sweep.space.items():
        if s.type == "grid":
            out[key] = tune.grid_search(list(s.values))
        elif s.type == "choice":
            out[key] = tune.choice(list(s.values))
        elif s.type == "uniform":
            out[key] = tune.uniform(s.low, s.high)
        elif s.type == "loguniform":
            out[key] = tune.loguniform(s.low, s.high)
        else:
            out[key] = tune.randint(int(s.low), int(s.high))
    return out


def search_algorithm(sweep: SweepConfig, max_concurrent: int):
    """The searcher, limited to ``max_concurrent`` running trials (``TuneConfig.max_concurrent_trials``
    only limits a ``Searcher``; the random/grid generator takes its own limit)."""
    if sweep.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from ray.tune.search import ConcurrencyLimiter

        searcher = OptunaSearch(
            metric=sweep.metric, mode=sweep.mode, sampler=optuna.samplers.TPESampler(seed=sweep.search.seed)
        )
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=max_concurrent)


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial's last report through. The report marked ``final_report`` comes when
    the Train run has done its last step and is about to export and end; ASHA would answer STOP at
    ``max_t`` (or at a rung there) and Tune would kill a trial that is finishing by itself. The
    report still counts at its rung for the trials after it."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get("final_report") else decision


def scheduler(sweep: SweepConfig, max_reports: int):
    s = sweep.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return FinishingASHA(
        time_attr="training_iteration",
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        max_t=s.max_t or max_reports,
    )


def _trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """A Tune trial: the driver function that runs the trial's Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    run = plan.trial_run(params, trial_id)
    print(f"trial {trial_id}: {json.dumps(params)} -> Train run {run.name}", flush=True)
    run_training(run, init_ray=False, validator=plan.validator(run), callbacks=[TuneReportCallback()])


def _trial_status(plan: SweepPlan, trial_id: str, errored: bool) -> str:
    """How a trial that Tune has ended ended: its Train run wrote summary.json only if it ran to the end."""
    if errored:
        return ERROR
    return FINISHED if is_finished(plan.runs_dir / plan.trial_name(trial_id)) else STOPPED


def _status_file(plan: SweepPlan, trial_id: str) -> Path:
    return plan.root / "trials" / f"{trial_id}.json"


def _ended(plan: SweepPlan, trial_id: str) -> dict[str, Any] | None:
    path = _status_file(plan, trial_id)
    return json.loads(path.read_text()) if path.exists() else None


def _close_child_run(plan: SweepPlan, trial_id: str, status: str) -> None:
    """Tag the trial's MLflow run with how it ended; close it when its workers did not (early stop)."""
    if not plan.sweep.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(plan.sweep.tracking.tracking_uri)
    exp_id = find_experiment(client, plan.sweep.tracking.experiment)
    if exp_id is None:
        return
    for r in runs_with_key(client, exp_id, plan.trial_name(trial_id), max_results=5):
        client.set_tag(r.info.run_id, STATUS_TAG, status)
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="FAILED" if status == ERROR else "KILLED")


def _callback(plan: SweepPlan):
    from ray.tune import Callback

    class TrialRunCloser(Callback):
        """Driver side: when Tune ends a trial, its MLflow child run says how (finished, stopped early)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, errored=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, errored=True)

        def _close(self, trial, errored: bool) -> None:
            status = _trial_status(plan, trial.trial_id, errored)
            reports = trial.last_result.get("training_iteration", 0)
            path = _status_file(plan, trial.trial_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"status": status, "reports": reports, "time": time.time()}))
            print(
                f"trial {trial.trial_id}: {status} after {reports} report(s), {plan.sweep.metric} "
                f"{trial.last_result.get(plan.sweep.metric)}",
                flush=True,
            )
            try:
                _close_child_run(plan, trial.trial_id, status)
            except Exception as exc:  # noqa: BLE001 - tracking must not stop the sweep
                print(f"WARNING: could not close the MLflow run of trial {trial.trial_id}: {exc}", flush=True)

    return TrialRunCloser()


# ----------------------------------------------------------------------------- running


@dataclass
class SweepResult:
    name: str
    root: str
    rows: list[dict[str, Any]]  # one per trial: trial_id, the swept values, metric (last, best), reports, status
    best: dict[str, Any] | None
    best_config: str | None
    table: str
    seconds: float
    resumed: bool
    parent_run_id: str | None = None
    artifacts: list[str] = field(default_factory=list)

    def stopped_early(self) -> list[str]:
        return [r["trial_id"] for r in self.rows if r["status"] == STOPPED]

    @property
    def interrupted(self) -> bool:
        """Tune returned with trials not ended (Ctrl-C): running the sweep again resumes it."""
        return any(r["status"] == PENDING for r in self.rows)

    def summary(self) -> str:
        lines = [
            self.table,
            "",
            f"sweep {self.name}: {len(self.rows)} trials in {self.seconds:.0f}s"
            + (" (resumed)" if self.resumed else ""),
        ]
        if self.stopped_early():
            lines.append(f"stopped early by the scheduler: {', '.join(self.stopped_early())}")
        if self.interrupted:
            lines.append(
                f"INTERRUPTED: {sum(r['status'] == PENDING for r in self.rows)} trial(s) unfinished; "
                "run the same command again to resume the sweep"
            )
        if self.best:
            lines.append(
                f"best: trial {self.best['trial_id']}, {self.best['metric_name']} {self.best['metric']:.2f}; "
                f"config {self.best_config}"
            )
        lines.append(f"results: {self.root}")
        return "\n".join(lines)


def _local_cpus(plan: SweepPlan) -> tuple[float, int]:
    """(CPUs for the trials, or the largest shared run; CPUs reserved for Ray Data) of a local Ray."""
    res = plan.sweep.resources
    data = res.data_cpus if res.data_cpus is not None else max(2, os.cpu_count() or 1)
    trials = plan.sweep.search.max_concurrent * res.per_trial()
    shared = max([r.num_workers * r.worker_cpus for r in plan.shared], default=0.0)
    return max(trials, shared), data


def _concurrency(plan: SweepPlan, log: Callable[[str], None]) -> int:
    """``max_concurrent``, capped so that the trials leave the data reserve free on this cluster."""
    import ray

    res = plan.sweep.resources
    total = ray.cluster_resources().get("CPU", 0)
    data = res.data_cpus if res.data_cpus is not None else 1
    fits = int((total - data) // res.per_trial()) if res.per_trial() > 0 else plan.sweep.search.max_concurrent
    if fits < 1:
        raise ConfigError(f"a trial needs {res.per_trial()} CPUs next to {data} for Ray Data; the cluster has {total}")
    n = min(plan.sweep.search.max_concurrent, fits)
    if n < plan.sweep.search.max_concurrent:
        log(
            f"max_concurrent {plan.sweep.search.max_concurrent} -> {n}: the cluster's {total:g} CPUs hold {n} "
            f"trials of {res.per_trial():g} CPUs next to {data} for Ray Data"
        )
    return n


def _train_shared(plan: SweepPlan, log: Callable[[str], None]) -> None:
    """Train (or reuse) the shared runs, and fill the two-stage teacher directory the trials read."""
    teacher_dir = plan.runs_dir / plan.name / "teacher"  # the two-stage plan's teacher_dir
    for run in plan.shared:
        tags = {
            **run.tracking.tags,
            SWEEP_TAG: plan.name,
            ROLE_TAG: "shared",
            **({_parent_tag(): plan.parent_run_id} if plan.parent_run_id else {}),
        }
        run = dataclasses.replace(run, tracking=dataclasses.replace(run.tracking, tags=tags))
        train_or_reuse(run, log)
        fill_teacher_dir(run.name.removeprefix(f"{plan.name}."), run, teacher_dir)


def _safe_yaml(cfg: Any) -> str:
    """``dump_yaml`` with URL passwords and secret environment values masked (files outlive the run)."""
    return redact_text(dump_yaml(cfg), secret_env_values())


def _check_same_sweep(plan: SweepPlan) -> None:
    saved = plan.root / "sweep.yaml"
    now = _safe_yaml(plan.sweep)
    if saved.exists() and saved.read_text() != now:
        import difflib

        diff = "\n".join(
            list(
                difflib.unified_diff(
                    saved.read_text().splitlines(), now.splitlines(), "started with", "now", lineterm=""
                )
            )[2:12]
        )
        raise ConfigError(
            f"sweep {plan.name} at {plan.root} was started with another configuration; resume it "
            f"with the same file and overrides, or give a new name (--set name=...):\n{diff}"
        )
    plan.root.mkdir(parents=True, exist_ok=True)
    saved.write_text(now)


def run_sweep(sweep: SweepConfig, *, init_ray: bool = True, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) the sweep; see the module docstring."""
    import ray
    from ray import tune

    t0 = time.perf_counter()
    plan = make_plan(sweep)
    exp = from_dict(TwoStageConfig if sweep.job == "two_stage" else TrainRunConfig, plan.experiment)
    if isinstance(exp, TwoStageConfig) and exp.corpus is not None and "://" not in exp.data_root:
        if not corpus_exists(exp.data_root):
            ensure_corpus(dataclasses.replace(exp.corpus, out=exp.data_root), progress=log)
            plan = make_plan(sweep)
    elif isinstance(exp, TrainRunConfig) and exp.corpus is not None:
        ensure_corpus(exp.corpus)
    _check_same_sweep(plan)
    sweep = plan.sweep

    if init_ray and not ray.is_initialized():
        train, data = _local_cpus(plan)
        if not os.environ.get("RAY_ADDRESS"):
            log(
                f"local Ray: {local_cpus(1, train, data)} logical CPUs ({sweep.search.max_concurrent} trials x "
                f"{sweep.resources.per_trial():g} + {data} for Ray Data)"
            )
        start_ray(num_train_workers=1, worker_cpus=train, data_cpus=data)
    ray.data.DataContext.get_current().enable_progress_bars = False

    prepare_local_mlflow(sweep.tracking)
    tracker = make_tracker(sweep.tracking, 0)
    parent = (
        tracker.start(
            run_key=f"sweep.{sweep.name}", run_name=sweep.name, tags={SWEEP_TAG: sweep.name, ROLE_TAG: "parent"}
        )
        if sweep.tracking.enabled
        else None
    )
    try:
        tracker.log_config(sweep)
    except ConfigChangedError:
        pass  # _check_same_sweep already refused a changed sweep; only resolved paths can differ here
    plan.parent_run_id = parent
    status = "FAILED"
    try:
        _train_shared(plan, log)
        trainable = tune.with_resources(tune.with_parameters(_trial, plan=plan), {"CPU": sweep.resources.trial_cpus})
        resumed = tune.Tuner.can_restore(str(plan.tune_dir))
        if resumed:
            log(f"== resuming sweep {sweep.name} from {plan.tune_dir}")
            tuner = tune.Tuner.restore(str(plan.tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            concurrency = _concurrency(plan, log)
            log(
                f"== sweep {sweep.name}: {sweep.search.algorithm} search, {sweep.search.num_samples} sample(s), "
                f"{sweep.scheduler.kind} scheduler, {concurrency} at a time, metric {sweep.metric} ({sweep.mode}), "
                f"{plan.max_reports} reports per full trial"
            )
            tuner = tune.Tuner(
                trainable,
                param_space=search_space(sweep),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode=sweep.mode,
                    num_samples=sweep.search.num_samples,
                    search_alg=search_algorithm(sweep, concurrency),
                    scheduler=scheduler(sweep, plan.max_reports),
                ),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(plan.root), callbacks=[_callback(plan)], verbose=1
                ),
            )
        grid = tuner.fit()
        result = _results(plan, grid, time.perf_counter() - t0, resumed)
        for path in result.artifacts:
            tracker.log_artifact(path, "sweep")
        if result.best:
            tracker.log_metrics({f"best_{sweep.metric}": result.best["metric"]}, step=0)
            tracker.set_tags({"vlforge.best_trial_id": result.best["trial_id"]})
        tracker.log_metrics(
            {
                "seconds": result.seconds,
                "trials": len(result.rows),
                "trials_stopped_early": len(result.stopped_early()),
            },
            step=0,
        )
        status = "KILLED" if result.interrupted else "FINISHED"
        result.parent_run_id = parent
        (plan.root / "summary.txt").write_text(result.summary() + "\n")
        return result
    finally:
        tracker.end(status)


# ----------------------------------------------------------------------------- results


def _results(plan: SweepPlan, grid, seconds: float, resumed: bool) -> SweepResult:
    sweep = plan.sweep
    keys = list(sweep.space)
    sign = 1 if sweep.mode == "max" else -1
    rows = []
    for r in grid:
        trial_id = _trial_id(r)
        history = r.metrics_dataframe
        values = (
            [] if history is None or sweep.metric not in history else [float(v) for v in history[sweep.metric].dropna()]
        )
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({k: r.config.get(k) for k in keys})
        row["metric"] = values[-1] if values else None
        row["best_seen"] = max(values, key=lambda v: sign * v) if values else None
        row["reports"] = len(values)
        ended = _ended(plan, trial_id)
        row["status"] = ended["status"] if ended else (ERROR if r.error is not None else PENDING)
        rows.append(row)
    rows.sort(key=lambda x: x["trial_id"])
    scored = [r for r in rows if r["metric"] is not None and r["status"] != ERROR]
    best = max(scored, key=lambda x: sign * x["metric"]) if scored else None
    if best:
        best = {**best, "metric_name": sweep.metric}
    table = _table(rows, keys, sweep.metric)
    plan.root.mkdir(parents=True, exist_ok=True)
    artifacts = []
    (plan.root / "results.json").write_text(
        json.dumps({"metric": sweep.metric, "mode": sweep.mode, "rows": rows, "best": best}, indent=1, default=str)
    )
    (plan.root / "results.txt").write_text(table + "\n")
    artifacts += [str(plan.root / "results.json"), str(plan.root / "results.txt")]
    best_path = None
    if best:
        best_path = write_best_config(plan, {k: best[k] for k in keys}, best)
        artifacts.append(str(best_path))
    if scored:
        artifacts.append(str(plot_metric_vs_params(rows, sweep, plan.root / "metric_vs_params.png")))
    return SweepResult(
        sweep.name,
        str(plan.root),
        rows,
        best,
        str(best_path) if best_path else None,
        table,
        seconds,
        resumed,
        artifacts=artifacts,
    )


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # A trial that never reported: Tune names its directory <trainable>_<trial id>_<index>_<params>_<time>.
    parts = Path(result.path).name.split("_")
    return "_".join(parts[1:3]) if len(parts) > 2 else Path(result.path).name


def _table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    short = {k: k.split(".")[-1] if sum(x.split(".")[-1] == k.split(".")[-1] for x in keys) == 1 else k for k in keys}
    shown = [
        {
            **{short[k]: r[k] for k in keys},
            **{k: r[k] for k in ("trial_id", "metric", "best_seen", "reports", "status")},
        }
        for r in rows
    ]
    return format_table(
        shown,
        ["trial_id", *short.values(), "metric", "best_seen", "reports", "status"],
        title=f"Sweep: {metric} at each trial's last report (keys: "
        + ", ".join(f"{v} = {k}" for k, v in short.items() if v != k)
        + ")"
        if any(v != k for k, v in short.items())
        else f"Sweep: {metric} at each trial's last report",
    )


def write_best_config(plan: SweepPlan, params: dict[str, Any], best: dict[str, Any]) -> Path:
    """The base experiment with the sweep's overrides and the best trial's values, as a YAML file the
    experiment's job script runs (``python jobs/two_stage.py --config <file>``)."""
    cfg = load_experiment(plan.sweep, params)
    header = (
        f"# Best trial of sweep {plan.name}: {best['trial_id']}, {plan.sweep.metric} = {best['metric']:.4g} "
        f"({plan.sweep.mode}).\n# Base experiment {plan.sweep.experiment}\n# with "
        + " ".join(f"--set {o}" for o in [*plan.sweep.set, *param_overrides(params)])
        + "\n"
    )
    out = plan.root / "best_config.yaml"
    out.write_text(header + _safe_yaml(cfg))
    return out


def plot_metric_vs_params(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> Path:
    """One panel per swept key: each trial's metric at its last report against the key's value;
    trials that ran to the end are filled, early-stopped ones hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    keys = list(sweep.space)
    fig = Figure(figsize=(4.0 * len(keys), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for status, style in (
            (FINISHED, dict(marker="o", color="C0")),
            (STOPPED, dict(marker="o", facecolors="none", edgecolors="C1")),
        ):
            pts = [(r[key], r["metric"]) for r in rows if r["status"] == status and r["metric"] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            ax.scatter(xs if numeric else [str(x) for x in xs], ys, label=status.replace("_", " "), **style)
        if sweep.space[key].type == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        paths = key.split(",")
        ax.set_xlabel(paths[0] + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""), fontsize=8)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.name}: {sweep.metric} at the last report", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
