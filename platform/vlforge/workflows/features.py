"""Feature caches of locked image towers: a shard set -> Ray Data actor pool -> feature shards beside it.

    path = ensure_feature_cache("data/corpus/nlvr2/train", "efficientnet_lite0", ImageConfig(size=128))
    # -> ".../nlvr2/train.features/efficientnet_lite0-128", built unless it is current

A model whose image tokenizer is locked (``vlforge.models.image_tokenizer``: ``vlmo_small_effnet``'s
frozen EfficientNet-Lite0) computes the same features for an image every time it sees it. As LiT
and open_clip's locked image tower allow, the two-stage job computes them once per training shard
set and trains on them (``features.enabled``), instead of running the tower on every batch of
every stage of every run.

Layout: ``<set>.features/<tokenizer>-<size>/`` beside the set ``<set>/``, a shard set of its own
(``manifest.json``, ``shard-NNNNN.tar``, and ``answers.json`` for VQA): each sample keeps its key,
``.txt`` and ``.json``, and its image becomes ``KEY.npy``, the tower's float16 feature grid
``[C, h, w]`` (``KEY.right.npy`` for an nlvr2 pair's second image). The training pipeline reads it
like any set and passes the features through as ``pixel_values`` ``[B, C, h, w]``
(``vlforge.data.pipeline``); the model's tokenizer lets them through. Images are decoded and
resized as training decodes them, without augmentation: a cached run trains without the
pipeline's random shifts and brightness.

A cache is current when its manifest names the same tokenizer, image size, background, mean and
std and the sha256 of the source set's manifest (a rebuilt corpus changes its manifests), and every
shard it lists is there; anything else is rebuilt, under a file lock beside a local cache so that two
jobs never build or replace one at once. Ray Data reads the shards; a pool of ``actors`` Ray actors
(1 CPU, 1 torch thread each; Ray fuses the decoding into them) loads the tower once and decodes and
tokenises batches of ``batch_size``; the cache keeps the source's shards (one cache shard per source shard) and sample
order. Samples that cannot be used (damaged, no image, no text) are left out, counted by reason in
``params.skipped``. S3 sets get their cache written locally, then uploaded beside them, manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlforge.config import ImageConfig, StorageConfig
from vlforge.data.pipeline import (
    Counters,
    as_bytes,
    decode_image,
    find_answers,
    normalise,
    read_raw,
    row_fields,
    row_images,
)
from vlforge.data.shards import FEATURE_EXT, MANIFEST, ShardWriter, list_shards, manifest_kind, set_manifest
from vlforge.data.storage import filesystem_for, is_remote

__all__ = ["FeatureCache", "cache_params", "cache_uri", "ensure_feature_cache", "model_tokenizer"]

CACHE_FORMAT = "vlforge-features/1"
PROGRESS_EVERY_S = 20.0


@dataclass
class FeatureCache:
    uri: str
    samples: int
    seconds: float  # 0 when an existing cache was current
    built: bool
    skipped: dict[str, int]


def cache_uri(shards: str, tokenizer: str, size: int) -> str:
    """Where the cache of ``shards`` under ``tokenizer`` at ``size`` px lives: beside the set."""
    return f"{shards.rstrip('/')}.features/{tokenizer}-{size}"


def model_tokenizer(model: str, overrides: dict[str, Any] | None = None) -> tuple[str, int] | None:
    """``(tokenizer, img_size)`` of a registered model with a locked image tokenizer, else None.
    The model is built on the meta device: no weights are loaded."""
    import torch

    from vlforge.models.registry import create_model

    with torch.device("meta"):
        m = create_model(model, **(overrides or {}))
    embed = getattr(m, "image_embed", None)
    tok = getattr(embed, "tokenizer", None)
    if tok is None or not getattr(tok, "locked", False):
        return None
    return tok.name, embed.img_size


def _source_digest(shards: str, storage: StorageConfig | None) -> str:
    fs, path = filesystem_for(shards, storage)
    mpath = f"{path.rstrip('/')}/{MANIFEST}"
    if not fs.exists(mpath):
        raise ValueError(
            f"{shards}: a feature cache needs the set's {MANIFEST} (`vlforge data manifest {shards}` writes one)"
        )
    with fs.open(mpath, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _pixels(batch: dict[str, np.ndarray], *, size: int, background, kind: str, counters=None) -> dict:
    """Raw rows -> the usable ones with their decoded images ``[n, H, W, 3]`` uint8 (a read task)."""
    n = len(batch["key"])
    keep, pix, pix2, texts, metas = [], [], [], [], []
    skipped: Counter[str] = Counter()
    for i in range(n):
        got = row_fields(batch, i, kind)
        if isinstance(got, str):
            skipped[got] += 1
            continue
        images = row_images(batch, i, kind, got[0], size, background, decoder=decode_image)  # pixels only
        if isinstance(images, str):
            skipped[images] += 1
            continue
        a, a2 = images
        keep.append(i)
        pix.append(a)
        if a2 is not None:
            pix2.append(a2)
        texts.append(as_bytes(batch["text"][i]))
        metas.append(as_bytes(batch["json"][i]) or b"")
    if counters is not None:
        import ray

        ray.get(counters.add.remote({"read": n, **{f"skipped.{k}": v for k, v in skipped.items()}}))
    if not keep:
        return {}
    out = {
        "key": batch["key"][keep],
        "url": batch["url"][keep],
        "index": batch["index"][keep],
        "text": np.array(texts, dtype=object),
        "json": np.array(metas, dtype=object),
        "pixels": np.stack(pix),  # [n, H, W, 3]
    }
    if pix2:
        out["pixels_2"] = np.stack(pix2)
    return out


class _Tokenize:
    """A Ray Data actor: the locked tower, loaded once; pixels -> float16 feature grids."""

    def __init__(self, name: str, image: ImageConfig, counters=None) -> None:
        import torch

        from vlforge.models.image_tokenizer import create_image_tokenizer

        torch.set_num_threads(1)
        self.tok = create_image_tokenizer(name, image.size)
        self.tok.net.to(memory_format=torch.channels_last)  # +8-16 % over channels-last input alone
        self.image = image
        self.counters = counters

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        for src, dst in (("pixels", "features"), ("pixels_2", "features_2")):
            if src in batch:
                x = torch.from_numpy(normalise(batch.pop(src), self.image))  # [n, 3, H, W]
                batch[dst] = self.tok(x).to(torch.float16).numpy()  # [n, C, h, w]
        if self.counters is not None:
            import ray

            ray.get(self.counters.add.remote({"ok": len(batch["key"])}))
        return batch


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _progress(counters: Counters, stop: threading.Event, label: str, total: int, started: float, log) -> None:
    while not stop.wait(PROGRESS_EVERY_S):
        try:
            done = counters.snapshot().get("ok", 0)
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        log(f"features {label}: {done}/{total} samples ({time.monotonic() - started:.0f}s)")


def _set_dir(shards: str) -> str:
    """The set directory of ``shards`` (a set's ``manifest.json`` names its set)."""
    shards = shards.rstrip("/")
    return shards[: -len(MANIFEST) - 1] if shards.endswith(f"/{MANIFEST}") else shards


def cache_params(shards: str, tokenizer: str, image: ImageConfig, storage: StorageConfig | None = None) -> dict:
    """What a cache of ``shards`` must have been built from to be current (its manifest's params)."""
    manifest = set_manifest(shards, storage)
    if manifest is None:
        raise ValueError(f"{shards}: a feature cache is built for a shard set directory with a {MANIFEST}")
    return {
        "format": CACHE_FORMAT,
        "kind": manifest_kind(manifest),
        "tokenizer": tokenizer,
        "img_size": image.size,
        "background": list(image.background),
        "mean": list(image.mean),
        "std": list(image.std),
        "source_manifest_sha256": _source_digest(shards, storage),
    }


def _current(uri: str, params: dict, storage: StorageConfig | None) -> FeatureCache | None:
    fs, path = filesystem_for(uri, storage)
    if not fs.exists(f"{path}/{MANIFEST}"):
        return None
    existing = set_manifest(uri, storage)
    if existing is None or any(existing.params.get(k) != v for k, v in params.items()):
        return None
    try:
        list_shards(uri, storage)  # every shard the manifest lists is there (an upload cut short is not)
    except (FileNotFoundError, ValueError):
        return None
    return FeatureCache(uri, existing.total_samples, 0.0, False, dict(existing.params.get("skipped", {})))


@contextlib.contextmanager
def _build_lock(uri: str) -> Iterator[None]:
    """For a local cache: an exclusive ``flock`` on ``<cache>.lock`` (released when the holder dies),
    so two jobs never build or replace the same cache at once. S3 caches take no lock."""
    if is_remote(uri):
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(uri), exist_ok=True)
    with open(f"{uri}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_feature_cache(
    shards: str,
    tokenizer: str,
    image: ImageConfig,
    *,
    storage: StorageConfig | None = None,
    actors: int = 2,
    batch_size: int = 64,
    verify_sha256: bool = False,
    log: Callable[[str], None] = print,
) -> FeatureCache:
    """The feature cache of ``shards`` under the locked ``tokenizer`` at ``image.size`` px, built (or
    rebuilt) unless it is current; see the module docstring. Needs Ray to be up. ValueError for a
    source that is not a shard set directory with a manifest."""
    if actors < 1 or batch_size < 1:
        raise ValueError(f"actors and batch_size must be >= 1, got {actors} and {batch_size}")
    shards = _set_dir(shards)
    uri = cache_uri(shards, tokenizer, image.size)
    params = cache_params(shards, tokenizer, image, storage)
    found = _current(uri, params, storage)
    if found is not None:
        return found
    with _build_lock(uri):
        found = _current(uri, params, storage)  # built by another job while this one waited
        if found is not None:
            return found
        return _build(shards, uri, params, image, storage, actors, batch_size, verify_sha256, log)


def _build(shards, uri, params, image, storage, actors, batch_size, verify_sha256, log) -> FeatureCache:
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RuntimeError("ensure_feature_cache needs Ray: call vlforge.runtime.init_ray() first")
    manifest = set_manifest(shards, storage)
    kind = params["kind"]
    started = time.monotonic()
    label = "/".join(shards.split("/")[-2:])
    total = manifest.total_samples
    log(f"features {label}: computing {params['tokenizer']} features of {total} samples ({actors} actors) -> {uri}")
    counters = Counters.create()
    raw = read_raw(shards, storage, chunk_rows=batch_size, verify_sha256=verify_sha256)
    ds = raw.map_batches(
        _pixels,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=dict(size=image.size, background=image.background, kind=kind, counters=counters.handle),
        zero_copy_batch=True,
    ).map_batches(
        _Tokenize,
        # features of normalised images, whatever the stage's ``normalize`` (which only moves the step)
        fn_constructor_kwargs=dict(
            name=params["tokenizer"], image=dataclasses.replace(image, normalize=True), counters=counters.handle
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        zero_copy_batch=True,
    )
    ds.context.execution_options.preserve_order = True  # the cache keeps the source's sample order
    ds.context.enable_progress_bars = False
    answers = find_answers(shards, storage) if kind == "vqa" else None

    _, path = filesystem_for(uri, storage)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    local = tempfile.mkdtemp(prefix=".features-", dir=None if is_remote(uri) else os.path.dirname(path))
    stop = threading.Event()
    reporter = threading.Thread(
        target=_progress, args=(counters, stop, label, total, started, log), daemon=True, name="vlforge-features"
    )
    reporter.start()
    try:
        writer = ShardWriter(local, samples_per_shard=1 << 62, params=params)
        url = None
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["key"])):
                if url is not None and batch["url"][i] != url:
                    writer.end_shard()  # one cache shard per source shard: the stream splits them alike
                url = batch["url"][i]
                extra = {f"right.{FEATURE_EXT}": _npy(batch["features_2"][i])} if "features_2" in batch else None
                meta_bytes = bytes(batch["json"][i])
                writer.write(
                    str(batch["key"][i]),
                    image=_npy(batch["features"][i]),
                    image_ext=FEATURE_EXT,
                    text=bytes(batch["text"][i]).decode("utf-8", "replace"),
                    meta=json.loads(meta_bytes) if meta_bytes else None,
                    extra=extra,
                )
        writer.params["skipped"] = Counters.skipped(counters.snapshot())
        written = writer.close()
        if answers is not None:
            with open(os.path.join(local, "answers.json"), "w") as f:
                json.dump(answers, f, indent=1)
        if written.total_samples == 0:
            raise ValueError(f"{shards}: no usable samples to cache (skipped {writer.params['skipped']})")
        _publish(local, uri, storage)
    finally:
        stop.set()
        reporter.join()
        shutil.rmtree(local, ignore_errors=True)
    seconds = time.monotonic() - started
    log(f"features {label}: {written.total_samples} samples in {seconds:.0f}s -> {uri}")
    return FeatureCache(uri, written.total_samples, seconds, True, dict(writer.params["skipped"]))


def _publish(local: str, uri: str, storage: StorageConfig | None) -> None:
    """Replace the cache at ``uri`` with the finished one in ``local``: a rename for a local cache;
    for S3, the old objects removed, then the new ones uploaded with the manifest last (a cut-short
    upload leaves no manifest, or one whose shards are missing: not current either way)."""
    fs, path = filesystem_for(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if is_remote(uri):
        files = sorted(os.listdir(local), key=lambda name: (name == MANIFEST, name))
        fs.makedirs(path, exist_ok=True)
        for name in files:
            fs.put_file(os.path.join(local, name), f"{path}/{name}")
    else:
        os.chmod(local, 0o755)  # mkdtemp's 0700 would hide the cache from other users
        os.replace(local, path)
