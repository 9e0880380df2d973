"""Batch embedding with a registered model: shards -> Ray Data -> Parquet (the body of ``jobs/embed.py``).

    from vlforge.workflows.embed import embed_shards
    result = embed_shards("vlforge-dual-encoder", "champion", "s3://bucket/corpus/scenes/test",
                          "s3://bucket/embeddings/scenes-test", concurrency=4)
    print(result.summary())

    python jobs/embed.py --model vlforge-dual-encoder --alias champion data/corpus/scenes/val --out out/emb

The alias is resolved once on the driver (``vlforge.serving.registry.resolve_alias``), so every
worker embeds with the same version even when the alias moves during the run. The shards (local
or ``s3://``, WebDataset layout) are read by the training pipeline's reader
(``vlforge.data.pipeline.read_raw``); a pool of ``concurrency`` Ray actors each downloads the
version's serving directory once, decodes rows with the training pipeline's ``decode_batch``
under the model's own ``preprocess.json`` / ``tokenizer.json`` (no augmentation; bad samples are
dropped and counted by reason) and computes the model's L2-normalised ``embed_image`` / ``embed_text``
(``vlforge.models.interface``; a VLMo's ITC embeddings). Every sample is
embedded as an image-caption pair: its first image and its ``.txt`` text (for VQA and NLVR2 sets,
the question or statement).

Output: Parquet files under ``out`` (which must not already hold files), one row per usable
sample: ``key`` (sample key), ``caption``, ``shard`` (the tar file), ``image_embedding`` and
``text_embedding`` (list<float32>, unit norm; their dot product is the model's retrieval score).

Devices: ``VLFORGE_SERVING_DEVICE`` when set, else CUDA when the actor sees a GPU (ask for one
with ``num_gpus``), else the CPU. MLflow credentials reach the actors through the environment
(locally inherited; on a cluster through the job's ``runtime_env``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vlforge.config import StorageConfig, TrackingConfig
from vlforge.data.pipeline import Counters, decode_batch, read_raw, sample_id
from vlforge.data.shards import list_shards, set_manifest
from vlforge.data.storage import absolute, arrow_filesystem, filesystem_for
from vlforge.evaluation.inference import image_embeddings, text_embeddings
from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, require
from vlforge.models.io import load_model_dir
from vlforge.tracking.store import resolve_tracking_uri

if TYPE_CHECKING:
    import pyarrow

__all__ = ["EMBED_COLUMNS", "EmbedResult", "embed_shards"]

EMBED_COLUMNS = ("key", "caption", "shard", "image_embedding", "text_embedding")
PROGRESS_EVERY_S = 15.0


@dataclass
class EmbedResult:
    out: str
    rows: int
    seconds: float
    model_uri: str = ""  # models:/<name>/<version> the alias pointed at
    alias: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> samples dropped while decoding

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"embedded {self.rows} samples with {self.model_uri} (alias {self.alias!r}) in "
            f"{self.seconds:.1f}s ({rate:.1f}/s); skipped: {skipped}\n  -> {self.out}"
        )


# ----------------------------------------------------------------------------- the actor


def _schema() -> pyarrow.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("shard", pa.string()),
            ("image_embedding", pa.list_(pa.float32())),
            ("text_embedding", pa.list_(pa.float32())),
        ]
    )


def _list_column(x: np.ndarray) -> pyarrow.Array:
    """[B, E] float32 -> list<float32> array of B rows (one buffer, no per-row copies)."""
    import pyarrow as pa

    b, e = x.shape
    offsets = pa.array(np.arange(0, (b + 1) * e, e, dtype=np.int32))  # [B + 1]
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1)))


def _kept_rows(raw_keys: np.ndarray, kept_ids: np.ndarray) -> list[int]:
    """Indices into the raw rows of the rows ``decode_batch`` kept (it keeps their order and reports
    each as ``sample_id(key)``)."""
    out, j = [], 0
    for want in kept_ids.tolist():
        while sample_id(str(raw_keys[j])) != want:
            j += 1
        out.append(j)
        j += 1
    return out


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8").strip()


class Embedder:
    """Ray Data callable: raw shard rows (``vlforge.data.pipeline.RAW_COLUMNS``) -> embedding rows.

    Loads the model once per actor: the serving directory of ``models:/<model_name>/<version>``.
    """

    def __init__(self, model_name: str, alias: str, version: str, tracking_uri: str, counters=None):
        import torch

        # lazy: pulls in mlflow
        from vlforge.serving.directory import serving_preprocessing
        from vlforge.serving.pyfunc_model import DEVICE_ENV
        from vlforge.serving.registry import download_serving_dir

        self._tmp = tempfile.mkdtemp(prefix="vlforge-embed-")
        serving = download_serving_dir(model_name, alias, tracking_uri, self._tmp, version=version)
        self.image, self.tokenizer = serving_preprocessing(serving)
        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = require(load_model_dir(serving, device), EMBED_IMAGE, EMBED_TEXT)
        self.counters = counters

    def __call__(self, batch: dict[str, np.ndarray]) -> pyarrow.Table:
        import pyarrow as pa
        import torch

        decoded = decode_batch(
            batch, image=self.image, tokenizer=self.tokenizer, kind="captions", train=False, counters=self.counters
        )
        if not decoded:
            return _schema().empty_table()
        rows = _kept_rows(batch["key"], decoded["sample_id"])
        n = len(rows)
        with torch.inference_mode():
            pv = torch.from_numpy(decoded["pixel_values"])  # [B, 3, H, W] float32, normalised
            ids = torch.from_numpy(decoded["input_ids"])  # [B, T]
            mask = torch.from_numpy(decoded["attention_mask"])  # [B, T]
            img = image_embeddings(self.model, pv, n).float().cpu().numpy()  # [B, E]
            txt = text_embeddings(self.model, ids, mask, n).float().cpu().numpy()  # [B, E]
        if self.counters is not None:
            self.counters.add.remote({"embedded": n})
        return pa.Table.from_arrays(
            [
                pa.array([str(batch["key"][i]) for i in rows], pa.string()),
                pa.array([_text(batch["text"][i]) for i in rows], pa.string()),
                pa.array([str(batch["url"][i]) for i in rows], pa.string()),
                _list_column(img),
                _list_column(txt),
            ],
            schema=_schema(),
        )

    def __del__(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)


# ----------------------------------------------------------------------------- the job


def _check_out(out: str, storage: StorageConfig | None) -> None:
    fs, path = filesystem_for(out, storage)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise FileExistsError(
            f"output {out} already exists and is not an empty directory; pick a new --out or remove it"
        )


def _progress(counters, stop: threading.Event, every_s: float, started: float) -> None:
    while not stop.wait(every_s):
        try:
            counts = counters.snapshot()
        except Exception:  # noqa: BLE001 - progress is best effort; the write reports real failures
            return
        skipped = sum(v for k, v in counts.items() if k.startswith("skipped."))
        print(
            f"embed: {counts.get('embedded', 0)} rows embedded, {counts.get('read', 0)} read, "
            f"{skipped} skipped ({time.monotonic() - started:.0f}s)",
            flush=True,
        )


def _count_rows(out: str, storage: StorageConfig | None) -> int:
    import pyarrow.dataset as pads

    fs, path = arrow_filesystem(out, storage)
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()


def embed_shards(
    model_name: str,
    alias: str,
    shards: str,
    out: str,
    *,
    tracking_uri: str | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    storage: StorageConfig | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> EmbedResult:
    """Embed every usable sample of the shard set ``shards`` with ``models:/<model_name>@<alias>``
    and write Parquet under ``out`` (see the module docstring). Needs Ray to be up.

    ``batch_size`` rows go through the model at a time; ``concurrency`` actors (each with
    ``num_cpus`` CPUs and ``num_gpus`` GPUs) run in parallel. LookupError for an unknown model
    or alias, FileNotFoundError / ValueError for a missing or empty shard set, FileExistsError
    when ``out`` already holds files.
    """
    import ray
    import ray.data

    # lazy: pulls in mlflow
    from vlforge.serving.registry import resolve_alias

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not ray.is_initialized():
        raise RuntimeError("embed_shards needs Ray: call vlforge.runtime.init_ray(num_train_workers=0) first")
    shards, out = absolute(shards), absolute(out)
    paths = list_shards(shards, storage)
    manifest = set_manifest(shards, storage)
    if not paths or (manifest is not None and manifest.total_samples == 0):
        raise ValueError(f"{shards}: the shard set is empty (no shards or no samples)")
    _check_out(out, storage)
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    version = resolve_alias(model_name, alias, uri)

    started = time.monotonic()
    counters = Counters.create()
    raw = read_raw(shards, storage, chunk_rows=batch_size)
    ds = raw.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_name": model_name,
            "alias": alias,
            "version": version.version,
            "tracking_uri": uri,
            "counters": counters.handle,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        zero_copy_batch=True,
    )
    fs, path = arrow_filesystem(out, storage)
    stop = threading.Event()
    reporter = threading.Thread(target=_progress, args=(counters, stop, progress_every_s, started), daemon=True)
    reporter.start()
    try:
        ds.write_parquet(path, filesystem=fs)
    finally:
        stop.set()
        reporter.join()
    counts = counters.snapshot()
    seconds = time.monotonic() - started
    rows = _count_rows(out, storage) if counts.get("embedded", 0) else 0
    skipped = Counters.skipped(counts)
    if rows == 0:
        raise ValueError(f"{shards}: no usable samples to embed ({counts.get('read', 0)} read, skipped {skipped})")
    return EmbedResult(out=out, rows=rows, seconds=seconds, model_uri=version.model_uri, alias=alias, skipped=skipped)
