"""Tracking records and MLflow's naming rules: what the tracker turns params, tags and metrics into.

A record is a JSON-able dict with a ``kind``: ``{"kind": "metric", "key", "value", "step", "ts"}``,
``{"kind": "param", "key", "value"}``, ``{"kind": "tag", "key", "value"}`` or ``{"kind": "artifact",
"path", "artifact_path", "staged"}``. Records go out in order (``vlforge.tracking.delivery``) and wait
in the outbox (``vlforge.tracking.outbox``) while the server is unreachable. Names are made valid for
MLflow here and values masked with ``vlforge.tracking.redact``.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlforge.config import flatten
from vlforge.tracking.redact import REDACTED, is_secret_name, redact_text

log = logging.getLogger("vlforge.tracking")

MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250


def valid_name(name: str) -> bool:
    """True when MLflow accepts ``name`` as a metric, param or tag key."""
    if not name or len(name) > MAX_KEY or not re.match(r"^[/\w.\- :]*$", name):
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


def clean_name(name: str) -> str:
    """``name`` with the characters MLflow refuses replaced by ``_``, cut to ``MAX_KEY``."""
    return re.sub(r"[^/\w.\- :]", "_", str(name))[:MAX_KEY]


def tag_records(tags: Mapping[str, Any], secrets: Sequence[str]) -> list[dict]:
    """Tag records: keys cleaned, secret-named keys masked, ``secrets`` and URL passwords masked in values."""
    out = []
    for k, v in tags.items():
        key = clean_name(k)
        value = REDACTED if is_secret_name(key) and v not in (None, "") else redact_text(str(v), secrets)
        out.append({"kind": "tag", "key": key, "value": value[:MAX_TAG_VALUE]})
    return out


def param_values(safe: Mapping[str, Any]) -> dict[str, str]:
    """A redacted nested config flattened into MLflow params (``a.b.0``), names cleaned, values cut."""
    params: dict[str, str] = {}
    for k, v in flatten(safe).items():
        key = clean_name(k)
        if key != k:
            log.warning("param %r renamed to %r (MLflow names allow alphanumerics, _ - . / : space)", k, key)
        params[key] = str(v)[:MAX_PARAM_VALUE]
    return params


def _metric_name(key: str, bad_names: set[str]) -> str | None:
    if valid_name(key):
        return key
    fixed = clean_name(key)
    if key not in bad_names:
        bad_names.add(key)
        log.warning(
            "metric name %r is not valid in MLflow; %s",
            key,
            f"logging it as {fixed!r}" if valid_name(fixed) else "skipping it",
        )
    return fixed if valid_name(fixed) else None


def metric_records(
    metrics: Mapping[str, Any], step: int, ts: int, *, bad_names: set[str], nonfinite_skipped: dict[str, int]
) -> list[dict]:
    """Metric records for one step. Invalid names are cleaned (warned once each, in ``bad_names``);
    values that are not numbers are skipped; NaN/inf are skipped and counted in ``nonfinite_skipped``."""
    records = []
    for key, value in metrics.items():
        name = _metric_name(str(key), bad_names)
        if name is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            log.warning("metric %r at step %d is not a number (%r); skipped", key, step, value)
            continue
        if not math.isfinite(number):
            n = nonfinite_skipped[name] = nonfinite_skipped.get(name, 0) + 1
            if n == 1 or n % 100 == 0:
                log.warning(
                    "metric %r is %s at step %d; skipped (%d non-finite values of it so far)", name, number, step, n
                )
            continue
        records.append({"kind": "metric", "key": name, "value": number, "step": int(step), "ts": ts})
    return records


def counter_metrics(counts: Mapping[str, int]) -> dict[str, float]:
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
    return metrics
