"""Learning per minute: the default recipe's teacher pretraining on the platform and with plain torch.

    python jobs/bench_learning.py                                   # two_stage_smoke.yaml's teacher-pretrain run
    python jobs/bench_learning.py --eval-every 20 --max-samples 500
    python jobs/bench_learning.py --set teacher.pretrain.1.steps=200 --systems torch

Trains the ``teacher-pretrain`` run of a two-stage config (default: the main job's
``jobs/configs/two_stage_smoke.yaml``) twice: on the platform (Ray Data + Ray Train +
DeepSpeed, as the job runs it) and with plain torch in one process (same model, stages, data,
optimizer, schedule, global batch and seed; see ``vlforge.workflows.learning_bench``). Every
``--eval-every`` steps both score retrieval R@1 (text->image and image->text, ITC embeddings) on
``--eval-shards`` and note the training wall clock (scoring excluded). Prints each metric against
minutes for both, the time each takes to reach the same R@1 and their ratio, writes the curves
(JSON + PNG) under ``--out`` and logs them to MLflow (experiment ``bench_learning``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from vlforge.config import ConfigError, TwoStageConfig, load

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="jobs/configs/two_stage_smoke.yaml", help="TwoStageConfig YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--eval-every", type=int, default=10, help="optimizer steps between scorings (default 10)")
    p.add_argument("--eval-shards", default="scenes/test", help="captions shard set, relative to data_root")
    p.add_argument("--max-samples", type=int, default=1000, help="scoring samples (default 1000)")
    p.add_argument("--systems", nargs="+", default=["platform", "torch"], choices=["platform", "torch"])
    p.add_argument("--out", default="out/bench_learning", help="where the curves are written")
    args = p.parse_args(argv)
    if args.eval_every < 1 or args.max_samples < 2:
        p.error("--eval-every must be >= 1 and --max-samples >= 2")
    try:
        cfg = load(TwoStageConfig, args.config, args.set)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from vlforge.data.storage import absolute
    from vlforge.runtime import init_ray
    from vlforge.tracking import resolve_tracking_uri
    from vlforge.workflows import learning_bench as lb
    from vlforge.workflows.two_stage import ensure_data, eval_data, plan

    name = cfg.name or "bench-learning"
    tracking = dataclasses.replace(
        cfg.tracking, experiment="bench_learning", tracking_uri=resolve_tracking_uri(cfg.tracking)
    )
    cfg = dataclasses.replace(cfg, name=name, tracking=tracking, ablations=[], storage_path=args.out)
    ensure_data(cfg)
    run = plan(cfg, ablations=False).runs.get("teacher-pretrain")
    if run is None:
        print("error: the config reuses a teacher (teacher.checkpoint): nothing to pretrain", file=sys.stderr)
        return 2
    out = Path(absolute(args.out)) / name
    previous = Path(run.storage_path) / run.name
    if previous.exists():
        import shutil

        shutil.rmtree(previous)  # a bench always starts from step 0, never resumes
    init_ray(num_train_workers=cfg.num_workers, worker_cpus=cfg.worker_cpus)
    curves = lb.bench_learning(
        run,
        eval_shards=f"{absolute(cfg.data_root)}/{args.eval_shards}",
        data=eval_data(cfg),
        eval_every=args.eval_every,
        max_samples=args.max_samples,
        work=out,
        systems=tuple(args.systems),
    )
    summary = lb.summarise(curves)
    table = lb.format_curves(curves, summary)
    print(table)
    (out / "curves.json").write_text(
        json.dumps(
            {"summary": summary, "points": {k: [dataclasses.asdict(pt) for pt in v] for k, v in curves.items()}},
            indent=1,
        )
    )
    (out / "curves.txt").write_text(table + "\n")
    png = lb.plot_curves(curves, out / "curves.png")
    if tracking.enabled:
        run_id = log_curves(tracking, cfg, curves, summary, [png, out / "curves.json", out / "curves.txt"])
        print(f"MLflow run {run_id} (experiment {tracking.experiment})")
    print(f"curves: {out}/curves.png, {out}/curves.json")
    return 0


def log_curves(tracking, cfg, curves, summary, files) -> str | None:
    """One new MLflow run per bench (a bench never resumes): config, curves as metrics, files."""
    import time

    from vlforge.tracking import make_tracker
    from vlforge.train.runner import prepare_local_mlflow

    prepare_local_mlflow(tracking)
    tracker = make_tracker(tracking, 0)
    key = f"{cfg.name}.bench-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracker.start(run_key=key, run_name=key)
    status = "FAILED"
    try:
        tracker.log_config(cfg)
        for k, points in curves.items():
            for pt in points:
                tracker.log_metrics(
                    {f"{k}/i2t_r1": pt.i2t_r1, f"{k}/t2i_r1": pt.t2i_r1, f"{k}/minutes": pt.seconds / 60}, step=pt.step
                )
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
        for path in files:
            tracker.log_artifact(path, "bench_learning")
        status = "FINISHED"
    finally:
        tracker.end(status)
    return run_id


if __name__ == "__main__":
    sys.exit(main())
