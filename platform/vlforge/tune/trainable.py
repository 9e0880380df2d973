"""The Ray Tune side of a sweep: the search space, searcher and scheduler a ``SweepConfig`` names,
the trainable (``_trial``: one Ray Train run per trial) and the driver callback that records how
each trial ended (``trials/<id>.json`` under the sweep's root, and its MLflow child run).

    from vlforge.tune.trainable import scheduler, search_algorithm, search_space
    tune.Tuner(trainable, param_space=search_space(sweep), ...)   # as vlforge.tune.run does
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from vlforge.config import SweepConfig
from vlforge.tracking.store import find_experiment, runs_with_key
from vlforge.train.runner import is_finished, run_training
from vlforge.tune.plan import STATUS_TAG, SweepPlan

FINISHED, STOPPED, ERROR, PENDING = "finished", "stopped_early", "error", "unfinished"


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


def trial_driver(params: dict[str, Any], plan: SweepPlan) -> None:
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


def recorded_end(plan: SweepPlan, trial_id: str) -> dict[str, Any] | None:
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


def trial_closer(plan: SweepPlan):
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
