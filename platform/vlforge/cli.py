"""The ``vlforge`` command.

    vlforge data build-corpus [--out data/corpus] [--set n_scenes=500]
    vlforge data ingest IMAGES_DIR CAPTIONS.csv|.jsonl --out DIR
    vlforge data ls URI              # a shard set, local or s3://
    vlforge data verify URI          # sizes and sha256 against the manifest (no manifest: read every shard)
    vlforge data manifest URI        # write manifest.json for shards made elsewhere (img2dataset), as they are
    vlforge data upload DIR s3://bucket/prefix
    vlforge data stream URI          # stream it through Ray Data and print what arrives
    vlforge sweep sweeps/distill_weights_smoke.yaml [--set search.num_samples=8]
    vlforge promote [--dry-run] [--rollback]   # challenger -> champion, gated on a fresh evaluation
    vlforge eval MODEL_DIR|NAME@ALIAS SHARDS [--max-samples 1000]   # score a model on a shard set
    vlforge register MODEL_DIR --name NAME [--eval SHARDS]   # register an export, tagged with its evaluation

Run ``vlforge <command> --help`` for each command's options. S3 endpoints come
from ``--s3-endpoint`` or ``VLFORGE_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL``; keys only
from the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vlforge import config as C
from vlforge.data import adapters
from vlforge.data.corpus import build_corpus
from vlforge.data.ingest import IngestError, ingest
from vlforge.data.shards import list_shards, shard_set_summary, verify, write_manifest
from vlforge.data.storage import upload_dir
from vlforge.runtime import init_ray
from vlforge.tracking.store import experiment_id, resolve_tracking_uri


def _storage(args) -> C.StorageConfig:
    return C.StorageConfig(s3_endpoint_url=getattr(args, "s3_endpoint", None))


def cmd_build_corpus(args) -> int:
    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = C.load(C.CorpusConfig, args.config, overrides)
    summary = build_corpus(cfg)
    print(json.dumps(summary["counts"], indent=1))
    return 0


def cmd_ingest(args) -> int:
    fmt = args.format
    given = {
        "--image-col": args.image_col,
        "--caption-col": args.caption_col,
        "--annotations": args.annotations,
        "--image-name": args.image_name,
        "--vocabulary": args.vocabulary,
        "--min-answer-count": args.min_answer_count,
    }
    allowed = {
        "folder": ("--image-col", "--caption-col"),
        "vqav2": ("--annotations", "--image-name", "--vocabulary", "--min-answer-count"),
    }.get(fmt, ())
    for flag, value in given.items():
        if value is not None and flag not in allowed:
            raise IngestError(f"{flag} does not apply to --format {fmt}")
    common = dict(samples_per_shard=args.samples_per_shard, strict=args.strict, progress=print)
    if fmt == "folder":
        report = ingest(
            args.images,
            args.captions,
            args.out,
            image_col=args.image_col,
            caption_col=args.caption_col,
            split=args.split or "train",
            **common,
        )
    elif fmt == "coco":
        report = adapters.ingest_coco(args.captions, args.images, args.out, split=args.split or "train", **common)
    elif fmt == "karpathy":
        report = adapters.ingest_karpathy(args.captions, args.images, args.out, split=args.split, **common)
    elif fmt == "vqav2":
        if not args.annotations:
            raise IngestError(
                "--format vqav2 needs --annotations ANNOTATIONS.json (e.g. "
                "v2_mscoco_val2014_annotations.json) beside the questions file"
            )
        report = adapters.ingest_vqav2(
            args.captions,
            args.annotations,
            args.images,
            args.out,
            image_name=args.image_name,
            split=args.split,
            min_answer_count=args.min_answer_count or 1,
            vocabulary=args.vocabulary,
            **common,
        )
    else:
        report = adapters.ingest_nlvr2(args.captions, args.images, args.out, split=args.split, **common)
    print(f"wrote {report.written} samples in {len(report.manifest.shards)} shard(s) to {args.out}")
    if fmt == "vqav2":
        print(f"answers.json: {report.manifest.params.get('answers')} answers")
    if report.skipped:
        print(f"skipped {sum(report.skipped.values())}: {report.skipped}")
        for line in report.examples:
            print(f"  {line}")
    return 0


def cmd_ls(args) -> int:
    summary = shard_set_summary(args.uri, _storage(args))
    for uri in list_shards(args.uri, _storage(args)):
        print(uri)
    print(
        f"{summary['shards']} shard(s), {summary['samples'] if summary['samples'] is not None else '?'} samples"
        + (f", {summary['bytes'] / 1e6:.1f} MB" if summary["bytes"] else "")
    )
    return 0


def cmd_verify(args) -> int:
    problems = verify(args.uri, _storage(args))
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_manifest(args) -> int:
    manifest, scans = write_manifest(
        args.uri, _storage(args), task=args.task, force=args.force, progress=None if args.quiet else print
    )
    for sc in scans:
        for line in sc.detail:
            print(f"problem: {line}")
    problems = manifest.params["scan_problems"]
    print(
        f"wrote {args.uri.rstrip('/')}/manifest.json: {len(manifest.shards)} shard(s), "
        f"{manifest.total_samples} samples, task {args.task}"
        + (f"; problems: {', '.join(f'{k} {v}' for k, v in sorted(problems.items()))}" if problems else "")
    )
    return 1 if problems else 0


def cmd_upload(args) -> int:
    n = upload_dir(args.local, args.dest, _storage(args))
    print(f"uploaded {n} files to {args.dest}")
    return 0


def cmd_stream(args) -> int:
    # lazy: pulls in numpy (keeps vlforge --help fast)
    from vlforge.data.pipeline import Counters, build_dataset

    cfg = C.load(C.DataConfig, args.config, [f"shards={args.uri}", *(args.set or [])])
    if args.s3_endpoint:
        cfg.storage.s3_endpoint_url = args.s3_endpoint
    init_ray(num_train_workers=0)
    ds, counters = build_dataset(cfg, train=False)
    t0, n, batches = time.perf_counter(), 0, 0
    for batch in ds.iter_torch_batches(batch_size=cfg.batch_size):
        if batches == 0:
            shapes = {k: f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in batch.items()}
            print("batch:", json.dumps(shapes))
        n += len(batch["sample_id"])
        batches += 1
        if args.limit and n >= args.limit:
            break
    dt = time.perf_counter() - t0
    counts = counters.snapshot()
    print(f"{n} samples in {batches} batches, {dt:.1f}s ({n / max(dt, 1e-9):.0f} samples/s)")
    print(f"read {counts.get('read', 0)}, kept {counts.get('ok', 0)}, skipped {Counters.skipped(counts) or 0}")
    return 0


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


def cmd_eval(args) -> int:
    # lazy: pulls in torch (keeps vlforge --help fast)
    from vlforge.evaluation import INTERVAL_COUNTS, INTERVAL_NOTE, format_table, with_intervals
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
            storage=_storage(args),
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
    cols = [
        c
        for c in (
            "nlvr2_acc",
            "vqa_acc",
            "i2t_r1",
            "i2t_r5",
            "i2t_r10",
            "t2i_r1",
            "t2i_r5",
            "t2i_r10",
            "rmean",
            "bleu4",
            "rouge_l",
            "cider",
            "meteor",
            "objects_named",
        )
        if c in row
    ]
    n = next(row[k] for k in ("nlvr2_n", "vqa_n", "n_texts", "n") if k in row)
    if "shots" in row:
        cols = ["vqa_acc", "shots", "blind"]
    table = format_table(
        with_intervals([row], INTERVAL_COUNTS),
        ["task", *cols],
        decimals=1,
        title=f"{args.model_dir} on {args.shards} ({n} samples)",
    )
    print(table)
    print(INTERVAL_NOTE)
    out_dir = _eval_out_dir(args)
    if out_dir is not None:
        _write_eval(out_dir, row, table, pictures)
        print(f"wrote {out_dir}/eval.json, table.txt" + (", examples.png" if pictures else ""))
    if "tokenizer" in row:
        print(f"captions tokenised with {row['tokenizer']}; objects_named: captions naming exactly the scene's objects")
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
        storage=_storage(args),
    )
    print(reg.summary())
    return 0


INGEST_FORMATS = """formats (--format; the second argument is the format's main file):
  folder    CAPTIONS is a CSV/TSV/JSONL naming image files in IMAGES and their captions (the default)
  coco      a COCO captions JSON (captions_*.json): one sample per image, txt = first caption, json captions = all
  karpathy  a Karpathy split file (dataset_coco.json, dataset_flickr30k.json): one sample per image, all captions
  vqav2     VQAv2 questions JSON + --annotations JSON: one sample per question, soft answer scores, answers.json
  nlvr2     an NLVR2 JSONL file (train.json, dev.json, test1.json): sentence, true/false label, left + right image
"""


# ------------------------------------------------------------------- promote's arguments (also jobs/promote.py)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlforge",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'vlforge COMMAND --help' for details.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser(
        "data",
        help="shard sets: build the corpus, ingest, list, verify, upload, stream",
        description="Shard sets in the WebDataset / img2dataset layout with a manifest.json.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    def s3(sp):
        sp.add_argument(
            "--s3-endpoint", help="S3-compatible endpoint URL (default: $VLFORGE_S3_ENDPOINT / $AWS_ENDPOINT_URL)"
        )

    b = dsub.add_parser(
        "build-corpus",
        help="render the built-in emoji-scene corpus (offline, deterministic)",
        description="Render the built-in corpus from OpenMoji artwork (CC BY-SA 4.0). "
        "Config keys: see CorpusConfig in vlforge/config/data.py.",
    )
    b.add_argument("--config", help="YAML file with CorpusConfig keys")
    b.add_argument("--out", help="output directory (default data/corpus)")
    b.add_argument("--seed", type=int, help="random seed (default 0)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key; repeatable")
    b.set_defaults(fn=cmd_build_corpus)

    i = dsub.add_parser(
        "ingest",
        help="a folder of images + CSV/JSONL captions, or COCO / Karpathy / VQAv2 / NLVR2 files -> shards",
        description="Write shards from a folder of images and a CSV, TSV or JSONL file of captions,\n"
        "or from a public dataset's files (--format).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=INGEST_FORMATS,
    )
    i.add_argument("images", help="folder with the image files")
    i.add_argument(
        "captions",
        help="CSV/TSV/JSONL with an image column and a caption column; with --format: "
        "the format's main file (see below)",
    )
    i.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    i.add_argument(
        "--format",
        choices=("folder", "coco", "karpathy", "vqav2", "nlvr2"),
        default="folder",
        help="input format (default folder)",
    )
    i.add_argument("--samples-per-shard", type=int, default=1000)
    i.add_argument("--image-col", help="folder: column naming the image file (default: image/file/filename/path)")
    i.add_argument("--caption-col", help="folder: column holding the caption (default: caption/text)")
    i.add_argument(
        "--split",
        help="karpathy: keep only these splits (e.g. test, or train,restval); other formats: "
        "split written to metadata (folder: when a row has none; default train)",
    )
    i.add_argument("--annotations", help="vqav2: the annotations JSON (v2_mscoco_*_annotations.json)")
    i.add_argument(
        "--image-name",
        help="vqav2: image file name pattern (default COCO_{subtype}_{image_id:012d}.jpg, "
        "then any *{image_id:012d}.jpg in the folder)",
    )
    i.add_argument(
        "--min-answer-count", type=int, help="vqav2: answers.json keeps answers seen at least this often (default 1)"
    )
    i.add_argument("--vocabulary", help="vqav2: write this answers.json (e.g. the train set's) instead of building one")
    i.add_argument("--strict", action="store_true", help="fail instead of skipping bad rows")
    i.set_defaults(fn=cmd_ingest)

    ls = dsub.add_parser("ls", help="list the shards of a set (local or s3://)")
    ls.add_argument("uri")
    s3(ls)
    ls.set_defaults(fn=cmd_ls)

    v = dsub.add_parser(
        "verify",
        help="check shards against the manifest's sizes and sha256 (no manifest: read "
        "every shard end to end and report what is wrong)",
    )
    v.add_argument("uri")
    s3(v)
    v.set_defaults(fn=cmd_verify)

    m = dsub.add_parser(
        "manifest",
        help="write manifest.json for shards made elsewhere (img2dataset), as they are",
        description="Read every .tar under URI end to end (local or s3://) and write manifest.json "
        "beside them: per shard its sample count, size and sha256, and the task. The "
        "shards are not rewritten. Problems (unreadable tars, keys without an image or "
        "caption, counts that disagree with img2dataset's *_stats.json) are printed and "
        "counted in the manifest; the exit code is then 1. After this, 'vlforge data "
        "verify' checks the shards against it and every job reads the set.",
    )
    m.add_argument("uri", help="the directory holding the shards")
    m.add_argument(
        "--task",
        default="captions",
        choices=["captions", "vqa", "nlvr"],
        help="what the samples hold (default: captions)",
    )
    m.add_argument("--force", action="store_true", help="rewrite an existing manifest.json")
    m.add_argument("--quiet", action="store_true", help="no line per shard")
    s3(m)
    m.set_defaults(fn=cmd_manifest)
    u = dsub.add_parser("upload", help="copy a local shard tree to s3://")
    u.add_argument("local")
    u.add_argument("dest")
    s3(u)
    u.set_defaults(fn=cmd_upload)

    st = dsub.add_parser(
        "stream",
        help="stream a shard set through the Ray Data pipeline and report",
        description="Decode a shard set with the training pipeline on a local Ray "
        "(or RAY_ADDRESS) and print batch shapes, throughput and skip counts.",
    )
    st.add_argument("uri")
    st.add_argument("--config", help="YAML file with DataConfig keys")
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a DataConfig key; repeatable")
    st.add_argument("--limit", type=int, default=0, help="stop after this many samples (0 = all)")
    s3(st)
    st.set_defaults(fn=cmd_stream)

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

    ev = sub.add_parser(
        "eval",
        help="score a model directory on a shard set (retrieval, true/false or VQA)",
        description="Score a model directory (an export, a stage's model, a fine-tuned teacher) on "
        "a shard set for the task the set's manifest names: captions -> retrieval "
        "R@1/5/10 both ways, nlvr -> true/false accuracy, vqa -> VQA accuracy. Image "
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
    ev.set_defaults(fn=cmd_eval)

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

    pr = sub.add_parser(
        "promote",
        help="promote a registered model's challenger to champion, gated on evaluation",
        description="Re-evaluate the challenger and the champion of a registered model on a fixed "
        "evaluation set; move the champion alias only when the declared metrics improve "
        "by their margins and no guarded metric gets worse. Exit 1 when refused.",
    )
    promote_arguments(pr, None)
    pr.set_defaults(fn=run_promote)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (C.ConfigError, OSError, LookupError, ValueError, RuntimeError) as exc:
        print(f"vlforge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
