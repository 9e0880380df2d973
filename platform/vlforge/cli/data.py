"""``vlforge data``: shard sets (build the corpus, ingest, list, verify, write a manifest, upload, stream).

vlforge data build-corpus [--out data/corpus] [--set n_scenes=500]
vlforge data ingest IMAGES_DIR CAPTIONS.csv|.jsonl --out DIR
vlforge data ls URI              # a shard set, local or s3://
vlforge data verify URI          # sizes and sha256 against the manifest (no manifest: read every shard)
vlforge data manifest URI        # write manifest.json for shards made elsewhere (img2dataset), as they are
vlforge data upload DIR s3://bucket/prefix
vlforge data stream URI          # stream it through Ray Data and print what arrives
"""

from __future__ import annotations

import argparse
import json
import time

from vlforge import config as C
from vlforge.cli.common import storage_config
from vlforge.data import adapters
from vlforge.data.corpus import build_corpus
from vlforge.data.ingest import IngestError, ingest
from vlforge.data.shards import list_shards, shard_set_summary, verify, write_manifest
from vlforge.data.storage import upload_dir
from vlforge.runtime import init_ray


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
    summary = shard_set_summary(args.uri, storage_config(args))
    for uri in list_shards(args.uri, storage_config(args)):
        print(uri)
    print(
        f"{summary['shards']} shard(s), {summary['samples'] if summary['samples'] is not None else '?'} samples"
        + (f", {summary['bytes'] / 1e6:.1f} MB" if summary["bytes"] else "")
    )
    return 0


def cmd_verify(args) -> int:
    problems = verify(args.uri, storage_config(args))
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_manifest(args) -> int:
    manifest, scans = write_manifest(
        args.uri, storage_config(args), kind=args.kind, force=args.force, progress=None if args.quiet else print
    )
    for sc in scans:
        for line in sc.detail:
            print(f"problem: {line}")
    problems = manifest.params["scan_problems"]
    print(
        f"wrote {args.uri.rstrip('/')}/manifest.json: {len(manifest.shards)} shard(s), "
        f"{manifest.total_samples} samples, kind {args.kind}"
        + (f"; problems: {', '.join(f'{k} {v}' for k, v in sorted(problems.items()))}" if problems else "")
    )
    return 1 if problems else 0


def cmd_upload(args) -> int:
    n = upload_dir(args.local, args.dest, storage_config(args))
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


INGEST_FORMATS = """formats (--format; the second argument is the format's main file):
  folder    CAPTIONS is a CSV/TSV/JSONL naming image files in IMAGES and their captions (the default)
  coco      a COCO captions JSON (captions_*.json): one sample per image, txt = first caption, json captions = all
  karpathy  a Karpathy split file (dataset_coco.json, dataset_flickr30k.json): one sample per image, all captions
  vqav2     VQAv2 questions JSON + --annotations JSON: one sample per question, soft answer scores, answers.json
  nlvr2     an NLVR2 JSONL file (train.json, dev.json, test1.json): sentence, true/false label, left + right image
"""


def add_parser(sub) -> None:
    data = sub.add_parser(
        "data",
        help="shard sets: build the corpus, ingest, list, verify, upload, stream",
        description="Shard sets in the WebDataset / img2dataset layout with a manifest.json.",
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _add_build_corpus(dsub)
    _add_ingest(dsub)
    _add_ls(dsub)
    _add_verify(dsub)
    _add_manifest(dsub)
    _add_upload(dsub)
    _add_stream(dsub)


def s3(sp):
    sp.add_argument(
        "--s3-endpoint", help="S3-compatible endpoint URL (default: $VLFORGE_S3_ENDPOINT / $AWS_ENDPOINT_URL)"
    )


def _add_build_corpus(dsub) -> None:
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


def _add_ingest(dsub) -> None:
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


def _add_ls(dsub) -> None:
    ls = dsub.add_parser("ls", help="list the shards of a set (local or s3://)")
    ls.add_argument("uri")
    s3(ls)
    ls.set_defaults(fn=cmd_ls)


def _add_verify(dsub) -> None:
    v = dsub.add_parser(
        "verify",
        help="check shards against the manifest's sizes and sha256 (no manifest: read "
        "every shard end to end and report what is wrong)",
    )
    v.add_argument("uri")
    s3(v)
    v.set_defaults(fn=cmd_verify)


def _add_manifest(dsub) -> None:
    m = dsub.add_parser(
        "manifest",
        help="write manifest.json for shards made elsewhere (img2dataset), as they are",
        description="Read every .tar under URI end to end (local or s3://) and write manifest.json "
        "beside them: per shard its sample count, size and sha256, and the data kind. The "
        "shards are not rewritten. Problems (unreadable tars, keys without an image or "
        "caption, counts that disagree with img2dataset's *_stats.json) are printed and "
        "counted in the manifest; the exit code is then 1. After this, 'vlforge data "
        "verify' checks the shards against it and every job reads the set.",
    )
    m.add_argument("uri", help="the directory holding the shards")
    m.add_argument(
        "--kind",
        "--task",  # the flag's old name
        dest="kind",
        default="captions",
        choices=list(C.DATA_KINDS),
        help="the data kind: what the samples hold (default: captions)",
    )
    m.add_argument("--force", action="store_true", help="rewrite an existing manifest.json")
    m.add_argument("--quiet", action="store_true", help="no line per shard")
    s3(m)
    m.set_defaults(fn=cmd_manifest)


def _add_upload(dsub) -> None:
    u = dsub.add_parser("upload", help="copy a local shard tree to s3://")
    u.add_argument("local")
    u.add_argument("dest")
    s3(u)
    u.set_defaults(fn=cmd_upload)


def _add_stream(dsub) -> None:
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
