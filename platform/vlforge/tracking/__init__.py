"""vlforge.tracking: MLflow runs written from rank 0 of a training job.

    from vlforge.tracking import make_tracker, print0

    tracker = make_tracker(cfg.tracking, rank)   # Tracker on rank 0, NullTracker elsewhere
    tracker.start(run_key)                       # same key after a restart: same MLflow run
    tracker.log_config(cfg); tracker.log_environment()
    tracker.log_metrics({"loss": 1.2}, step)     # buffered on disk while the server is down
    print(tracker.end("FINISHED"))               # what was delivered, and what was not

Modules, one concern each:

- ``tracker``: ``Tracker`` (run identity and resume, params, metrics, artifacts) and ``NullTracker``;
- ``store``: the tracking URI, experiments by name (``experiment_id``), runs by run key;
- ``records``: MLflow's naming rules and the records params, tags and metrics become;
- ``delivery`` / ``outbox``: sending records in order, buffering them on disk during outages;
- ``redact``: secret masking; ``provenance``: versions, git commit, host; ``plots``: the loss curve;
- ``logging``: ``print0`` and ``get_rank``.

The model registry, serving and promotion live in ``vlforge.serving``.
"""

from vlforge.tracking.logging import get_rank, print0
from vlforge.tracking.outbox import DeliveryReport
from vlforge.tracking.plots import plot_history
from vlforge.tracking.provenance import environment_info
from vlforge.tracking.redact import REDACTED, is_secret_name, redact
from vlforge.tracking.store import RUN_KEY_TAG, resolve_tracking_uri
from vlforge.tracking.tracker import ConfigChangedError, NullTracker, Tracker, TrackingError, make_tracker

__all__ = [
    "REDACTED",
    "RUN_KEY_TAG",
    "ConfigChangedError",
    "DeliveryReport",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "environment_info",
    "get_rank",
    "is_secret_name",
    "make_tracker",
    "plot_history",
    "print0",
    "redact",
    "resolve_tracking_uri",
]
