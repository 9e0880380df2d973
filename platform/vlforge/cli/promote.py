"""``vlforge promote`` (and ``jobs/promote.py``, which shares its arguments): a registered model's
challenger -> champion, gated on a fresh evaluation of both.

    vlforge promote [--dry-run] [--rollback] [--model NAME] [--challenger ALIAS|VERSION]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vlforge import config as C


def promote_arguments(p: argparse.ArgumentParser, default_config: str | None) -> None:
    """The arguments of ``vlforge promote`` and ``jobs/promote.py``."""
    p.add_argument(
        "--config",
        default=default_config,
        help="PromoteConfig YAML" + (f" (default {default_config})" if default_config else ""),
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set eval.max_samples=1000 or --set improve.rmean=1.0",
    )
    p.add_argument("--model", help="registered model name (config: model_name)")
    p.add_argument("--challenger", help="alias or version number of the challenger (config: challenger)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking / registry URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    p.add_argument("--dry-run", action="store_true", help="evaluate and decide, record and move nothing")
    p.add_argument("--rollback", action="store_true", help="put the previous champion back instead of promoting")


def run_promote(args: argparse.Namespace) -> int:
    """The body of ``vlforge promote`` and ``jobs/promote.py``: 0 promoted / unchanged / rolled back,
    1 refused, 2 an error (bad config, missing model or alias, busy lock)."""
    overrides = list(args.set)
    # Quoted: a version number or a numeric name stays a string.
    for key, value in (
        ("model_name", args.model),
        ("challenger", args.challenger),
        ("tracking.tracking_uri", args.tracking_uri),
    ):
        if value:
            overrides.append(f"{key}={json.dumps(str(value))}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file otherwise
    # lazy: pulls in torch (keeps vlforge --help fast)
    from vlforge.serving import promotion

    try:
        cfg = C.load(C.PromoteConfig, args.config, overrides)
        d = (promotion.rollback if args.rollback else promotion.promote)(cfg, dry_run=args.dry_run)
    except (C.ConfigError, promotion.PromotionError, LookupError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(d.summary(), flush=True)
    return d.exit_code


def add_parser(sub) -> None:
    pr = sub.add_parser(
        "promote",
        help="promote a registered model's challenger to champion, gated on evaluation",
        description="Re-evaluate the challenger and the champion of a registered model on a fixed "
        "evaluation set; move the champion alias only when the declared metrics improve "
        "by their margins and no guarded metric gets worse. Exit 1 when refused.",
    )
    promote_arguments(pr, None)
    pr.set_defaults(fn=run_promote)
