"""``vlforge eval``: score a model directory, or a registered ``NAME@ALIAS``, on a shard set.

vlforge eval MODEL_DIR|NAME@ALIAS SHARDS [--max-samples 1000]   # retrieval, true/false, VQA or captions
vlforge eval out/x/export data/corpus/scenes/test --mlflow-experiment evals   # also a new MLflow run
"""

from __future__ import annotations

import json
import os

from vlforge import config as C
from vlforge.cli.common import storage_config
from vlforge.tracking.store import experiment_id, resolve_tracking_uri


def cmd_eval(args) -> int:
    # lazy: pulls in torch (keeps vlforge --help fast)
    from vlforge.evaluation import INTERVAL_COUNTS, INTERVAL_NOTE, format_table, type_table, with_intervals
    from vlforge.evaluation.score import score_model_dir

    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError("--max-samples must be >= 1")
    with _model_source(args.model_dir, args.tracking_uri) as (model_dir, data):
        row = score_model_dir(
            model_dir,
            args.shards,
            max_samples=args.max_samples,
            rerank_k=args.rerank_k,
            batch_size=args.batch_size,
            storage=storage_config(args),
            data=data,
            branch=args.branch,
            shots=args.shots,
            pool=args.pool,
            blind=args.blind,
            max_new_tokens=args.max_new_tokens,
            beams=args.beams,
            examples=args.examples,
        )
    row["model"] = args.model_dir
    pictures = [dict(ex) for ex in row.get("examples", []) if "image" in ex]
    for ex in row.get("examples", []):
        ex.pop("image", None)
    cols, n = _eval_columns(row)
    table = format_table(
        with_intervals([row], INTERVAL_COUNTS),
        ["task", *cols],
        decimals=1,
        title=f"{args.model_dir} on {args.shards} ({n} samples)",
    )
    by_type = type_table([{k: v for k, v in row.items() if k.startswith("vqa_")}])
    if by_type:
        table += "\n\n" + by_type
    print(table)
    print(INTERVAL_NOTE)
    out_dir = _eval_out_dir(args)
    if out_dir is not None:
        _write_eval(out_dir, row, table, pictures)
        print(f"wrote {out_dir}/eval.json, table.txt" + (", examples.png" if pictures else ""))
    if "tokenizer" in row:
        print(
            f"captions tokenised with {row['tokenizer']}; objects_named: captions naming exactly the scene's "
            "objects; objects_recall: the scenes' objects named"
        )
    for ex in row.get("examples", [])[:3]:
        print(f"  e.g. {ex.get('question', ex.get('references'))!r} -> {ex.get('prediction', ex.get('caption'))!r}")
    if row.get("vqa_metric") == "vqav2":
        print(
            "VQA: the VQAv2 metric, min(1, annotators who gave the predicted answer / 3), averaged; "
            "its interval treats each question as one trial."
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    if args.mlflow_experiment:
        run_id = _log_eval_run(row, args.mlflow_experiment, args.tracking_uri, out_dir)
        print(f"logged to MLflow run {run_id} (experiment {args.mlflow_experiment})")
    return 0


def _eval_columns(row: dict) -> tuple[list[str], int]:
    """The columns ``vlforge eval`` shows for ``row``, and its sample count."""
    # lazy: the vlforge.evaluation package pulls in torch (keeps vlforge --help fast)
    from vlforge.evaluation.report import CAPTION_METRIC_COLUMNS, METRIC_COLUMNS

    cols = [c for c in (*METRIC_COLUMNS, *CAPTION_METRIC_COLUMNS) if c in row]
    n = next(row[k] for k in ("nlvr2_n", "vqa_n", "n_texts", "n") if k in row)
    if "shots" in row:
        cols = ["vqa_acc", "shots", "blind"]
    return cols, n


def _model_source(model: str, tracking_uri: str | None):
    """A context giving ``(model_dir, data)``: a directory as it is (data None: the model's own sizes),
    or a registered ``NAME@ALIAS`` downloaded to a temporary directory with the preprocessing it was
    registered with."""
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def source():
        if os.path.exists(model) or "@" not in model:
            if not os.path.isdir(model):
                raise FileNotFoundError(f"model directory not found: {model} (a registered model is NAME@ALIAS)")
            yield model, None
            return
        # lazy: pulls in mlflow
        from vlforge.serving.directory import serving_image, serving_kind, serving_preprocessing
        from vlforge.serving.pyfunc_model import CAPTION
        from vlforge.serving.registry import download_serving_dir

        name, alias = model.rsplit("@", 1)
        with tempfile.TemporaryDirectory(prefix="vlforge-eval-") as tmp:
            serving = download_serving_dir(name, alias, tracking_uri, tmp)
            if serving_kind(serving) == CAPTION:
                yield str(serving), C.DataConfig(image=serving_image(serving))
                return
            image, tokenizer = serving_preprocessing(serving)
            yield str(serving), C.DataConfig(image=image, tokenizer=tokenizer)

    return source()


def _eval_out_dir(args):
    """Where ``vlforge eval`` writes its results: ``--out``, else ``eval/<set>`` beside a local model
    directory (none for a registered NAME@ALIAS, or with ``--no-save``)."""
    from pathlib import Path

    if args.no_save:
        return None
    if args.out:
        return Path(args.out)
    if not os.path.isdir(args.model_dir):
        return None
    parts = [p for p in args.shards.replace("://", "/").rstrip("/").split("/") if p]
    return Path(args.model_dir).resolve().parent / "eval" / "-".join(parts[-2:])


def _write_eval(out_dir, row: dict, table: str, pictures: list[dict]) -> None:
    # lazy: pulls in torch (keeps vlforge --help fast)
    from vlforge.evaluation.report import plot_caption_examples

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(row, indent=1, default=str))
    (out_dir / "table.txt").write_text(table + "\n")
    if pictures:
        plot_caption_examples(pictures, out_dir / "examples.png")


def _log_eval_run(row: dict, experiment: str, tracking_uri: str | None, out_dir=None) -> str:
    """A new MLflow run in ``experiment`` holding ``row``: its figures as metrics, the rest as params, and
    the files ``vlforge eval`` wrote (table, examples picture) as artifacts."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(C.TrackingConfig(tracking_uri=tracking_uri))
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(
        experiment_id(client, experiment), run_name=f"eval {row['model']}", tags={"vlforge.kind": "evaluation"}
    )
    try:
        for k, v in row.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                client.log_metric(run.info.run_id, k, float(v))
            else:
                client.log_param(run.info.run_id, k, str(v)[:500])
        client.log_dict(run.info.run_id, json.loads(json.dumps(row, default=str)), "eval.json")
        if out_dir is not None:
            for path in sorted(out_dir.glob("*")):
                if path.name != "eval.json":
                    client.log_artifact(run.info.run_id, str(path))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a model directory on a shard set (retrieval, true/false or VQA)",
        description="Score a model directory (an export, a stage's model, a fine-tuned teacher) on "
        "a shard set for the data kind the set's manifest names: captions -> retrieval "
        "R@1/5/10 both ways, nlvr2 -> true/false accuracy, vqa -> VQA accuracy. Image "
        "size and text length come from the model. Prints the figures with binomial "
        "95 % intervals.",
    )
    ev.add_argument("model_dir", help="a model directory (model.json + weights), or a registered NAME@ALIAS")
    ev.add_argument("shards", help="a shard set, local or s3://")
    ev.add_argument("--max-samples", type=int, default=None, help="score at most this many samples (default: all)")
    ev.add_argument(
        "--rerank-k",
        type=int,
        default=0,
        help="fusion models: re-rank the ITC top K with the ITM head (default 0: ITC only)",
    )
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=20,
        help="captioning models: tokens to generate per caption (a byte-level tokenizer needs more)",
    )
    ev.add_argument(
        "--beams",
        type=int,
        default=1,
        help="captioning models: beam search over this many hypotheses (default 1: greedy decoding)",
    )
    _add_captioning_arguments(ev)
    _add_output_arguments(ev)
    ev.set_defaults(fn=cmd_eval)


def _add_captioning_arguments(ev) -> None:
    """Frozen few-shot VQA and VC-GPT decoding."""
    ev.add_argument(
        "--shots",
        type=int,
        default=0,
        help="Frozen on a VQA set: solved examples before each question (open-ended few-shot VQA)",
    )
    ev.add_argument("--pool", help="Frozen few-shot VQA: the shard set shots come from (default: the sibling train)")
    ev.add_argument("--blind", action="store_true", help="Frozen few-shot VQA: the same prompts without images")
    ev.add_argument(
        "--branch",
        choices=["ensemble", "fusion", "gpt"],
        default=None,
        help="VC-GPT: decode from these logits (default: the self-ensemble the model uses)",
    )


def _add_output_arguments(ev) -> None:
    """Where the figures go besides the terminal."""
    ev.add_argument("--json", metavar="PATH", help="also write the row as JSON")
    ev.add_argument(
        "--out",
        metavar="DIR",
        help="write eval.json, table.txt and (captioning) examples.png here (default: eval/<set> beside a "
        "local model directory)",
    )
    ev.add_argument("--no-save", action="store_true", help="write nothing beside the model directory")
    ev.add_argument(
        "--examples",
        type=int,
        default=8,
        help="captioning models: example images with their captions in examples.png (default 8)",
    )
    ev.add_argument(
        "--mlflow-experiment", metavar="NAME", help="also log the figures as a new run in this MLflow experiment"
    )
    ev.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    ev.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
