"""``vlforge sweep``: run (or resume, or only check) a Ray Tune sweep defined by a file in ``sweeps/``.

vlforge sweep sweeps/distill_weights_smoke.yaml [--set search.num_samples=8] [--check]
"""

from __future__ import annotations


def cmd_sweep(args) -> int:
    # lazy: pulls in ray
    from vlforge.tune import load_sweep, make_plan, run_sweep

    sweep = load_sweep(args.file, args.set or [])
    if args.check:
        plan = make_plan(sweep)
        print(
            f"sweep {sweep.name}: ok; shared runs {[r.name for r in plan.shared] or '-'}, "
            f"{plan.max_reports} reports per full trial, results under {plan.root}"
        )
        return 0
    result = run_sweep(sweep)
    print(result.summary(), flush=True)
    return 130 if result.interrupted else 0


def add_parser(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="run (or resume) a Ray Tune sweep defined by a file in sweeps/",
        description="Run the sweep a file in sweeps/ defines: a base experiment, a search "
        "space over its config keys, a search algorithm (random, grid, optuna), "
        "a scheduler (ASHA), a metric, a budget and per-trial resources. Shared "
        "runs (a teacher, stages before the trial's) train once; each trial is a "
        "Ray Train run reporting the validation metric to Tune. Started again "
        "with the same name, a sweep resumes: finished trials are kept.",
        epilog="Results: <storage_path>/<name>/{results.txt,results.json,best_config.yaml,"
        "metric_vs_params.png}, and an MLflow parent run with one child run per trial.",
    )
    sw.add_argument("file", help="sweep YAML (see vlforge.config.SweepConfig)")
    sw.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a sweep key, e.g. --set search.num_samples=8 (repeatable)",
    )
    sw.add_argument("--check", action="store_true", help="check the file and every swept key, then stop")
    sw.set_defaults(fn=cmd_sweep)
