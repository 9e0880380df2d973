"""``vlforge register``: register an exported model directory in the MLflow registry, tagged with its evaluation.

vlforge register MODEL_DIR --name NAME [--alias challenger] [--eval SHARDS]
"""

from __future__ import annotations

from vlforge.cli.common import storage_config


def cmd_register(args) -> int:
    # lazy: pulls in torch (keeps vlforge --help fast)
    from vlforge.workflows.register import register_model_dir

    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError("--max-samples must be >= 1")
    tags = {}
    for t in args.tag or []:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise ValueError(f"--tag takes KEY=VALUE, got {t!r}")
        tags[k] = v
    reg = register_model_dir(
        args.model_dir,
        args.name,
        alias=args.alias,
        evals=args.eval or [],
        max_samples=args.max_samples,
        rerank_k=args.rerank_k,
        tags=tags,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        storage=storage_config(args),
    )
    print(reg.summary())
    return 0


def add_parser(sub) -> None:
    rg = sub.add_parser(
        "register",
        help="register an exported model directory in the MLflow registry",
        description="Log a model directory (a training run's export/, a stage's model, a fine-tuned "
        "teacher) as the right pyfunc (dual encoder for distill / vlmo / fusion, caption "
        "for frozen / vcgpt), register a new version of NAME and point ALIAS at it. Each "
        "--eval shard set is scored first and its figures become eval.<set>.<metric> "
        "tags. Preprocessing comes from the directory's config.yaml when it has one.",
    )
    rg.add_argument("model_dir", help="a model directory (model.json + model.safetensors)")
    rg.add_argument("--name", required=True, help="registered model name")
    rg.add_argument("--alias", default="challenger", help="alias for the new version (default: challenger)")
    rg.add_argument(
        "--eval",
        action="append",
        metavar="[NAME=]SHARDS",
        help="score on this shard set first and tag the version with it (repeatable)",
    )
    rg.add_argument("--max-samples", type=int, default=None, help="score at most this many samples per set")
    rg.add_argument(
        "--rerank-k",
        type=int,
        default=0,
        help="vlmo / fusion retrieval: re-rank the ITC top K with the ITM head (default 0)",
    )
    rg.add_argument("--tag", action="append", metavar="KEY=VALUE", help="an extra version tag (repeatable)")
    rg.add_argument("--experiment", default="vlforge", help="MLflow experiment of the registration run")
    rg.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    rg.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
    rg.set_defaults(fn=cmd_register)
