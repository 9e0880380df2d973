"""Ray Data pipelines: WebDataset shards -> decoded, tokenised batches for Ray Train.

    ds, counters = build_dataset(DataConfig(shards="s3://bucket/corpus/scenes/train"))
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=ExactSplit(), ...)
    # in the worker loop:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=64):
        batch["pixel_values"]    # [B, 3, H, W] float32, normalised (a feature-cache set: [B, C, h, w])
        batch["input_ids"]       # [B, T] int64; batch["attention_mask"] [B, T]
        batch["answer_targets"]  # VQAv2-style shards only: [B, A] float32, min(1, count / 3) per answer
    counters.snapshot()          # {"read": ..., "ok": ..., "skipped.corrupt_image": ...}

Reading uses Ray Data's WebDataset datasource (file listing, S3 through s3fs,
file shuffling, tar member grouping). Its stock ``_read_stream`` fails the whole
read when a tar member is truncated and builds columns from whatever suffixes a
sample has; ``ShardDatasource`` keeps Ray's tar iteration and grouping but stops
cleanly at a truncated member (marking that sample) and emits a fixed set of raw
byte columns, so every block has one schema. Decoding happens in ``map_batches``
(``decode_batch``): image decode + resize + normalise + light augmentation,
tokenisation, the fields of the set's data kind. A feature-cache set (``vlforge.workflows.features``)
holds a locked image tower's float16 feature grids as ``.npy`` members in place of images; they
pass through as ``pixel_values`` [B, C, h, w] float32, never augmented. Bad samples are dropped
there and counted by reason in a ``DataCounters`` actor whose totals reach the caller.

Reasons: ``truncated_member`` (shard ends inside this sample's tar member),
``corrupt_tar`` (an unparseable tar header; the rest of that shard is lost),
``missing_image``, ``missing_caption``, ``bad_json``, ``missing_field`` (e.g. a
VQA sample without an answer), ``corrupt_image``, ``truncated_image``.

CPU plan on small machines: Train workers hold their CPUs for the whole run, and
Ray Data can only schedule decode tasks on what is left. Locally, ``init_ray``
declares ``num_train_workers * worker_cpus + data_cpus`` logical CPUs (at least
the core count for data), so decode tasks always have slots and nothing waits
forever; the OS time-shares the real cores. On a cluster, Train workers ask for
GPUs and a few CPUs, and decode tasks run on the CPU-only data nodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from vlforge.config import DATA_KINDS, DataConfig, ImageConfig, StorageConfig, TokenizerConfig
from vlforge.data.images import WHITE, to_rgb
from vlforge.data.negatives import swap_phrase
from vlforge.data.shards import FEATURE_EXT, IMAGE_EXTS, list_shards, manifest_kind, set_manifest, verify
from vlforge.data.storage import arrow_filesystem, check_reachable, filesystem_for
from vlforge.data.tokenizer import load_tokenizer
from vlforge.runtime import tune_malloc

if TYPE_CHECKING:
    import pyarrow
    import ray.data

RAW_COLUMNS = ("key", "url", "index", "image", "image_2", "text", "json", "error")
SKIP_REASONS = (
    "truncated_member",
    "corrupt_tar",
    "missing_image",
    "missing_caption",
    "bad_json",
    "missing_field",
    "corrupt_image",
    "truncated_image",
)
READ_CHUNK_ROWS = 128
MIN_READ_TASKS = 8  # task grouping (``read_tasks``) never leaves an epoch fewer tasks than this


# ----------------------------------------------------------------------------- reading


def _members(stream) -> Iterator[dict]:
    """Tar members as ``{"fname", "data"}`` (what Ray's grouping takes), tolerating damage.

    A member whose data is cut off ends the stream with a ``KEY.__error__`` entry
    (``truncated_member``), so that sample is marked and every sample before it
    survives. A header that cannot be parsed (bad checksum, garbage) ends the stream
    with a ``corrupt_tar`` entry: the rest of that shard is unreadable. (tarfile
    ends a stream whose last header is cut off silently; that sample then lacks
    members and is counted by what it lacks.)
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        members = iter(tar)
    except (tarfile.TarError, EOFError, OSError) as exc:
        yield {"fname": "__corrupt__.__error__", "data": f"corrupt_tar: {exc}".encode()}
        return
    while True:
        try:
            info = next(members)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield {"fname": "__corrupt__.__error__", "data": f"corrupt_tar: {exc}".encode()}
            return
        if not info.isreg():
            continue
        try:
            data = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            head, _, name = info.name.rpartition("/")
            key = name.split(".", 1)[0]
            yield {"fname": f"{head + '/' if head else ''}{key}.__error__", "data": f"truncated_member: {exc}".encode()}
            return
        yield {"fname": info.name, "data": data}


def raw_row(sample: dict[str, Any], url: str, index: int | None = None) -> dict[str, Any]:
    """A grouped sample (``{"__key__", suffix: bytes}``) as one row of ``RAW_COLUMNS``; ``index``: its
    position in its shard (what the deterministic stream splits ranks by)."""
    image = image_2 = text = meta = error = None
    feats: list[bytes | None] = [None, None]  # a feature cache's grids; an image member wins over them
    for suffix, value in sample.items():
        if suffix.startswith("__"):
            if suffix == "__error__":
                error = value.decode("utf-8", "replace")
            continue
        parts = suffix.lower().split(".")
        if parts[-1] in IMAGE_EXTS or parts[-1] == FEATURE_EXT:
            slot = 0 if len(parts) == 1 else 1 if parts[0] in ("right", "2", "image2", "img2") else None
            if slot is not None and parts[-1] == FEATURE_EXT:
                feats[slot] = value
            elif slot == 0:
                image = value
            elif slot == 1:
                image_2 = value
        elif parts == ["txt"] or parts == ["text"] or parts == ["caption"]:
            text = value
        elif parts == ["json"]:
            meta = value
    return {
        "key": sample["__key__"],
        "url": url,
        "index": index,
        "image": image if image is not None else feats[0],
        "image_2": image_2 if image_2 is not None else feats[1],
        "text": text,
        "json": meta,
        "error": error,
    }


def read_stream(stream, path: str, chunk_rows: int = READ_CHUNK_ROWS) -> Iterator[pyarrow.Table]:
    """One shard's samples as pyarrow tables of ``RAW_COLUMNS``, ``chunk_rows`` rows each."""
    import pyarrow as pa
    from ray.data._internal.datasource.webdataset_datasource import _group_by_keys

    rows = []
    for i, sample in enumerate(_group_by_keys(_members(stream), meta=dict(__url__=path))):
        rows.append(raw_row(sample, path, i))
        if len(rows) >= chunk_rows:
            yield _to_table(pa, rows)
            rows = []
    if rows:
        yield _to_table(pa, rows)


def _datasource_class():
    from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

    class ShardDatasource(WebDatasetDatasource):
        """Ray's WebDataset datasource, emitting ``RAW_COLUMNS`` and surviving damaged shards."""

        chunk_rows = READ_CHUNK_ROWS

        def _read_stream(self, stream, path: str):
            yield from read_stream(stream, path, self.chunk_rows)

    return ShardDatasource


def _to_table(pa, rows: list[dict]):
    return pa.table(
        {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "url": pa.array([r["url"] for r in rows], pa.string()),
            "index": pa.array([r["index"] for r in rows], pa.int64()),
            "image": pa.array([r["image"] for r in rows], pa.binary()),
            "image_2": pa.array([r["image_2"] for r in rows], pa.binary()),
            "text": pa.array([r["text"] for r in rows], pa.binary()),
            "json": pa.array([r["json"] for r in rows], pa.binary()),
            "error": pa.array([r["error"] for r in rows], pa.string()),
        }
    )


def check_against_manifest(uri: str, storage: StorageConfig | None = None) -> None:
    """ValueError unless every shard matches the manifest's size and sha256 (``data.verify_sha256``)."""
    problems = verify(uri, storage)
    if problems:
        raise ValueError(f"{uri}: shards do not match the manifest: " + "; ".join(problems[:5]))


def shard_counts(uri: str, storage: StorageConfig | None, n_paths: int) -> list[int] | None:
    """Samples per shard from the set's manifest, in its order; None for a single tar, a glob, a set
    without a manifest, or a manifest that lists another number of shards than ``n_paths``."""
    manifest = set_manifest(uri, storage)
    if manifest is None or len(manifest.shards) != n_paths:
        return None
    return [s.samples for s in manifest.shards]


def read_tasks(counts: list[int] | None, task_samples: int) -> int | None:
    """How many read tasks a set of shards with ``counts`` samples gets: adjacent shards grouped until
    a task covers ``task_samples``, but at least ``MIN_READ_TASKS`` (or one per shard, if fewer);
    None (one task per shard) without counts or with ``task_samples`` 0."""
    if not counts or task_samples <= 0:
        return None
    n = len(counts)
    group = max(1, math.ceil(task_samples / max(1.0, sum(counts) / n)))
    return min(n, max(MIN_READ_TASKS, math.ceil(n / group)))


def read_raw(
    uri: str,
    storage: StorageConfig | None = None,
    shuffle_seed: int | None = None,
    verify_sha256: bool = False,
    chunk_rows: int = 128,
    paths: list[str] | None = None,
    num_tasks: int | None = None,
    **read_args,
) -> ray.data.Dataset:
    """One row per sample with raw byte columns (``RAW_COLUMNS``), from local or ``s3://`` shards;
    ``paths``: these shards of the set, in this order, instead of all of them; ``num_tasks``: read
    tasks, each a run of adjacent shards in that order (default one per shard, see ``read_tasks``)."""
    import ray.data
    from ray.data import FileShuffleConfig

    paths = list(paths) if paths is not None else list_shards(uri, storage)
    if verify_sha256:
        check_against_manifest(uri, storage)
    fs, _ = arrow_filesystem(uri, storage)
    if fs is not None:
        paths = [p.split("://", 1)[1] for p in paths]
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    source = _datasource_class()(paths, filesystem=fs, shuffle=shuffle, file_extensions=["tar"])
    source.chunk_rows = chunk_rows
    # At most one read task per shard: Ray would otherwise split small shard sets into more
    # blocks, and a split read cannot fuse with the decode step that follows it. Fewer tasks
    # than shards read runs of adjacent shards (Ray splits the path list into contiguous parts).
    read_args.setdefault("override_num_blocks", min(num_tasks or len(paths), len(paths)))
    return ray.data.read_datasource(source, **read_args)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, size: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> ``[size, size, 3]`` uint8 (JPEG decoded at reduced scale when possible);
    transparency (alpha, palette or colour-key) is composited over ``background``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        im = to_rgb(im, background)
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def decode_features(data: bytes) -> np.ndarray:
    """A feature cache's ``.npy`` member -> its float16 feature grid ``[C, h, w]`` (ValueError if it is none)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 3 or arr.dtype != np.float16:
        raise ValueError(f"not a cached feature grid: {arr.dtype} {arr.shape}")
    return arr


def decode_pixels_or_features(data: bytes, size: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Image bytes -> ``[size, size, 3]`` uint8 (``decode_image``); cached features (``.npy``) ->
    float16 ``[C, h, w]`` (``decode_features``)."""
    if data[:6] == b"\x93NUMPY":
        return decode_features(data)
    return decode_image(data, size, background)


def image_error(exc: Exception) -> str:
    msg = str(exc).lower()
    return "truncated_image" if "truncat" in msg or isinstance(exc, EOFError) else "corrupt_image"


def sample_id(key: str) -> int:
    """A stable non-negative int64 per sample key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF


def augment(images: np.ndarray, cfg: ImageConfig, rng: np.random.Generator) -> np.ndarray:
    """Random translation (edge padding) and brightness. No flips: captions name left and right."""
    b, h, w, _ = images.shape
    out = np.empty_like(images)
    pad = int(round(cfg.max_shift * h))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else images
    for i in range(b):
        dy, dx = rng.integers(0, 2 * pad + 1, size=2) if pad else (0, 0)
        out[i] = padded[i, dy : dy + h, dx : dx + w]
    if cfg.brightness > 0:
        factor = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, size=(b, 1, 1, 1))
        out = np.clip(out.astype(np.float32) * factor, 0, 255).astype(np.uint8)
    return out


def normalise(images: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float32 (uint8 when ``cfg.normalize`` is off)."""
    chw = images.transpose(0, 3, 1, 2)  # [B, 3, H, W]
    if not cfg.normalize:
        return np.ascontiguousarray(chw)
    mean = np.asarray(cfg.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(1, 3, 1, 1)
    return (chw.astype(np.float32) / 255.0 - mean) / std


def finish_pixels(batch: dict, cfg: ImageConfig) -> dict:
    """Normalise uint8 ``pixel_values`` / ``pixel_values_2`` torch tensors on the consumer's device."""
    import torch

    for key in ("pixel_values", "pixel_values_2"):
        x = batch.get(key)
        if x is not None and x.dtype == torch.uint8:
            mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
            batch[key] = (x.float() / 255.0 - mean) / std
    return batch


@lru_cache(maxsize=4)
def _tokenizer(name: str, max_length: int, lowercase: bool):
    return load_tokenizer(TokenizerConfig(name=name, max_length=max_length, lowercase=lowercase))


def tokenize(texts: list[str], cfg: TokenizerConfig) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}`` ``[N, T]`` for ``texts``, with the pipeline's cached tokenizer."""
    return _tokenizer(cfg.name, cfg.max_length, cfg.lowercase)(texts)


def caption_list(meta: dict[str, Any]) -> list[str]:
    """A sample's captions from its metadata (``captions``, as the COCO / Karpathy adapters write), or []."""
    caps = meta.get("captions")
    if not isinstance(caps, list):
        return []
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()]


def as_bytes(v: Any) -> bytes | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return bytes(v)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image: ImageConfig,
    tokenizer: TokenizerConfig,
    kind: str = "captions",
    answers: list[str] | None = None,
    train: bool = True,
    counters=None,
    keep: tuple[int, int, dict[str, int]] | None = None,
    seed: int | None = None,
    swap: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Raw rows -> the batch contract; bad rows are dropped and counted by reason.

    ``keep`` = ``(rank, world, offsets)``: only the rows whose stream position ``offsets[url] +
    index`` is ``rank`` modulo ``world`` (the deterministic stream's split; the others are
    another rank's and are neither decoded nor counted). ``seed``: augmentation and caption
    choice are drawn from it and the block's first key, so a block decodes the same every time.
    ``swap`` (captions only): phrases of which one is swapped for another to make each row's
    hard-negative caption (``neg_input_ids`` / ``neg_attention_mask``; ``neg_valid`` 0 where the
    caption holds none of them), see ``vlforge.data.negatives``.
    """
    tune_malloc()
    if keep is not None:
        batch = _rows_for_rank(batch, *keep)
    n = len(batch["key"])
    answer_index = {a: i for i, a in enumerate(answers or [])}
    rows = _Rows()
    skipped: Counter[str] = Counter()
    size, bg = image.size, image.background
    block = sample_id(str(batch["key"][0])) & 0xFFFF_FFFF if n else 0
    rng = np.random.default_rng(None if seed is None else [seed, block])
    for i in range(n):
        got = row_fields(batch, i, kind)
        if isinstance(got, str):
            skipped[got] += 1
            continue
        img_bytes, text, meta = got
        if train and kind == "captions":
            caps = caption_list(meta)
            if len(caps) > 1:  # one of the image's captions per epoch (COCO-style samples carry several)
                text = caps[int(rng.integers(len(caps)))]
        images = row_images(batch, i, kind, img_bytes, size, bg)
        if isinstance(images, str):
            skipped[images] += 1
            continue
        rows.add(str(batch["key"][i]), *images, text, kind, meta, answer_index)
    if counters is not None:
        import ray

        counts = {"read": n, "ok": len(rows.keys), **{f"skipped.{k}": v for k, v in skipped.items()}}
        ray.get(counters.add.remote(counts))
    if not rows.keys:
        # A block with no usable row: zero-length tensor columns would not convert to
        # Arrow tensors (Ray falls back to pickled objects and the schemas then differ).
        return {}
    return rows.collate(kind, image, tokenizer, train, rng, answer_index, swap)


def row_fields(batch: dict[str, np.ndarray], i: int, kind: str) -> tuple[bytes, str, dict[str, Any]] | str:
    """Row ``i``'s image bytes, caption and metadata; or, for a row that cannot be used, the
    reason it is skipped (one of ``SKIP_REASONS``)."""
    error = batch["error"][i]
    if error is not None:
        reason = str(error).split(":", 1)[0]
        return reason if reason in SKIP_REASONS else "truncated_member"
    img_bytes = as_bytes(batch["image"][i])
    if img_bytes is None:
        return "missing_image"
    text_bytes = as_bytes(batch["text"][i])
    try:
        text = text_bytes.decode("utf-8").strip() if text_bytes is not None else ""
    except UnicodeDecodeError:
        text = ""
    if not text:
        return "missing_caption"
    meta: dict[str, Any] = {}
    json_bytes = as_bytes(batch["json"][i])
    if json_bytes is not None:
        try:
            meta = json.loads(json_bytes)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return "bad_json"
    if kind == "vqa" and "answer" not in meta:
        return "missing_field"
    if kind == "nlvr2" and ("label" not in meta or as_bytes(batch["image_2"][i]) is None):
        return "missing_field"
    return img_bytes, text, meta


def row_images(
    batch: dict[str, np.ndarray], i: int, kind: str, img_bytes: bytes, size: int, background, decoder=None
) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Row ``i``'s image (and an nlvr2 row's second image) through ``decoder`` (default
    ``decode_pixels_or_features``); or, when one does not decode, the reason the row is skipped."""
    decoder = decoder or decode_pixels_or_features
    try:
        arr = decoder(img_bytes, size, background)
        arr2 = decoder(as_bytes(batch["image_2"][i]), size, background) if kind == "nlvr2" else None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample
        return image_error(exc)
    return arr, arr2


def image_truth(meta: dict[str, Any]) -> list[int]:
    """An nlvr2 row's per-image truths [left, right] from its json ``relation_holds`` (the built-in
    corpus writes it; public NLVR2 has none): 1 / 0, or -100 (unknown) for each."""
    holds = meta.get("relation_holds")
    if isinstance(holds, list) and len(holds) == 2 and all(isinstance(h, bool) for h in holds):
        return [int(h) for h in holds]
    return [-100, -100]


@dataclass
class _Rows:
    """The usable rows of one block, column by column, until they are stacked into the batch."""

    keys: list[str] = field(default_factory=list)
    imgs: list[np.ndarray] = field(default_factory=list)
    imgs2: list[np.ndarray] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    truths: list[list[int]] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    scores: list[dict | None] = field(default_factory=list)

    def add(self, key, arr, arr2, text, kind, meta, answer_index) -> None:
        self.keys.append(key)
        self.imgs.append(arr)
        if arr2 is not None:
            self.imgs2.append(arr2)
        self.texts.append(text)
        if kind == "vqa":
            self.answer_ids.append(answer_index.get(str(meta["answer"]), -100))
            self.scores.append(meta.get("answer_scores") if isinstance(meta.get("answer_scores"), dict) else None)
        if kind == "nlvr2":
            self.labels.append(int(bool(meta["label"])))
            self.truths.append(image_truth(meta))

    def collate(self, kind, image: ImageConfig, tokenizer: TokenizerConfig, train: bool, rng, answer_index, swap=()):
        tok = _tokenizer(tokenizer.name, tokenizer.max_length, tokenizer.lowercase)
        out = {
            "pixel_values": self._images(self.imgs, image, train, rng),
            **tok(self.texts),
            "sample_id": np.array([sample_id(k) for k in self.keys], dtype=np.int64),
        }
        if kind == "nlvr2":
            out["pixel_values_2"] = self._images(self.imgs2, image, train, rng)
            out["label"] = np.array(self.labels, dtype=np.int64)
            out["image_truth"] = np.array(self.truths, dtype=np.int64)  # [B, 2]
        if kind == "vqa":
            out["answer_id"] = np.array(self.answer_ids, dtype=np.int64)
            if any(s is not None for s in self.scores):
                out["answer_targets"] = answer_targets(self.scores, self.answer_ids, answer_index)
        if swap and kind == "captions":
            negs = [swap_phrase(t, swap, rng) for t in self.texts]
            neg = tok([n if n is not None else t for n, t in zip(negs, self.texts)])
            out["neg_input_ids"], out["neg_attention_mask"] = neg["input_ids"], neg["attention_mask"]
            differs = (neg["input_ids"] != out["input_ids"]).any(axis=1)  # a swap past max_length is no negative
            out["neg_valid"] = (np.array([n is not None for n in negs]) & differs).astype(np.int64)
        return out

    @staticmethod
    def _images(imgs: list[np.ndarray], image: ImageConfig, train: bool, rng) -> np.ndarray:
        """Pixels -> ``[B, 3, H, W]`` (augmented when training, normalised); cached features
        ``[B, C, h, w]`` float32 as they are (a locked tower's features of the un-augmented image)."""
        if imgs[0].dtype == np.float16:
            if any(a.shape != imgs[0].shape or a.dtype != np.float16 for a in imgs):
                raise ValueError("a block mixes cached features of different shapes with pixels")
            return np.stack(imgs).astype(np.float32)  # [B, C, h, w]
        stack = np.stack(imgs)  # [B, H, W, 3] uint8
        if train and image.augment:
            stack = augment(stack, image, rng)
        return normalise(stack, image)


def _rows_for_rank(batch: dict[str, np.ndarray], rank: int, world: int, offsets: dict[str, int]) -> dict:
    pos = np.array([offsets[str(u)] for u in batch["url"]], dtype=np.int64) + batch["index"].astype(np.int64)
    mine = np.flatnonzero(pos % world == rank)
    return {k: v[mine] for k, v in batch.items()}


def answer_targets(
    scores: list[dict[str, float] | None], answer_ids: list[int], answer_index: dict[str, int]
) -> np.ndarray:
    """VQAv2 soft targets ``[B, A]`` float32: each vocabulary answer's ``min(1, count / 3)`` score
    (``answer_scores`` written by the VQAv2 adapter; answers outside the vocabulary are dropped).
    A row without scores gets a one-hot of its ``answer_id`` (none when that is -100)."""
    out = np.zeros((len(answer_ids), len(answer_index)), dtype=np.float32)  # [B, A]
    for i, (row, aid) in enumerate(zip(scores, answer_ids)):
        if row is None:
            if aid >= 0:
                out[i, aid] = 1.0
            continue
        for answer, score in row.items():
            j = answer_index.get(str(answer))
            if j is not None:
                out[i, j] = float(score)
    return out


# ----------------------------------------------------------------------------- counters


def _counters_class():
    import ray

    @ray.remote(num_cpus=0)
    class DataCounters:
        """Samples read / kept / skipped by reason, summed over every decode task."""

        def __init__(self):
            self.counts: dict[str, int] = {}

        def add(self, delta: dict[str, int]) -> None:
            for k, v in delta.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)

        def get(self) -> dict[str, int]:
            return dict(self.counts)

        def reset(self) -> None:
            self.counts = {}

    return DataCounters


class Counters:
    """Driver-side handle on the counters actor (picklable: pass it to Train workers)."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def create(cls) -> Counters:
        """A new counters actor on the driver's node: the node a job cannot lose without ending. (Placed
        anywhere, it could land on a worker node; when that node died every decode task failed on
        its ``add`` and no restart of the Train run could get past it.)"""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return cls(_counters_class().options(scheduling_strategy=here).remote())

    def snapshot(self) -> dict[str, int]:
        import ray

        return ray.get(self.handle.get.remote())

    def reset(self) -> None:
        import ray

        ray.get(self.handle.reset.remote())

    @staticmethod
    def skipped(counts: dict[str, int]) -> dict[str, int]:
        return {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("skipped.")}


# ----------------------------------------------------------------------------- datasets


def detect_kind(uri: str, storage: StorageConfig | None = None) -> str:
    """The data kind of a shard set: from its manifest (``manifest_kind``), else captions."""
    return manifest_kind(set_manifest(uri, storage))


def find_answers(uri: str, storage: StorageConfig | None = None) -> list[str] | None:
    """The VQA answer vocabulary: ``answers.json`` beside the shard set or one level up."""
    fs, path = filesystem_for(uri, storage)
    for candidate in (
        f"{path}/answers.json",
        f"{path.rsplit('/', 1)[0]}/answers.json",
        f"{path.rsplit('/', 2)[0]}/answers.json",
    ):
        if fs.exists(candidate):
            with fs.open(candidate, "rb") as f:
                return json.loads(f.read())
    return None


def build_dataset(
    cfg: DataConfig, *, train: bool = True, kind: str | None = None, counters: Counters | None = None
) -> tuple[ray.data.Dataset, Counters]:
    """A streaming ``ray.data.Dataset`` of decoded batches, and the counters it reports to. Unreachable
    storage fails here in seconds (``check_reachable``), not after a read's full retry budget."""
    check_reachable(cfg.shards, cfg.storage)
    if counters is None:
        counters = Counters.create()
    kind, answers = kind_inputs(cfg, kind)
    paths = list_shards(cfg.shards, cfg.storage)
    raw = read_raw(
        cfg.shards,
        cfg.storage,
        shuffle_seed=cfg.seed if (train and cfg.shuffle_files) else None,
        verify_sha256=cfg.verify_sha256,
        chunk_rows=cfg.decode_batch_size,
        paths=paths,
        num_tasks=read_tasks(shard_counts(cfg.shards, cfg.storage, len(paths)), cfg.task_samples),
        num_cpus=cfg.decode_cpus,
    )
    return decode(raw, cfg, kind=kind, answers=answers, train=train, counters=counters.handle), counters


def kind_inputs(cfg: DataConfig, kind: str | None = None) -> tuple[str, list[str] | None]:
    """The data kind of ``cfg.shards`` (``kind``, else its manifest's) and, for VQA, its answer vocabulary;
    a bad kind, missing answers or an unknown tokenizer name fail here, before any reading."""
    kind = kind or detect_kind(cfg.shards, cfg.storage)
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {DATA_KINDS}")
    answers = find_answers(cfg.shards, cfg.storage) if kind == "vqa" else None
    if kind == "vqa" and not answers:
        raise FileNotFoundError(f"{cfg.shards}: VQA shards need an answers.json beside them (or one level up)")
    _tokenizer(cfg.tokenizer.name, cfg.tokenizer.max_length, cfg.tokenizer.lowercase)  # fail fast on a bad name
    return kind, answers


def decode(
    raw: ray.data.Dataset,
    cfg: DataConfig,
    *,
    kind: str,
    answers: list[str] | None,
    train: bool,
    counters=None,
    keep: tuple[int, int, dict[str, int]] | None = None,
    seed: int | None = None,
) -> ray.data.Dataset:
    """``decode_batch`` over raw rows (``read_raw``) with ``cfg``'s image, tokenizer and decode resources."""
    # batch_size=None: decode whole read blocks, which lets Ray fuse read + decode
    # into one task per read task (Ray will not fuse a row-count-changing read with a
    # batch_size-bound map). Block size is set by the reader's chunking instead.
    ds = raw.map_batches(
        decode_batch,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=dict(
            image=cfg.image,
            tokenizer=cfg.tokenizer,
            kind=kind,
            answers=answers,
            train=train,
            counters=counters,
            keep=keep,
            seed=seed,
            swap=tuple(cfg.swap_negatives),
        ),
        num_cpus=cfg.decode_cpus,
        concurrency=cfg.decode_concurrency,
        zero_copy_batch=True,
    )
    # Ray samples each map task's memory (USS) every second for its stats, which costs the
    # decode tasks about 1 % of their CPU here; these tasks' memory is bounded by the block size.
    ds.context.memory_usage_poll_interval_s = None
    return ds


_WARMED: set[str] = set()


def _warm_block(batch: dict, tokenizer: TokenizerConfig) -> dict:
    tokenize(["warm"], tokenizer)
    return batch


def warm_decode_workers(cfg: DataConfig, slots: int) -> threading.Thread | None:
    """Start ``slots`` decode-ready Ray workers in a background thread, once per Ray cluster.

    A fresh Ray has no worker that has imported the decode path, no Ray Data stats actor and no
    cached tokenizer; the first epoch pays for all three (about 13 s on 2 cores before its first
    batch). This runs a tiny Ray Data job with ``cfg``'s decode resources whose tasks import this
    module and load ``cfg``'s tokenizer, so that those processes stay in Ray's worker pool for the
    decode tasks after it. Called by the driver as a Train run starts: it overlaps the workers'
    start-up. Returns the thread, or None when this cluster was already warmed from this process."""
    import ray

    cluster = ray.get_runtime_context().gcs_address
    if cluster in _WARMED:
        return None
    _WARMED.add(cluster)

    def run() -> None:
        ds = ray.data.range(slots, override_num_blocks=slots).map_batches(
            _warm_block,
            batch_size=None,
            fn_kwargs={"tokenizer": cfg.tokenizer},
            num_cpus=cfg.decode_cpus,
        )
        ds.context.enable_progress_bars = False
        try:
            ds.materialize()
        except Exception as exc:  # only a head start is lost; the first epoch warms up by itself
            logging.getLogger(__name__).warning("decode worker warm-up failed: %r", exc)

    thread = threading.Thread(target=run, name="vlforge-warm-decoders", daemon=True)
    thread.start()
    return thread


def exact_split_config(**kwargs):
    """A ``ray.train.DataConfig`` whose per-worker splits cover every sample exactly once.

    Ray Train's default splits with ``equal=True``, which may drop up to
    ``world_size - 1`` rows per epoch to even the shards out. Loops that use this
    config must tolerate workers getting batch counts that differ by one.
    """
    from ray.train import DataConfig as RayDataConfig

    class ExactSplit(RayDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):
            output = [{} for _ in range(world_size)]
            split_names = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                if ds.name is None:
                    ds.set_name(name)
                ds.context.execution_options = self._resolve_execution_options(name)
                if name in split_names:
                    for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                        output[i][name] = split
                else:
                    for i in range(world_size):
                        output[i][name] = ds.iterator()
            return output

    return ExactSplit(**kwargs)
