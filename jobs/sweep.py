"""A sweep from a file in sweeps/, for `ray job submit` (the same as `vlforge sweep FILE`).

    python jobs/sweep.py sweeps/distill_weights_smoke.yaml                 # laptop: about 10 minutes
    python jobs/sweep.py sweeps/vlmo_stage3_lr_wd_smoke.yaml --set search.num_samples=8
    ray job submit --working-dir . -- python jobs/sweep.py sweeps/distill_weights.yaml

Shared runs (the two-stage teacher, stages before the trial's) are trained once, then Ray
Tune runs the trials, each a Ray Train run that reports the validation metric every
`report_every` steps; the scheduler stops trials that trail. Started again with the same
name, the sweep resumes without re-running finished trials. Results go to
<storage_path>/<name>/ (results table, best_config.yaml, metric_vs_params.png) and to an
MLflow parent run with a child run per trial. See vlforge.tune.run.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from vlforge.config import ConfigError

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("file", help="sweep YAML in sweeps/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key (repeatable)")
    args = p.parse_args(argv)
    from vlforge.tune import load_sweep, make_plan, run_sweep

    try:
        sweep = load_sweep(args.file, args.set)
        make_plan(sweep)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_sweep(sweep)
    print(result.summary(), flush=True)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
