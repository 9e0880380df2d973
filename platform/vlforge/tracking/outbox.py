"""The offline outbox: tracking records waiting for an unreachable server, and what ``end()`` reports.

While the server cannot be reached, a run's records are kept, in order, in
``<buffer_dir>/<run_id>.jsonl`` with their original step and timestamp; artifacts that could not
be uploaded wait as copies in ``<buffer_dir>/<run_id>.files/``. Whatever is still undelivered when
the run ends stays there (a later ``start`` with the same run key delivers it first) and is named
in the ``DeliveryReport``. Sending and retrying is ``vlforge.tracking.delivery``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("vlforge.tracking")


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


class Outbox:
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
