"""Delivery of a run's tracking records to the MLflow server, surviving outages.

Metrics, params and tags go out through ``MlflowClient.log_batch``, with the client's HTTP
retries and timeout lowered for these calls (``http_retries``, ``http_timeout_s``) so that an
unreachable server costs seconds, not the client's default minutes. When delivery fails with a
connection error, a timeout or a 5xx, the records are kept, in order, in the run's outbox
(``vlforge.tracking.outbox``) and training goes on. Delivery is retried on a later logging call
after an exponential backoff, and when the run ends. Redelivery is idempotent: MLflow drops a
metric whose key, step, timestamp and value are already stored, params are re-sent with their
original value, and tags are overwritten. Errors that retrying cannot fix (4xx, invalid names)
drop the affected batch with an error log and are counted as rejected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vlforge.tracking.outbox import DeliveryReport, Outbox

log = logging.getLogger("vlforge.tracking")

MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000


class _Undeliverable(Exception):
    """A buffered record that no retry can deliver (its file is gone)."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying later: connection problems, timeouts, 5xx, 408, 429."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, _Undeliverable):
        return False
    if not isinstance(exc, MlflowException):
        return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "requests" in type(exc).__module__
    status = exc.get_http_status_code()
    return status >= 500 or status in (408, 429)


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


def chunks(records: Sequence[dict]) -> Iterator[list[dict]]:
    """Records in ``log_batch``-sized chunks, in order; each artifact a chunk of its own."""
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


class Delivery:
    """Sends the records of run ``run_id`` in order; keeps them in an ``Outbox`` while the server
    is unreachable and retries after a backoff. Owns the ``MlflowClient`` (``client``)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        http_retries: int = 0,
        http_timeout_s: int = 5,
        artifact_timeout_s: int = 120,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self.outbox: Outbox | None = None
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
        self._client = None

    @property
    def client(self):
        """The ``MlflowClient`` bound to the tracking URI."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def http(self, timeout_s: int | None = None):
        """A block in which the client's HTTP calls use this delivery's retries and timeout."""
        return _env(
            {
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self._http_retries),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s or self._http_timeout_s),
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
                "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
            }
        )

    def open(self, buffer_dir: str | os.PathLike) -> list[dict]:
        """Open ``<buffer_dir>/<run_id>.jsonl`` and deliver what an earlier attempt left there
        (returned, so the caller knows its params)."""
        self.outbox = Outbox(Path(buffer_dir) / f"{self.run_id}.jsonl")
        waiting = self.outbox.load()
        earlier = list(self.outbox.records)
        if waiting:
            log.warning(
                "MLflow run %s: %d records buffered by an earlier attempt in %s; delivering them first",
                self.run_id,
                waiting,
                self.outbox.path,
            )
            self.deliver(force=True)
        return earlier

    @property
    def pending(self) -> int:
        """Records waiting for delivery (buffered while the server was unreachable)."""
        return len(self.outbox) if self.outbox else 0

    def send_now(self, records: list[dict]) -> None:
        """Send right away, raising on failure (used while starting a run)."""
        for chunk in chunks(records):
            self._send(chunk)

    def submit(self, records: list[dict]) -> None:
        """Queue records behind those pending and try to deliver (unless backing off)."""
        self.outbox.add(records)
        self.deliver()

    def upload(self, src: Path, artifact_path: str | None, staged: bool) -> None:
        """Upload a file or directory; a copy waits in the outbox when the server is unreachable.
        ``staged``: ``src`` sits alone in a temporary directory, removed once it is sent or copied."""
        record = {"kind": "artifact", "path": str(src), "artifact_path": artifact_path, "staged": staged}
        if not len(self.outbox):
            try:
                self._send([record])
                return
            except Exception as exc:
                if not is_transient(exc):
                    if staged:
                        shutil.rmtree(src.parent, ignore_errors=True)
                    raise
                self._on_outage(exc)
        keep = self.outbox.files_dir / uuid.uuid4().hex[:12] / src.name
        keep.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, keep)
        if staged:
            shutil.rmtree(src.parent, ignore_errors=True)
        self.outbox.add([{**record, "path": str(keep), "staged": True}])
        self.outbox.sync()

    def flush(self, timeout_s: float) -> bool:
        """Try to deliver everything pending for up to ``timeout_s``; True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        while not self.deliver(force=True):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return True

    def report(self, *, status_set: bool, nonfinite_skipped: Mapping[str, int]) -> DeliveryReport:
        box = self.outbox
        return DeliveryReport(
            run_id=self.run_id,
            tracking_uri=self.tracking_uri,
            undelivered=box.counts() if box else {},
            buffer_path=str(box.path) if box and len(box) else None,
            rejected=self.rejected,
            nonfinite_skipped=dict(nonfinite_skipped),
            status_set=status_set,
            failed_attempts=self.failed_attempts,
        )

    def _send(self, chunk: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if chunk[0]["kind"] == "artifact":
            r = chunk[0]
            path = Path(r["path"])
            if not path.exists():
                raise _Undeliverable(f"artifact {path} no longer exists")
            with self.http(self._artifact_timeout_s):
                self.client.log_artifact(self.run_id, str(path), r.get("artifact_path"))
            if r.get("staged"):
                shutil.rmtree(path.parent, ignore_errors=True)
            return
        metrics = [Metric(r["key"], r["value"], r["ts"], r["step"]) for r in chunk if r["kind"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in chunk if r["kind"] == "param"]
        tags = [RunTag(r["key"], r["value"]) for r in chunk if r["kind"] == "tag"]
        with self.http():
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def deliver(self, force: bool = False) -> bool:
        """Send pending records in order; True when nothing is left pending."""
        box = self.outbox
        if box is None or not len(box):
            return True
        if not force and time.monotonic() < self._next_try:
            box.sync()
            return False
        for chunk in list(chunks(box.records)):
            try:
                self._send(chunk)
            except Exception as exc:
                if is_transient(exc):
                    self._on_outage(exc)
                    box.sync()
                    return False
                self._reject(chunk, exc)
            box.drop_front(len(chunk))
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

    def _reject(self, chunk: list[dict], exc: BaseException) -> None:
        self.rejected += len(chunk)
        first = chunk[0].get("key") or chunk[0].get("path")
        log.error(
            "MLflow run %s: %d records (from %r) cannot be delivered: %s; dropped", self.run_id, len(chunk), first, exc
        )
        if chunk[0]["kind"] == "artifact" and chunk[0].get("staged"):
            shutil.rmtree(Path(chunk[0]["path"]).parent, ignore_errors=True)

    def _on_outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.failed_attempts += 1
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "MLflow server at %s unreachable (%s); training continues, tracking data is buffered in %s and retried",
                self.tracking_uri,
                str(exc).splitlines()[0][:300],
                self.outbox.path,
            )
        self._next_try = now + self._backoff
        self._backoff = min(self._max_backoff, self._backoff * 2)
