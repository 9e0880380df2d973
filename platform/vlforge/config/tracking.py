"""MLflow tracking settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrackingConfig:
    """MLflow tracking. ``tracking_uri`` None: ``MLFLOW_TRACKING_URI`` if set, else a local
    SQLite store ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``./mlruns``.
    Credentials (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``) only from the environment."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "vlforge"
    run_name: str | None = None
    log_every: int = 1  # steps between metric logs
    buffer_dir: str = "out/mlflow_buffer"  # metrics kept here while the server is unreachable
    tags: dict[str, str] = field(default_factory=dict)
