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

Outages. Metrics, params and tags go out through ``MlflowClient.log_batch``, with the
client's HTTP retries and timeout lowered for these calls (``http_retries``,
``http_timeout_s``) so that an unreachable server costs seconds, not the client's
default minutes. When delivery fails with a connection error, a timeout or a 5xx, the
records are kept, in order, in ``<buffer_dir>/<run_id>.jsonl`` with their original step
and timestamp, and training goes on. Delivery is retried on a later logging call after
an exponential backoff, and at ``end()``; artifacts that could not be uploaded wait as
copies in ``<buffer_dir>/<run_id>.files/``. Redelivery is idempotent: MLflow drops a metric
whose key, step, timestamp and value are already stored, params are re-sent with their
original value, and tags are overwritten. Whatever is still undelivered at ``end()`` stays
in the buffer file (a later ``start`` with the same run key delivers it first) and is
named in the returned ``DeliveryReport``. Errors that retrying cannot fix (4xx, invalid
names) drop the affected batch with an error log and are counted as rejected.

Secrets never reach MLflow: config keys whose name says secret, password, token,
access key, API/private key or credential are masked, values of such environment
variables (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ...) are masked wherever
they appear, and passwords inside URLs (``https://user:pw@host``) are masked, in params,
tags and the ``config.yaml`` artifact alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vlforge
from vlforge.config import TrackingConfig, dump_yaml, flatten, to_dict
from vlforge.tracking.logging import get_rank

log = logging.getLogger("vlforge.tracking")

RUN_KEY_TAG = "vlforge.run_key"
ATTEMPT_TAG = "vlforge.attempt"
PARENT_TAG = "mlflow.parentRunId"
REDACTED = "<redacted>"
STATUSES = ("FINISHED", "FAILED", "KILLED")

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000

_ENV_PACKAGES = ("torch", "ray", "deepspeed", "mlflow", "transformers")


class TrackingError(RuntimeError):
    """The tracking server could not be used for something that cannot wait (creating a run)."""


class ConfigChangedError(ValueError):
    """A resumed run was given a config whose values differ from the params it already has."""


class _Undeliverable(Exception):
    """A buffered record that no retry can deliver (its file is gone)."""


# ----------------------------------------------------------------------------- secrets

_SECRET_NAME = re.compile(
    r"secret|passw(?:or)?d|credential|access_?key|api_?key|private_?key|(?:^|_)(?:session_)?token(?:$|_)"
)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@")
_NOT_SECRET_VALUES = {"true", "false", "none", "null", "yes", "no", "on", "off", "enabled", "disabled"}


def _snake(name: str) -> str:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[\s\-]+", "_", name).lower()


def is_secret_name(key: str) -> bool:
    """True when any part of a dotted/slashed key names a secret (``storage.secret_key``,
    ``hfToken``, ``AWS_SECRET_ACCESS_KEY``); ``tokenizer.max_length`` is not one."""
    return any(_SECRET_NAME.search(_snake(part)) for part in re.split(r"[./]", str(key)))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they hold secrets, longest first."""
    environ = os.environ if environ is None else environ
    values = {
        v
        for k, v in environ.items()
        if is_secret_name(k) and len(v) >= 6 and v.lower() not in _NOT_SECRET_VALUES and not v.isdigit()
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with URL passwords and any of ``secrets`` replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact(obj: Any, secrets: Sequence[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-named keys masked and secret values replaced."""
    secrets = secret_env_values() if secrets is None else secrets

    def walk(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {
                k: (REDACTED if is_secret_name(str(k)) and x not in (None, "", {}, []) else walk(x))
                for k, x in v.items()
            }
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, str):
            return redact_text(v, secrets)
        return v

    return walk(obj)


# ----------------------------------------------------------------------------- helpers


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


def _valid_name(name: str) -> bool:
    if not name or len(name) > MAX_KEY or not re.match(r"^[/\w.\- :]*$", name):
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


def _clean_name(name: str) -> str:
    return re.sub(r"[^/\w.\- :]", "_", str(name))[:MAX_KEY]


def _is_transient(exc: BaseException) -> bool:
    """Errors worth retrying later: connection problems, timeouts, 5xx, 408, 429."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _Undeliverable):
        return False
    if not isinstance(exc, MlflowException):
        return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "requests" in type(exc).__module__
    status = exc.get_http_status_code()
    return status >= 500 or status in (408, 429)


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class DeliveryReport:
    """What reached the tracking server, returned by ``end()``."""

    run_id: str | None
    tracking_uri: str | None
    undelivered: dict[str, int] = field(default_factory=dict)  # by kind: metric / param / tag / artifact
    buffer_path: str | None = None
    rejected: int = 0  # records the server refused (4xx); dropped
    nonfinite_skipped: dict[str, int] = field(default_factory=dict)
    status_set: bool = True
    failed_attempts: int = 0  # deliveries that hit an unreachable server and were retried later

    @property
    def complete(self) -> bool:
        return not self.undelivered and not self.rejected and self.status_set

    def summary(self) -> str:
        parts = ["all tracking data delivered" if self.complete else "tracking data INCOMPLETE"]
        if self.undelivered:
            kinds = ", ".join(f"{n} {k}s" for k, n in sorted(self.undelivered.items()))
            parts.append(
                f"NOT delivered to {self.tracking_uri}: {sum(self.undelivered.values())} records ({kinds}); "
                f"they are kept in {self.buffer_path} and are delivered first when a run with the same "
                f"run key starts again"
            )
        if self.rejected:
            parts.append(f"{self.rejected} records rejected by the server and dropped (see the error log)")
        if not self.status_set:
            parts.append("the final run status was not set (the run still shows RUNNING)")
        if self.nonfinite_skipped:
            skipped = ", ".join(f"{k}: {n}" for k, n in sorted(self.nonfinite_skipped.items()))
            parts.append(f"non-finite metric values skipped ({skipped})")
        return f"MLflow run {self.run_id}: " + "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


class _Outbox:
    """Records waiting for delivery, in order. They are written to the JSONL file only once a
    delivery has failed, so a healthy server costs no disk writes."""

    def __init__(self, path: Path):
        self.path = path
        self.files_dir = path.with_suffix(".files")
        self.records: list[dict] = []
        self._on_disk = 0
        self._front_dropped = False

    def load(self) -> int:
        if not self.path.exists():
            return 0
        loaded = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                loaded.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("tracking buffer %s: line %d is not JSON (cut by a crash?); skipped", self.path, n)
        self.records = loaded + self.records
        self._on_disk = len(loaded)
        return len(loaded)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, records: Iterable[dict]) -> None:
        self.records.extend(records)

    def drop_front(self, n: int) -> None:
        del self.records[:n]
        if self._on_disk:
            self._front_dropped = True
            self._on_disk = max(0, self._on_disk - n)

    def sync(self) -> None:
        """Make the file hold exactly the pending records."""
        if not self.records:
            if self.path.exists():
                self.path.unlink()
            if self.files_dir.exists() and not any(self.files_dir.iterdir()):
                self.files_dir.rmdir()
            self._on_disk, self._front_dropped = 0, False
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._front_dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, self.path)
        elif self._on_disk < len(self.records):
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records[self._on_disk :])
        self._on_disk, self._front_dropped = len(self.records), False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r["kind"]] = out.get(r["kind"], 0) + 1
        return out


# ----------------------------------------------------------------------------- tracker


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
        self.rejected = 0
        self.failed_attempts = 0
        self._http_retries = int(http_retries)
        self._http_timeout_s = int(http_timeout_s)
        self._artifact_timeout_s = int(artifact_timeout_s)
        self._backoff0 = float(backoff_s)
        self._max_backoff = float(max_backoff_s)
        self._backoff = self._backoff0
        self._next_try = 0.0
        self._outage_since: float | None = None
        self._params: dict[str, str] = {}
        self._outbox: _Outbox | None = None
        self._secrets = secret_env_values()
        self._bad_names: set[str] = set()
        self._report: DeliveryReport | None = None
        self._client = None

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self):
        """The ``MlflowClient`` bound to this tracker's tracking URI."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _http(self, timeout_s: int | None = None):
        return _env(
            {
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self._http_retries),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s or self._http_timeout_s),
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
                "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
            }
        )

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker.start(run_key) must be called first")
        if self._report is not None:
            raise RuntimeError(f"MLflow run {self.run_id} has already ended")
        return self.run_id

    def _staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="vlforge-tracking-"))

    def _redact_str(self, value: Any) -> str:
        return redact_text(str(value), self._secrets)

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
        from mlflow.entities import RunStatus

        user_tags = {**self.cfg.tags, **(tags or {})}
        try:
            with self._http():
                self.experiment_id = self._experiment_id()
                existing = self._find_run(run_key)
                if existing is not None:
                    run = existing
                    attempt = int(run.data.tags.get(ATTEMPT_TAG, "1") or 1) + 1
                    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                        self.client.update_run(run.info.run_id, status="RUNNING")
                    self._params = dict(run.data.params)
                    self.resumed = True
                    more = {ATTEMPT_TAG: str(attempt), **user_tags}
                    if parent_run_id:
                        more[PARENT_TAG] = parent_run_id
                    self.run_id = run.info.run_id
                    self._log_now(self._tag_records(more))
                else:
                    create_tags = {**self._context_tags(), **user_tags, RUN_KEY_TAG: run_key, ATTEMPT_TAG: "1"}
                    if parent_run_id:
                        create_tags[PARENT_TAG] = parent_run_id
                    name = run_name or self.cfg.run_name or run_key
                    run = self.client.create_run(
                        self.experiment_id,
                        run_name=self._redact_str(name),
                        tags={r["key"]: r["value"] for r in self._tag_records(create_tags)},
                    )
                    self.run_id = run.info.run_id
        except Exception as exc:
            self.run_id, self.resumed = None, False
            raise TrackingError(
                f"could not start an MLflow run at {self.tracking_uri} (experiment {self.cfg.experiment!r}): "
                f"{exc}. Check the server, or set tracking.enabled=false to train without tracking."
            ) from exc
        self.run_key = run_key
        self._outbox = _Outbox(Path(self.cfg.buffer_dir) / f"{self.run_id}.jsonl")
        waiting = self._outbox.load()
        if waiting:
            self._params.update({r["key"]: r["value"] for r in self._outbox.records if r["kind"] == "param"})
            log.warning(
                "MLflow run %s: %d records buffered by an earlier attempt in %s; delivering them first",
                self.run_id,
                waiting,
                self._outbox.path,
            )
            self._deliver(force=True)
        log.info(
            "MLflow run %s %s (experiment %s, %s)",
            self.run_id,
            "resumed" if self.resumed else "created",
            self.cfg.experiment,
            self.tracking_uri,
        )
        return self.run_id

    def _experiment_id(self) -> str:
        return experiment_id(self.client, self.cfg.experiment)

    def _find_run(self, run_key: str):
        from mlflow.entities import ViewType

        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
            max_results=10,
        )
        if len(runs) > 1:
            log.warning(
                "%d MLflow runs carry run key %r; continuing the oldest, %s", len(runs), run_key, runs[0].info.run_id
            )
        return runs[0] if runs else None

    def _context_tags(self) -> dict[str, str]:
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return {k: v for k, v in resolve_tags().items() if k != "mlflow.runName"}
        except Exception:
            return {}

    def end(self, status: str = "FINISHED", flush_timeout_s: float = 10.0) -> DeliveryReport:
        """Deliver what is buffered (trying for up to ``flush_timeout_s``), set the run's final
        status and return what did not make it. Idempotent."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self._report is not None:
            return self._report
        if self.run_id is None:
            return DeliveryReport(None, self.tracking_uri)
        deadline = time.monotonic() + flush_timeout_s
        while not self._deliver(force=True) and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        status_set = True
        try:
            with self._http():
                self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            status_set = False
            log.error("MLflow run %s: could not set status %s: %s", self.run_id, status, exc)
        outbox = self._outbox
        report = DeliveryReport(
            run_id=self.run_id,
            tracking_uri=self.tracking_uri,
            undelivered=outbox.counts() if outbox else {},
            buffer_path=str(outbox.path) if outbox and len(outbox) else None,
            rejected=self.rejected,
            nonfinite_skipped=dict(self.nonfinite_skipped),
            status_set=status_set,
            failed_attempts=self.failed_attempts,
        )
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

    # ------------------------------------------------------------------ delivery

    def _tag_records(self, tags: Mapping[str, Any]) -> list[dict]:
        out = []
        for k, v in tags.items():
            key = _clean_name(k)
            value = REDACTED if is_secret_name(key) and v not in (None, "") else self._redact_str(v)
            out.append({"kind": "tag", "key": key, "value": value[:MAX_TAG_VALUE]})
        return out

    def _submit(self, records: list[dict]) -> None:
        if not records:
            return
        self._require_run()
        self._outbox.add(records)
        self._deliver()

    def _log_now(self, records: list[dict]) -> None:
        """Send right away, raising on failure (used while starting a run)."""
        for chunk in self._chunks(records):
            self._send(chunk)

    def _chunks(self, records: Sequence[dict]) -> Iterator[list[dict]]:
        chunk: list[dict] = []
        n_params_tags = 0
        for r in records:
            if r["kind"] == "artifact":
                if chunk:
                    yield chunk
                chunk, n_params_tags = [], 0
                yield [r]
                continue
            is_pt = r["kind"] != "metric"
            if len(chunk) >= MAX_ENTITIES_PER_BATCH or (is_pt and n_params_tags >= MAX_PARAMS_TAGS_PER_BATCH):
                yield chunk
                chunk, n_params_tags = [], 0
            chunk.append(r)
            n_params_tags += is_pt
        if chunk:
            yield chunk

    def _send(self, chunk: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if chunk[0]["kind"] == "artifact":
            r = chunk[0]
            path = Path(r["path"])
            if not path.exists():
                raise _Undeliverable(f"artifact {path} no longer exists")
            with self._http(self._artifact_timeout_s):
                self.client.log_artifact(self.run_id, str(path), r.get("artifact_path"))
            if r.get("staged"):
                shutil.rmtree(path.parent, ignore_errors=True)
            return
        metrics = [Metric(r["key"], r["value"], r["ts"], r["step"]) for r in chunk if r["kind"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in chunk if r["kind"] == "param"]
        tags = [RunTag(r["key"], r["value"]) for r in chunk if r["kind"] == "tag"]
        with self._http():
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _deliver(self, force: bool = False) -> bool:
        """Send pending records in order; True when nothing is left pending."""
        box = self._outbox
        if box is None or not len(box):
            return True
        if not force and time.monotonic() < self._next_try:
            box.sync()
            return False
        sent = 0
        for chunk in list(self._chunks(box.records)):
            try:
                self._send(chunk)
            except Exception as exc:
                if _is_transient(exc):
                    self._on_outage(exc)
                    box.sync()
                    return False
                self.rejected += len(chunk)
                first = chunk[0].get("key") or chunk[0].get("path")
                log.error(
                    "MLflow run %s: %d records (from %r) cannot be delivered: %s; dropped",
                    self.run_id,
                    len(chunk),
                    first,
                    exc,
                )
                if chunk[0]["kind"] == "artifact" and chunk[0].get("staged"):
                    shutil.rmtree(Path(chunk[0]["path"]).parent, ignore_errors=True)
            box.drop_front(len(chunk))
            sent += len(chunk)
        box.sync()
        if self._outage_since is not None:
            log.warning(
                "MLflow server at %s reachable again after %.1f s; buffered records delivered",
                self.tracking_uri,
                time.monotonic() - self._outage_since,
            )
        self._outage_since = None
        self._backoff = self._backoff0
        self._next_try = 0.0
        return True

    def _on_outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.failed_attempts += 1
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "MLflow server at %s unreachable (%s); training continues, tracking data is buffered in %s and retried",
                self.tracking_uri,
                str(exc).splitlines()[0][:300],
                self._outbox.path,
            )
        self._next_try = now + self._backoff
        self._backoff = min(self._max_backoff, self._backoff * 2)

    @property
    def pending(self) -> int:
        """Records waiting for delivery (buffered while the server was unreachable)."""
        return len(self._outbox) if self._outbox else 0

    # ------------------------------------------------------------------ params, tags, artifacts

    def log_config(self, cfg: Any) -> dict[str, str]:
        """Log a config dataclass (or mapping) as flattened params plus ``config.yaml``, secrets
        masked. On a resumed run, params already present with the same value are skipped and a
        changed value raises ``ConfigChangedError``. Returns the params as logged."""
        run_id = self._require_run()
        if not (dataclasses.is_dataclass(cfg) or isinstance(cfg, Mapping)):
            raise TypeError(f"log_config takes a config dataclass or a mapping, got {type(cfg).__name__}")
        safe = redact(to_dict(cfg), self._secrets)
        params: dict[str, str] = {}
        for k, v in flatten(safe).items():
            key = _clean_name(k)
            if key != k:
                log.warning("param %r renamed to %r (MLflow names allow alphanumerics, _ - . / : space)", k, key)
            params[key] = str(v)[:MAX_PARAM_VALUE]
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
        self._upload(staging / "config.yaml", None, staged=True)
        return params

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values masked like params; tags can change, unlike params)."""
        self._submit(self._tag_records(tags))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory. If the server is unreachable a copy waits in the buffer
        directory and goes out with the next delivery."""
        self._require_run()
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(src)
        self._upload(src, artifact_path, staged=False)

    def _upload(self, src: Path, artifact_path: str | None, staged: bool) -> None:
        record = {"kind": "artifact", "path": str(src), "artifact_path": artifact_path, "staged": staged}
        if not len(self._outbox):
            try:
                self._send([record])
                return
            except Exception as exc:
                if not _is_transient(exc):
                    if staged:
                        shutil.rmtree(src.parent, ignore_errors=True)
                    raise
                self._on_outage(exc)
        keep = self._outbox.files_dir / uuid.uuid4().hex[:12] / src.name
        keep.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, keep)
        if staged:
            shutil.rmtree(src.parent, ignore_errors=True)
        self._outbox.add([{**record, "path": str(keep), "staged": True}])
        self._outbox.sync()

    # ------------------------------------------------------------------ metrics

    def _metric_name(self, key: str) -> str | None:
        if _valid_name(key):
            return key
        fixed = _clean_name(key)
        if key not in self._bad_names:
            self._bad_names.add(key)
            log.warning(
                "metric name %r is not valid in MLflow; %s",
                key,
                f"logging it as {fixed!r}" if _valid_name(fixed) else "skipping it",
            )
        return fixed if _valid_name(fixed) else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int, force: bool = False) -> None:
        """Log step metrics in one batch. Steps that are not a multiple of ``cfg.log_every`` are
        skipped unless ``force``; NaN/inf values are skipped and counted. Never raises because
        the server is down."""
        if not force and self.cfg.log_every > 1 and step % self.cfg.log_every:
            return
        self._require_run()
        ts = _now_ms()
        records = []
        for key, value in metrics.items():
            name = self._metric_name(str(key))
            if name is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.warning("metric %r at step %d is not a number (%r); skipped", key, step, value)
                continue
            if not math.isfinite(number):
                n = self.nonfinite_skipped[name] = self.nonfinite_skipped.get(name, 0) + 1
                if n == 1 or n % 100 == 0:
                    log.warning(
                        "metric %r is %s at step %d; skipped (%d non-finite values of it so far)", name, number, step, n
                    )
                continue
            records.append({"kind": "metric", "key": name, "value": number, "step": int(step), "ts": ts})
        self._submit(records)

    def log_counters(self, counts: Mapping[str, int], step: int) -> None:
        """Data counters as metrics: ``read`` -> ``data/read``, ``skipped.<reason>`` (or
        ``skipped/<reason>``) -> ``data/skipped/<reason>``, plus their total as ``data/skipped``."""
        metrics: dict[str, float] = {}
        skipped = 0
        for key, n in counts.items():
            m = re.match(r"^skipped[./](.+)$", key)
            if m:
                metrics[f"data/skipped/{m.group(1)}"] = n
                skipped += n
            else:
                metrics[f"data/{key}"] = n
        if any(k.startswith("data/skipped/") for k in metrics):
            metrics.setdefault("data/skipped", skipped)
        self.log_metrics(metrics, step, force=True)

    # ------------------------------------------------------------------ environment and plots

    def log_environment(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Tags ``vlforge.env.*``: Python and package versions, git commit, hostname and, when Ray
        is initialised, the cluster's nodes / CPUs / GPUs; plus ``extra``. Tags rather than params,
        because a resumed run may continue on another host or cluster. Returns the tags."""
        env = environment_info()
        env.update({k: str(v) for k, v in (extra or {}).items()})
        tags = {f"vlforge.env.{k}": v for k, v in env.items()}
        if env.get("git_commit", "unknown") != "unknown":
            tags["mlflow.source.git.commit"] = env["git_commit"]
        self.set_tags(tags)
        return {r["key"]: r["value"] for r in self._tag_records(tags)}

    def log_loss_curve(self, history: Mapping[str, Sequence[tuple[int, float]]], name: str = "loss_curve.png") -> Path:
        """Plot each metric's (step, value) series in its own panel and log the PNG as an artifact."""
        self._require_run()
        staging = self._staging()
        out = staging / name
        plot_history(history, out)
        self._upload(out, None, staged=True)
        return out


def plot_history(history: Mapping[str, Sequence[tuple[int, float]]], out: str | os.PathLike) -> Path:
    """Write a PNG with one panel per metric (value vs step), using matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k, v in history.items() if v] or list(history)[:1]
    n = max(1, len(names))
    fig = Figure(figsize=(7, 2.4 * n), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, names):
        points = [(s, v) for s, v in history.get(key, ()) if math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="png")
    return out


def environment_info() -> dict[str, str]:
    """Versions, git commit, hostname and (when Ray is up) cluster size, as strings."""
    from importlib import metadata

    info = {"python": sys.version.split()[0], "vlforge": vlforge.__version__}
    for pkg in _ENV_PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info.update(_git_info(Path(vlforge.__file__).resolve().parent))
    info["hostname"] = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                resources = ray.cluster_resources()
                info["ray.nodes"] = str(sum(1 for node in ray.nodes() if node.get("Alive")))
                info["ray.cpus"] = f"{resources.get('CPU', 0):g}"
                info["ray.gpus"] = f"{resources.get('GPU', 0):g}"
        except Exception as exc:
            log.debug("could not read the Ray cluster size: %s", exc)
    return info


def _git_info(where: Path) -> dict[str, str]:
    commit = os.environ.get("VLFORGE_GIT_COMMIT")
    if commit:
        return {"git_commit": commit}
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"git_commit": commit, "git_dirty": str(dirty).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown"}


# ----------------------------------------------------------------------------- null tracker


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
