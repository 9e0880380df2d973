"""Plots logged with a run: the loss curve (``Tracker.log_loss_curve``)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


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
