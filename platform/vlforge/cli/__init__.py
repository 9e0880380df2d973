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
import sys

from vlforge import config as C
from vlforge.cli import data, promote, register, sweep
from vlforge.cli import eval as evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlforge",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'vlforge COMMAND --help' for details.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data.add_parser(sub)
    sweep.add_parser(sub)
    evaluate.add_parser(sub)
    register.add_parser(sub)
    promote.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (C.ConfigError, OSError, LookupError, ValueError, RuntimeError) as exc:
        print(f"vlforge: error: {exc}", file=sys.stderr)
        return 2
