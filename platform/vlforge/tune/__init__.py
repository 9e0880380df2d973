"""vlforge.tune: sweeps defined by files in ``sweeps/``, run by Ray Tune over Ray Train trials.

    from vlforge.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("sweeps/distill_weights_smoke.yaml", ["search.num_samples=8"]))

See ``vlforge.tune.sweep`` for how a sweep is planned, run, resumed and tracked.
"""

from vlforge.tune.sweep import SweepPlan, SweepResult, load_experiment, load_sweep, make_plan, run_sweep

__all__ = ["SweepPlan", "SweepResult", "load_experiment", "load_sweep", "make_plan", "run_sweep"]
