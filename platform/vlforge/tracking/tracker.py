"""MLflow tracking for training runs: one MLflow run per training job, written by rank 0.

    from vlforge.tracking import make_tracker

    tracker = make_tracker(cfg.tracking, rank)          # NullTracker on rank != 0 or when disabled
    tracker.start(run_key=run_config.name)              # a restart with the same key continues the run
    tracker.log_config(cfg)                             # flattened params + config.yaml, secrets masked
    tracker.log_environment()                           # versions, git commit, host, Ray cluster size
    for step in ...:
        tracker.log_metrics({"loss": loss, "lr": lr}, step)
    tracker.log_counters(counters.snapshot(), step)     # data/read, data/skipped/<reason>
    tracker.log_loss_curve(history)
    report = tracker.end("FINISHED")                    # delivers what is buffered, says what was not

Run identity. ``start(run_key)`` tags the run ``vlforge.run_key``; a later ``start`` with the
same key in the same experiment (for instance a Ray Train run restored after a failure)
finds that run and continues it instead of creating a second one. Params are immutable
in MLflow, so on a resumed run ``log_config`` skips params already logged with the same
value and raises ``ConfigChangedError`` when a value differs.

Outages: records are buffered on disk and delivered later (``vlforge.tracking.delivery``,
``vlforge.tracking.outbox``); ``end()`` returns a ``DeliveryReport`` naming what never arrived.
Secrets never reach MLflow (``vlforge.tracking.redact``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlforge.config import TrackingConfig, dump_yaml, to_dict
from vlforge.tracking.delivery import Delivery
from vlforge.tracking.logging import get_rank
from vlforge.tracking.outbox import DeliveryReport
from vlforge.tracking.plots import plot_history
from vlforge.tracking.provenance import environment_tags, mlflow_context_tags
from vlforge.tracking.records import counter_metrics, metric_records, param_values, tag_records
from vlforge.tracking.redact import redact, redact_text, secret_env_values
from vlforge.tracking.store import (
    ATTEMPT_TAG,
    PARENT_TAG,
    RUN_KEY_TAG,
    experiment_id,
    resolve_tracking_uri,
    runs_with_key,
)

log = logging.getLogger("vlforge.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The tracking server could not be used for something that cannot wait (creating a run)."""


class ConfigChangedError(ValueError):
    """A resumed run was given a config whose values differ from the params it already has."""


class Tracker:
    """An MLflow run written from global rank 0. See the module docstring for the flow."""

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        http_retries: int = 0,
        http_timeout_s: int = 5,
        artifact_timeout_s: int = 120,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        self.cfg = cfg
        self.tracking_uri = resolve_tracking_uri(cfg)
        self.run_id: str | None = None
        self.run_key: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self.nonfinite_skipped: dict[str, int] = {}
        self._delivery = Delivery(
            self.tracking_uri,
            http_retries=http_retries,
            http_timeout_s=http_timeout_s,
            artifact_timeout_s=artifact_timeout_s,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )
        self._params: dict[str, str] = {}
        self._secrets = secret_env_values()
        self._bad_names: set[str] = set()
        self._report: DeliveryReport | None = None

    @property
    def client(self):
        """The ``MlflowClient`` bound to this tracker's tracking URI."""
        return self._delivery.client

    @property
    def pending(self) -> int:
        """Records waiting for delivery (buffered while the server was unreachable)."""
        return self._delivery.pending

    @property
    def failed_attempts(self) -> int:
        """Deliveries that hit an unreachable server and were retried later."""
        return self._delivery.failed_attempts

    @property
    def rejected(self) -> int:
        """Records the server refused (4xx) and that were dropped."""
        return self._delivery.rejected

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker.start(run_key) must be called first")
        if self._report is not None:
            raise RuntimeError(f"MLflow run {self.run_id} has already ended")
        return self.run_id

    def _staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="vlforge-tracking-"))

    def _tags(self, tags: Mapping[str, Any]) -> list[dict]:
        return tag_records(tags, self._secrets)

    def _submit(self, records: list[dict]) -> None:
        if records:
            self._require_run()
            self._delivery.submit(records)

    # ------------------------------------------------------------------ run lifecycle

    def start(
        self,
        run_key: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Create the run, or continue the one tagged ``vlforge.run_key == run_key``; returns its id."""
        if self.run_id is not None:
            raise RuntimeError(f"tracker already started run {self.run_id}")
        if not run_key or "'" in run_key or "`" in run_key:
            raise ValueError(f"run_key must be non-empty and contain no quotes or backticks, got {run_key!r}")
        user_tags = {**self.cfg.tags, **(tags or {})}
        try:
            with self._delivery.http():
                self.experiment_id = experiment_id(self.client, self.cfg.experiment)
                existing = self._find_run(run_key)
                if existing is not None:
                    self._resume(existing, user_tags, parent_run_id)
                else:
                    self._create(run_key, run_name, user_tags, parent_run_id)
        except Exception as exc:
            self.run_id = self._delivery.run_id = None
            self.resumed = False
            raise TrackingError(
                f"could not start an MLflow run at {self.tracking_uri} (experiment {self.cfg.experiment!r}): "
                f"{exc}. Check the server, or set tracking.enabled=false to train without tracking."
            ) from exc
        self.run_key = run_key
        earlier = self._delivery.open(self.cfg.buffer_dir)
        self._params.update({r["key"]: r["value"] for r in earlier if r["kind"] == "param"})
        log.info(
            "MLflow run %s %s (experiment %s, %s)",
            self.run_id,
            "resumed" if self.resumed else "created",
            self.cfg.experiment,
            self.tracking_uri,
        )
        return self.run_id

    def _resume(self, run, user_tags: Mapping[str, Any], parent_run_id: str | None) -> None:
        from mlflow.entities import RunStatus

        attempt = int(run.data.tags.get(ATTEMPT_TAG, "1") or 1) + 1
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            self.client.update_run(run.info.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        self.resumed = True
        more = {ATTEMPT_TAG: str(attempt), **user_tags}
        if parent_run_id:
            more[PARENT_TAG] = parent_run_id
        self.run_id = self._delivery.run_id = run.info.run_id
        self._delivery.send_now(self._tags(more))

    def _create(
        self, run_key: str, run_name: str | None, user_tags: Mapping[str, Any], parent_run_id: str | None
    ) -> None:
        create_tags = {**mlflow_context_tags(), **user_tags, RUN_KEY_TAG: run_key, ATTEMPT_TAG: "1"}
        if parent_run_id:
            create_tags[PARENT_TAG] = parent_run_id
        name = run_name or self.cfg.run_name or run_key
        run = self.client.create_run(
            self.experiment_id,
            run_name=redact_text(str(name), self._secrets),
            tags={r["key"]: r["value"] for r in self._tags(create_tags)},
        )
        self.run_id = self._delivery.run_id = run.info.run_id

    def _find_run(self, run_key: str):
        runs = runs_with_key(self.client, self.experiment_id, run_key)
        if len(runs) > 1:
            log.warning(
                "%d MLflow runs carry run key %r; continuing the oldest, %s", len(runs), run_key, runs[0].info.run_id
            )
        return runs[0] if runs else None

    def end(self, status: str = "FINISHED", flush_timeout_s: float = 10.0) -> DeliveryReport:
        """Deliver what is buffered (trying for up to ``flush_timeout_s``), set the run's final
        status and return what did not make it. Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._report is not None:
            return self._report
        if self.run_id is None:
            return DeliveryReport(None, self.tracking_uri)
        self._delivery.flush(flush_timeout_s)
        status_set = True
        try:
            with self._delivery.http():
                self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            status_set = False
            log.error("MLflow run %s: could not set status %s: %s", self.run_id, status, exc)
        report = self._delivery.report(status_set=status_set, nonfinite_skipped=self.nonfinite_skipped)
        (log.info if report.complete else log.warning)("%s", report.summary())
        self._report = report
        return report

    def close(self) -> DeliveryReport:
        """``end("FINISHED")`` unless the run already ended; returns the delivery report."""
        return self.end("FINISHED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # ------------------------------------------------------------------ params, tags, artifacts

    def log_config(self, cfg: Any) -> dict[str, str]:
        """Log a config dataclass (or mapping) as flattened params plus ``config.yaml``, secrets
        masked. On a resumed run, params already present with the same value are skipped and a
        changed value raises ``ConfigChangedError``. Returns the params as logged."""
        run_id = self._require_run()
        if not (dataclasses.is_dataclass(cfg) or isinstance(cfg, Mapping)):
            raise TypeError(f"log_config takes a config dataclass or a mapping, got {type(cfg).__name__}")
        safe = redact(to_dict(cfg), self._secrets)
        params = param_values(safe)
        changed = {k: (self._params[k], v) for k, v in params.items() if k in self._params and self._params[k] != v}
        if changed:
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ConfigChangedError(
                f"MLflow run {run_id} (run key {self.run_key!r}) already has these params with other values, "
                f"and MLflow params cannot change:\n{lines}\n"
                f"Resume with the original config, or start a new run with a different run key."
            )
        new = {k: v for k, v in params.items() if k not in self._params}
        self._params.update(new)
        self._submit([{"kind": "param", "key": k, "value": v} for k, v in new.items()])
        staging = self._staging()
        (staging / "config.yaml").write_text(dump_yaml(safe))
        self._delivery.upload(staging / "config.yaml", None, staged=True)
        return params

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values masked like params; tags can change, unlike params)."""
        self._submit(self._tags(tags))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory. If the server is unreachable a copy waits in the buffer
        directory and goes out with the next delivery."""
        self._require_run()
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(src)
        self._delivery.upload(src, artifact_path, staged=False)

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, metrics: Mapping[str, Any], step: int, force: bool = False) -> None:
        """Log step metrics in one batch. Steps that are not a multiple of ``cfg.log_every`` are
        skipped unless ``force``; NaN/inf values are skipped and counted. Never raises because
        the server is down."""
        if not force and self.cfg.log_every > 1 and step % self.cfg.log_every:
            return
        self._require_run()
        ts = int(time.time() * 1000)
        records = metric_records(metrics, step, ts, bad_names=self._bad_names, nonfinite_skipped=self.nonfinite_skipped)
        self._submit(records)

    def log_counters(self, counts: Mapping[str, int], step: int) -> None:
        """Data counters as metrics (``vlforge.tracking.records.counter_metrics``), at every step."""
        self.log_metrics(counter_metrics(counts), step, force=True)

    # ------------------------------------------------------------------ environment and plots

    def log_environment(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Tags ``vlforge.env.*``: Python and package versions, git commit, hostname and, when Ray
        is initialised, the cluster's nodes / CPUs / GPUs; plus ``extra``. Tags rather than params,
        because a resumed run may continue on another host or cluster. Returns the tags."""
        tags = environment_tags(extra)
        self.set_tags(tags)
        return {r["key"]: r["value"] for r in self._tags(tags)}

    def log_loss_curve(self, history: Mapping[str, Sequence[tuple[int, float]]], name: str = "loss_curve.png") -> Path:
        """Plot each metric's (step, value) series in its own panel and log the PNG as an artifact."""
        self._require_run()
        out = self._staging() / name
        plot_history(history, out)
        self._delivery.upload(out, None, staged=True)
        return out


class NullTracker:
    """The tracker for ranks other than 0 and for ``tracking.enabled: false``: every method
    accepts the same arguments as ``Tracker``'s and does nothing."""

    run_id = None
    run_key = None
    resumed = False
    pending = 0

    def __init__(self, cfg: TrackingConfig | None = None):
        self.cfg = cfg

    def start(
        self,
        run_key: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        return None

    def log_config(self, cfg: Any) -> dict[str, str]:
        return {}

    def log_metrics(self, metrics: Mapping[str, Any], step: int, force: bool = False) -> None:
        return None

    def log_counters(self, counts: Mapping[str, int], step: int) -> None:
        return None

    def log_environment(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        return {}

    def log_loss_curve(self, history: Mapping[str, Sequence[tuple[int, float]]], name: str = "loss_curve.png") -> None:
        return None

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def end(self, status: str = "FINISHED", flush_timeout_s: float = 10.0) -> DeliveryReport:
        return DeliveryReport(None, None)

    def close(self) -> DeliveryReport:
        return self.end()

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


def make_tracker(cfg: TrackingConfig, rank: int | None = None, **kwargs: Any) -> Tracker | NullTracker:
    """A ``Tracker`` on global rank 0 with tracking enabled, else a ``NullTracker``.
    ``rank`` None: taken from ``RANK`` / the Ray Train context (see ``get_rank``)."""
    rank = get_rank() if rank is None else rank
    if rank != 0 or not cfg.enabled:
        return NullTracker(cfg)
    return Tracker(cfg, **kwargs)
