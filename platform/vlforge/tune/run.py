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
2. Ray Tune runs the trials: each trial is a driver function (``trial_driver``, a fraction of a CPU)
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
import os
import time
from collections.abc import Callable

from vlforge.config import (
    ConfigError,
    SweepConfig,
    TrainRunConfig,
    TwoStageConfig,
    from_dict,
)
from vlforge.data.corpus import corpus_current, ensure_corpus
from vlforge.data.storage import is_uri
from vlforge.runtime import init_ray as start_ray
from vlforge.runtime import local_cpus
from vlforge.tracking import ConfigChangedError, make_tracker
from vlforge.tracking.store import PARENT_TAG
from vlforge.train.runner import prepare_local_mlflow
from vlforge.tune.plan import ROLE_TAG, SWEEP_TAG, SweepPlan, make_plan
from vlforge.tune.results import SweepResult, collect_results, safe_yaml
from vlforge.tune.trainable import scheduler, search_algorithm, search_space, trial_closer, trial_driver
from vlforge.workflows.two_stage import fill_teacher_dir, train_or_reuse


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
            **({PARENT_TAG: plan.parent_run_id} if plan.parent_run_id else {}),
        }
        run = dataclasses.replace(run, tracking=dataclasses.replace(run.tracking, tags=tags))
        train_or_reuse(run, log)
        fill_teacher_dir(run.name.removeprefix(f"{plan.name}."), run, teacher_dir)


def _check_same_sweep(plan: SweepPlan) -> None:
    saved = plan.root / "sweep.yaml"
    now = safe_yaml(plan.sweep)
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
    t0 = time.perf_counter()
    plan = _prepare(sweep, log)
    sweep = plan.sweep
    _start_ray(plan, init_ray, log)
    tracker, parent = _start_parent_run(sweep)
    plan.parent_run_id = parent
    status = "FAILED"
    try:
        _train_shared(plan, log)
        tuner, resumed = _tuner(plan, log)
        grid = tuner.fit()
        result = collect_results(plan, grid, time.perf_counter() - t0, resumed)
        _log_result(tracker, sweep, result)
        status = "KILLED" if result.interrupted else "FINISHED"
        result.parent_run_id = parent
        (plan.root / "summary.txt").write_text(result.summary() + "\n")
        return result
    finally:
        tracker.end(status)


def _prepare(sweep: SweepConfig, log: Callable[[str], None]) -> SweepPlan:
    """The plan, after building the experiment's corpus when it is missing; a resumed sweep must match."""
    plan = make_plan(sweep)
    exp = from_dict(TwoStageConfig if sweep.job == "two_stage" else TrainRunConfig, plan.experiment)
    if isinstance(exp, TwoStageConfig) and exp.corpus is not None and not is_uri(exp.data_root):
        corpus = dataclasses.replace(exp.corpus, out=exp.data_root)
        if not corpus_current(corpus):  # absent, or built with other parameters
            ensure_corpus(corpus, progress=log)
            plan = make_plan(sweep)
    elif isinstance(exp, TrainRunConfig) and exp.corpus is not None:
        ensure_corpus(exp.corpus)
    _check_same_sweep(plan)
    return plan


def _start_ray(plan: SweepPlan, init_ray: bool, log: Callable[[str], None]) -> None:
    """A local Ray sized for the trials and Ray Data (or the cluster at RAY_ADDRESS), unless one runs."""
    import ray

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


def _start_parent_run(sweep: SweepConfig):
    """(tracker, the MLflow parent run's id or None): the sweep's parent run, started or continued."""
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
    return tracker, parent


def _tuner(plan: SweepPlan, log: Callable[[str], None]):
    """(the Tuner, resumed): Tune's state under ``tune_dir`` restored, else a new Tuner of the sweep."""
    from ray import tune

    sweep = plan.sweep
    trainable = tune.with_resources(tune.with_parameters(trial_driver, plan=plan), {"CPU": sweep.resources.trial_cpus})
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
                name="tune", storage_path=str(plan.root), callbacks=[trial_closer(plan)], verbose=1
            ),
        )
    return tuner, resumed


def _log_result(tracker, sweep: SweepConfig, result: SweepResult) -> None:
    """The result files, the best trial's metric and id, and the sweep's counts on the parent run."""
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
