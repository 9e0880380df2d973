"""A sweep's results: one row per trial (its swept values, metric, reports, how it ended), the
best trial, and the files written under ``<storage_path>/<name>``: ``results.json``,
``results.txt``, ``best_config.yaml`` (runs as is with the experiment's job script),
``metric_vs_params.png`` and, from ``vlforge.tune.run``, ``summary.txt``.

    result = run_sweep(load_sweep("sweeps/distill_weights_smoke.yaml"))   # a SweepResult
    print(result.summary())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.config import SweepConfig, dump_yaml
from vlforge.evaluation import format_table
from vlforge.tracking.redact import redact_text, secret_env_values
from vlforge.tune.plan import SweepPlan, load_experiment, param_overrides
from vlforge.tune.trainable import ERROR, FINISHED, PENDING, STOPPED, recorded_end


@dataclass
class SweepResult:
    name: str
    root: str
    rows: list[dict[str, Any]]  # one per trial: trial_id, the swept values, metric (last, best), reports, status
    best: dict[str, Any] | None
    best_config: str | None
    table: str
    seconds: float
    resumed: bool
    parent_run_id: str | None = None
    artifacts: list[str] = field(default_factory=list)

    def stopped_early(self) -> list[str]:
        return [r["trial_id"] for r in self.rows if r["status"] == STOPPED]

    @property
    def interrupted(self) -> bool:
        """Tune returned with trials not ended (Ctrl-C): running the sweep again resumes it."""
        return any(r["status"] == PENDING for r in self.rows)

    def summary(self) -> str:
        lines = [
            self.table,
            "",
            f"sweep {self.name}: {len(self.rows)} trials in {self.seconds:.0f}s"
            + (" (resumed)" if self.resumed else ""),
        ]
        if self.stopped_early():
            lines.append(f"stopped early by the scheduler: {', '.join(self.stopped_early())}")
        if self.interrupted:
            lines.append(
                f"INTERRUPTED: {sum(r['status'] == PENDING for r in self.rows)} trial(s) unfinished; "
                "run the same command again to resume the sweep"
            )
        if self.best:
            lines.append(
                f"best: trial {self.best['trial_id']}, {self.best['metric_name']} {self.best['metric']:.2f}; "
                f"config {self.best_config}"
            )
        lines.append(f"results: {self.root}")
        return "\n".join(lines)


def safe_yaml(cfg: Any) -> str:
    """``dump_yaml`` with URL passwords and secret environment values masked (files outlive the run)."""
    return redact_text(dump_yaml(cfg), secret_env_values())


def collect_results(plan: SweepPlan, grid, seconds: float, resumed: bool) -> SweepResult:
    sweep = plan.sweep
    keys = list(sweep.space)
    sign = 1 if sweep.mode == "max" else -1
    rows = []
    for r in grid:
        trial_id = _trial_id(r)
        history = r.metrics_dataframe
        values = (
            [] if history is None or sweep.metric not in history else [float(v) for v in history[sweep.metric].dropna()]
        )
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({k: r.config.get(k) for k in keys})
        row["metric"] = values[-1] if values else None
        row["best_seen"] = max(values, key=lambda v: sign * v) if values else None
        row["reports"] = len(values)
        ended = recorded_end(plan, trial_id)
        row["status"] = ended["status"] if ended else (ERROR if r.error is not None else PENDING)
        rows.append(row)
    rows.sort(key=lambda x: x["trial_id"])
    scored = [r for r in rows if r["metric"] is not None and r["status"] != ERROR]
    best = max(scored, key=lambda x: sign * x["metric"]) if scored else None
    if best:
        best = {**best, "metric_name": sweep.metric}
    table = _table(rows, keys, sweep.metric)
    plan.root.mkdir(parents=True, exist_ok=True)
    artifacts = []
    (plan.root / "results.json").write_text(
        json.dumps({"metric": sweep.metric, "mode": sweep.mode, "rows": rows, "best": best}, indent=1, default=str)
    )
    (plan.root / "results.txt").write_text(table + "\n")
    artifacts += [str(plan.root / "results.json"), str(plan.root / "results.txt")]
    best_path = None
    if best:
        best_path = write_best_config(plan, {k: best[k] for k in keys}, best)
        artifacts.append(str(best_path))
    if scored:
        artifacts.append(str(plot_metric_vs_params(rows, sweep, plan.root / "metric_vs_params.png")))
    return SweepResult(
        sweep.name,
        str(plan.root),
        rows,
        best,
        str(best_path) if best_path else None,
        table,
        seconds,
        resumed,
        artifacts=artifacts,
    )


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    # A trial that never reported: Tune names its directory <trainable>_<trial id>_<index>_<params>_<time>.
    parts = Path(result.path).name.split("_")
    return "_".join(parts[1:3]) if len(parts) > 2 else Path(result.path).name


def _table(rows: list[dict[str, Any]], keys: list[str], metric: str) -> str:
    short = {k: k.split(".")[-1] if sum(x.split(".")[-1] == k.split(".")[-1] for x in keys) == 1 else k for k in keys}
    shown = [
        {
            **{short[k]: r[k] for k in keys},
            **{k: r[k] for k in ("trial_id", "metric", "best_seen", "reports", "status")},
        }
        for r in rows
    ]
    return format_table(
        shown,
        ["trial_id", *short.values(), "metric", "best_seen", "reports", "status"],
        title=f"Sweep: {metric} at each trial's last report (keys: "
        + ", ".join(f"{v} = {k}" for k, v in short.items() if v != k)
        + ")"
        if any(v != k for k, v in short.items())
        else f"Sweep: {metric} at each trial's last report",
    )


def write_best_config(plan: SweepPlan, params: dict[str, Any], best: dict[str, Any]) -> Path:
    """The base experiment with the sweep's overrides and the best trial's values, as a YAML file the
    experiment's job script runs (``python jobs/two_stage.py --config <file>``)."""
    cfg = load_experiment(plan.sweep, params)
    header = (
        f"# Best trial of sweep {plan.name}: {best['trial_id']}, {plan.sweep.metric} = {best['metric']:.4g} "
        f"({plan.sweep.mode}).\n# Base experiment {plan.sweep.experiment}\n# with "
        + " ".join(f"--set {o}" for o in [*plan.sweep.set, *param_overrides(params)])
        + "\n"
    )
    out = plan.root / "best_config.yaml"
    out.write_text(header + safe_yaml(cfg))
    return out


def plot_metric_vs_params(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> Path:
    """One panel per swept key: each trial's metric at its last report against the key's value;
    trials that ran to the end are filled, early-stopped ones hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    keys = list(sweep.space)
    fig = Figure(figsize=(4.0 * len(keys), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for status, style in (
            (FINISHED, dict(marker="o", color="C0")),
            (STOPPED, dict(marker="o", facecolors="none", edgecolors="C1")),
        ):
            pts = [(r[key], r["metric"]) for r in rows if r["status"] == status and r["metric"] is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            ax.scatter(xs if numeric else [str(x) for x in xs], ys, label=status.replace("_", " "), **style)
        if sweep.space[key].type == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        paths = key.split(",")
        ax.set_xlabel(paths[0] + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""), fontsize=8)
        ax.set_ylabel(sweep.metric)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.name}: {sweep.metric} at the last report", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
