"""Where runs live and how they are found: the tracking URI, experiments by name, runs by run key.

Every part of vlforge that needs an MLflow experiment or a run by its ``vlforge.run_key`` tag goes
through here: ``experiment_id`` (get or create), ``find_experiment`` (get, never create) and
``runs_with_key``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from vlforge.config import TrackingConfig

log = logging.getLogger("vlforge.tracking")

RUN_KEY_TAG = "vlforge.run_key"
ATTEMPT_TAG = "vlforge.attempt"
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block; restore the previous URI and
    ``MLFLOW_TRACKING_URI`` exactly afterwards (``mlflow.set_tracking_uri`` rewrites the variable)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = tracking_utils._tracking_uri
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def experiment_id(client, name: str, artifact_location: str | None = None) -> str:
    """The id of MLflow experiment ``name``: created when absent (``artifact_location`` applies only
    then; one created concurrently by another process is found), restored with a warning when deleted.
    Every part of vlforge that logs into an experiment by name goes through here."""
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == LifecycleStage.DELETED:
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_experiment(client, name: str) -> str | None:
    """The id of MLflow experiment ``name`` when it exists, else None; nothing is created or restored
    (for readers, such as a sweep driver closing its trials' runs)."""
    exp = client.get_experiment_by_name(name)
    return None if exp is None else exp.experiment_id


def runs_with_key(client, experiment: str, run_key: str, max_results: int = 10) -> list:
    """The active runs of experiment id ``experiment`` tagged ``vlforge.run_key == run_key``, oldest
    first. Run keys hold no quotes or backticks (``Tracker.start`` refuses them)."""
    from mlflow.entities import ViewType

    return client.search_runs(
        [experiment],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time ASC"],
        max_results=max_results,
    )
