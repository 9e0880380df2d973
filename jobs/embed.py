"""Batch embedding: a registered dual-encoder embeds a shard set's images and captions into Parquet.

    python jobs/embed.py --model vlforge-dual-encoder --alias champion data/corpus/scenes/val --out out/emb/val
    python jobs/embed.py --model vlforge-dual-encoder --alias challenger s3://bucket/corpus/scenes/test \\
        --out s3://bucket/embeddings/scenes-test --concurrency 4 --batch-size 128
    ray job submit --working-dir . -- python jobs/embed.py --model vlforge-dual-encoder \\
        --alias champion s3://bucket/corpus/scenes/test --out s3://bucket/embeddings/test

The alias is resolved once, then Ray Data reads the shards (local or s3://), a pool of actors
loads the model version once each (safetensors from the MLflow registry, the model's own image
and tokenizer settings) and writes one Parquet row per usable sample: key, caption, shard,
image_embedding and text_embedding (unit-norm float32 lists; their dot product is the
retrieval score). See vlforge.workflows.embed.

With nothing set up it starts a local Ray and reads the local MLflow store (./mlflow.db);
RAY_ADDRESS and MLFLOW_TRACKING_URI (or --tracking-uri) point it at a cluster and a tracking
server, VLFORGE_S3_ENDPOINT at an S3-compatible server. Credentials come from the environment.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shards", help="shard set: directory, manifest.json, .tar, glob or s3:// URI")
    p.add_argument("--model", required=True, help="registered model name, e.g. vlforge-dual-encoder")
    p.add_argument("--alias", default="champion", help="registry alias to embed with (default: champion)")
    p.add_argument("--out", required=True, help="output directory for the Parquet files (must not hold files yet)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="rows per model call (default: 64)")
    p.add_argument("--concurrency", type=int, default=1, help="model actors running in parallel (default: 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (default: 0)")
    args = p.parse_args(argv)

    import ray

    from vlforge.runtime import init_ray
    from vlforge.workflows.embed import embed_shards

    if not ray.is_initialized():
        init_ray(num_train_workers=0)
    try:
        result = embed_shards(
            args.model,
            args.alias,
            args.shards,
            args.out,
            tracking_uri=args.tracking_uri,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            num_gpus=args.num_gpus,
        )
    except (LookupError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
