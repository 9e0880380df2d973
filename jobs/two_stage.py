"""The main job: two-stage distillation of a fusion-encoder teacher into a dual-encoder student.

    python jobs/two_stage.py                         # laptop: built-in corpus, 2 CPU workers, ~25 min
    python jobs/two_stage.py --no-ablation           # skip the student trained without attention distillation
    python jobs/two_stage.py --set name=my-job       # the same name again reuses finished runs, resumes the rest
    python jobs/two_stage.py --set teacher.checkpoint=out/two_stage/my-job/teacher   # reuse a trained teacher
    python jobs/two_stage.py --set ablations=[soft_only,hard_only] --set seed=1
    ray job submit --working-dir . -- python jobs/two_stage.py --config jobs/configs/two_stage.yaml

Steps (see vlforge.workflows.two_stage): the VLMo teacher is pretrained on image-text
pairs and fine-tuned per task; the student learns from it in two stages (pretraining
distillation: ITC + soft ITM labels + cross-modal attention; fine-tuning distillation on
retrieval, true/false reasoning over scene pairs and VQA); the ablations repeat the
student without attention distillation (soft_only) or with ground truth only
(hard_only). Then the teacher and every student are evaluated (retrieval R@1/5/10 both
ways, reasoning and VQA accuracy; val and the held-out combinations of test), latency is
measured, the results table is printed and logged to MLflow, and the distilled student is
registered with alias `challenger`.

With nothing set up it starts a local Ray, builds the corpus under data/corpus when absent
and logs to ./mlflow.db; RAY_ADDRESS and MLFLOW_TRACKING_URI (or tracking.tracking_uri)
point it at a cluster and a tracking server. Under `ray job submit --working-dir .` the
working directory is a temporary copy that Ray deletes, so relative paths (corpus, results,
./mlflow.db, ./mlruns) resolve under $VLFORGE_HOME instead (default ~/vlforge; printed).
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "jobs/configs/two_stage_smoke.yaml"


def main(argv=None) -> int:
    from pathlib import Path

    from vlforge.config import ConfigError, TwoStageConfig, load

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG
    p.add_argument("--config", default=str(default), help="TwoStageConfig YAML (default: the smoke config)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set student.stages.0.steps=100 (repeatable)",
    )
    p.add_argument("--no-ablation", action="store_true", help="train only the distilled student")
    args = p.parse_args(argv)
    from vlforge.runtime import persistent_workdir

    config = str(Path(args.config).resolve())
    persistent_workdir()
    try:
        cfg = load(TwoStageConfig, config, args.set)
        from vlforge.workflows.two_stage import preflight

        # Config, ZeRO settings, shard sets and storage are checked here, before Ray starts or joins a cluster.
        preflight(cfg, ablations=not args.no_ablation)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from vlforge.workflows.two_stage import run_two_stage

    result = run_two_stage(cfg, ablations=not args.no_ablation)
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
