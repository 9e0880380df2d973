"""vlforge.tune: sweeps defined by files in ``sweeps/``, run by Ray Tune over Ray Train trials.

    from vlforge.tune import load_sweep, run_sweep
    result = run_sweep(load_sweep("sweeps/distill_weights_smoke.yaml", ["search.num_samples=8"]))

Modules: ``plan`` (sweep file -> shared runs and trial configs, checked on the driver),
``trainable`` (the Ray Tune pieces: search space, searcher, scheduler, the trial and its
callback), ``run`` (``run_sweep``: how a sweep is run, resumed and tracked) and ``results``
(the results table, the best trial and the files written).
"""

from vlforge.tune.plan import SweepPlan, load_experiment, load_sweep, make_plan
from vlforge.tune.results import SweepResult
from vlforge.tune.run import run_sweep

__all__ = ["SweepPlan", "SweepResult", "load_experiment", "load_sweep", "make_plan", "run_sweep"]
