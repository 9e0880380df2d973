"""vlforge.tracking: MLflow runs written from rank 0 of a training job.

    from vlforge.tracking import make_tracker, print0

    tracker = make_tracker(cfg.tracking, rank)   # Tracker on rank 0, NullTracker elsewhere
    tracker.start(run_key)                       # same key after a restart: same MLflow run
    tracker.log_config(cfg); tracker.log_environment()
    tracker.log_metrics({"loss": 1.2}, step)     # buffered on disk while the server is down
    print(tracker.end("FINISHED"))               # what was delivered, and what was not

See ``vlforge.tracking.mlflow_tracker`` for run identity, outage handling and secret masking.
"""

from vlforge.tracking.logging import get_rank, print0
from vlforge.tracking.mlflow_tracker import (
    REDACTED,
    RUN_KEY_TAG,
    ConfigChangedError,
    DeliveryReport,
    NullTracker,
    Tracker,
    TrackingError,
    environment_info,
    is_secret_name,
    make_tracker,
    plot_history,
    redact,
    resolve_tracking_uri,
)

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
