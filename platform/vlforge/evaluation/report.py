"""Evaluation reports: fixed-width text tables, bar charts of metrics, latency plots.

    print(format_table(rows, ["model", "i2t_r1", "t2i_r1", "rmean"], title="retrieval, scenes/test"))
    plot_results(rows, ["i2t_r1", "t2i_r1", "acc"], "out/results.png")    # one bar group per metric
    plot_latency(latency_rows, "out/latency.png")                        # log-log time vs N
    mean, std = mean_std([71.0, 73.5, 72.0])                              # over seeds
    lo, hi = wilson_interval(48.8, 1050)                                  # binomial 95 % interval, percent
    rows = with_intervals(rows, {"nlvr2_acc": "nlvr2_n", "i2t_r1": "n_images"})   # "48.8 ±3.0" cells

Plots draw on a ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot, so they work without a display and leave pyplot's global state alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "format_table",
    "mean_std",
    "plot_latency",
    "plot_results",
    "type_table",
    "wilson_interval",
    "with_intervals",
    "CAPTION_METRIC_COLUMNS",
    "HEADLINE_METRICS",
    "INTERVAL_COUNTS",
    "INTERVAL_NOTE",
    "METRIC_COLUMNS",
    "TYPE_ACC_PREFIX",
    "TYPE_N_PREFIX",
]

MISSING = "-"
# The metric columns of a results table, in order: pair and VQA accuracy, then retrieval recalls.
METRIC_COLUMNS = (
    "nlvr2_acc",
    "vqa_acc",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "rmean",
)
CAPTION_METRIC_COLUMNS = ("bleu4", "rouge_l", "cider", "meteor", "objects_named", "objects_recall")  # captioning models
# Row keys of VQA accuracy by question type: vqa_acc.<type> (percent) and vqa_n.<type> (its sample count).
TYPE_ACC_PREFIX, TYPE_N_PREFIX = "vqa_acc.", "vqa_n."
HEADLINE_METRICS = ("nlvr2_acc", "vqa_acc", "rmean")  # one figure per task, for the results bar chart
LATENCY_SERIES = (
    ("teacher_s", "fusion teacher (ITM on all pairs)"),
    ("student_s", "dual-encoder student"),
    ("student_cached_s", "student, cached image embeddings"),
)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _decimals(values: list[Any]) -> int:
    """3 decimals for a column of small floats (seconds, ratios below 10), 1 for larger ones (percent)."""
    floats = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    return 1 if floats and max(floats) >= 10 else 3


def _cell(v: Any, decimals: int) -> str:
    if _is_missing(v):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and math.isfinite(v) and abs(v) < 10**-decimals:
            return f"{v:.2e}"
        return f"{v:.{decimals}f}"
    return str(v)


def format_table(rows: list[dict], columns: list[str], title: str | None = None, decimals: int | None = None) -> str:
    """Rows as a fixed-width table; numbers right-aligned, text left-aligned, missing values as ``-``.

    Floats get ``decimals`` decimals, or when None 1 in a column whose largest float is
    >= 10 and 3 otherwise (tiny non-zero values in scientific notation).
    """
    numeric = {c: all(_is_missing(r.get(c)) or isinstance(r.get(c), (int, float)) for r in rows) for c in columns}
    cells = []
    for c in columns:
        d = decimals if decimals is not None else _decimals([r.get(c) for r in rows])
        cells.append([_cell(r.get(c), d) for r in rows])
    widths = [max([len(c)] + [len(x) for x in col]) for c, col in zip(columns, cells)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[c] else v.ljust(w) for c, v, w in zip(columns, values, widths)]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(columns))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line([col[i] for col in cells]) for i in range(len(rows)))
    return "\n".join(out)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_results(rows: list[dict], metrics: list[str], path: str | os.PathLike, label_key: str = "model") -> Path:
    """Grouped bar chart PNG: one group per metric, one bar per row (labelled by ``row[label_key]``)."""
    if not rows or not metrics:
        raise ValueError("plot_results needs at least one row and one metric")
    fig = _figure(max(5.0, 1.2 * len(metrics) * max(1, len(rows)) / 2 + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(metrics))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        heights = [np.nan if _is_missing(row.get(m)) else float(row[m]) for m in metrics]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=str(row.get(label_key, f"row {i}")))
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.1f}" for h in heights], fontsize=7)
    ax.set_xticks(x, metrics)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_caption_examples(examples: list[dict], path: str | os.PathLike, columns: int = 4) -> Path:
    """PNG of example images, each titled with its generated caption (and its first reference below):
    ``examples`` rows carry ``image`` ([H, W, 3] uint8), ``caption`` and ``references``."""
    import textwrap

    if not examples:
        raise ValueError("plot_caption_examples needs at least one example")
    cols = min(columns, len(examples))
    rows = math.ceil(len(examples) / cols)
    fig = _figure(3.0 * cols, 3.4 * rows)
    for i, ex in enumerate(examples):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(ex["image"])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(textwrap.fill(f"model: {ex['caption'] or '(empty)'}", 34), fontsize=8, loc="left")
        refs = ex.get("references") or []
        if refs:
            ax.set_xlabel(textwrap.fill(f"ref: {refs[0]}", 34), fontsize=7, loc="left", color="0.35")
    return _save(fig, path)


def plot_latency(rows: list[dict], path: str | os.PathLike) -> Path:
    """Retrieval time against N on log-log axes, one line per method; extrapolated teacher points hollow."""
    if not rows:
        raise ValueError("plot_latency needs at least one row")
    rows = sorted(rows, key=lambda r: r["n"])
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in LATENCY_SERIES:
        pts = [(r["n"], r[key]) for r in rows if not _is_missing(r.get(key)) and r[key] > 0]
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if key == "teacher_s":
            extra = [(r["n"], r[key]) for r in rows if r.get("teacher_extrapolated") and r.get(key)]
            if extra:
                ax.plot(
                    [p[0] for p in extra],
                    [p[1] for p in extra],
                    "o",
                    markersize=9,
                    markerfacecolor="white",
                    color=line.get_color(),
                    label="teacher, extrapolated",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N images = N texts")
    ax.set_ylabel("seconds to score N x N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std


# metric -> the row key of its sample count (rows of evaluate_retrieval / accuracy as the jobs build them)
INTERVAL_COUNTS = {
    "nlvr2_acc": "nlvr2_n",
    "vqa_acc": "vqa_n",
    "i2t_r1": "n_images",
    "t2i_r1": "n_texts",
    "objects_named": "objects_n",
    "objects_recall": "objects_total",
}

INTERVAL_NOTE = (
    "± = half the width of the Wilson 95 % interval of a binomial proportion over the split's evaluation samples"
)


def wilson_interval(percent: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (percent) of a proportion ``percent`` observed over ``n`` trials."""
    if n < 1:
        raise ValueError("wilson_interval needs n >= 1")
    p = percent / 100.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def type_table(rows: list[dict[str, Any]]) -> str:
    """The per-question-type VQA accuracies of ``rows`` (keys ``vqa_acc.<type>``, counts ``vqa_n.<type>``)
    as a table with Wilson intervals, one column per type; "" when no row has any."""
    prefix = TYPE_ACC_PREFIX
    cols = sorted({k for r in rows for k in r if k.startswith(prefix)})
    if not cols:
        return ""
    counts = {c: TYPE_N_PREFIX + c.removeprefix(prefix) for c in cols}
    lead = [c for c in ("model", "split", "shards") if any(c in r for r in rows)]
    table = format_table(
        with_intervals(rows, counts),
        [*lead, *cols],
        decimals=1,
        title="VQA accuracy by question type (percent)",
    )
    n: dict[str, dict[str, int]] = {}  # split -> type -> count (the splits' sizes differ)
    for r in rows:
        for c in cols:
            if isinstance(r.get(counts[c]), int):
                n.setdefault(str(r.get("split", "")), {})[c.removeprefix(prefix)] = r[counts[c]]
    return (
        table
        + "\nn per type: "
        + "; ".join(
            " ".join(filter(None, (split, ", ".join(f"{k} {v}" for k, v in c.items())))) for split, c in n.items()
        )
    )


def with_intervals(rows: list[dict], counts: dict[str, str]) -> list[dict]:
    """Copies of ``rows`` where each metric in ``counts`` (metric -> the row key of its sample count)
    reads ``"48.8 ±3.0"`` (± half the Wilson 95 % interval); rows without the count keep the number."""
    out = []
    for r in rows:
        r = dict(r)
        for metric, n_key in counts.items():
            v, n = r.get(metric), r.get(n_key)
            if isinstance(v, (int, float)) and not _is_missing(v) and isinstance(n, int) and n > 0:
                lo, hi = wilson_interval(float(v), n)
                r[metric] = f"{v:.1f} ±{(hi - lo) / 2:.1f}"
        out.append(r)
    return out
