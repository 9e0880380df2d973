"""Evaluation sets: a whole shard set decoded in file order into one batch of tensors.

    data = DataConfig(image=ImageConfig(size=64))
    test = load_eval_set("data/corpus/scenes/test", data)              # captions
    vqa = load_eval_set("s3://bucket/corpus/vqa/test", data, max_samples=500)
    test["pixel_values"]   # [N, 3, H, W] float32, normalised
    test["input_ids"]      # [N, T] int64; "attention_mask" [N, T]; "sample_id" [N]
    vqa["answer_id"]       # [N] (-100: answer not in answers.json); nlvr2: "pixel_values_2", "label"
    coco["caption_input_ids"]  # samples with several captions (COCO, Karpathy): every caption, [M, T],
    coco["caption_image"]      # and the image each belongs to, [M]; "caption_attention_mask" [M, T]
    vqa["vqa_type"]            # list[str], each question's type ("" when its metadata names none)

Reading is single-process on the driver (``iter_samples`` over ``list_shards``, no
Ray), so the order is the shards' order and then the samples' order inside each
shard, and two loads give identical tensors. Decoding is the training pipeline's
``decode_batch`` with ``train=False``: no augmentation, and bad samples are dropped
the same way (they do not count towards ``max_samples``). ``input_ids`` is each
sample's first caption; when any sample carries a ``captions`` list (the COCO and
Karpathy adapters write one per image), every caption is also returned, so that
retrieval can follow the COCO protocol (each caption a query; an image hits when
any of its captions is retrieved). VQA samples whose metadata names a type also give
``vqa_type``, so that accuracy can be broken down by it: the ``answer_type`` VQAv2 annotates
(yes/no, number, other) when present, else the ``question_type`` (the built-in corpus's
relation, color, count, exists).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlforge.config import DATA_KINDS, DataConfig
from vlforge.data.pipeline import (
    RAW_COLUMNS,
    caption_list,
    decode_batch,
    detect_kind,
    find_answers,
    finish_pixels,
    raw_row,
    sample_id,
    tokenize,
)
from vlforge.data.shards import iter_samples, list_shards

__all__ = ["load_eval_set"]


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Raw rows -> ``RAW_COLUMNS`` as object arrays (bytes stay bytes, missing stays None)."""
    out = {}
    for name in RAW_COLUMNS:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[name] for r in rows]
        out[name] = col
    return out


def load_eval_set(
    shards: str, data: DataConfig, kind: str | None = None, max_samples: int | None = None
) -> dict[str, Any]:
    """Decode the shard set ``shards`` (local path, manifest, glob or ``s3://`` URI) into one batch.

    ``data`` supplies the image, tokenizer and storage settings (``data.shards`` is
    not used). ``kind`` is the data kind, "captions", "vqa" or "nlvr2"; None reads it from the
    manifest. Stops after ``max_samples`` usable samples.
    """
    kind = kind or detect_kind(shards, data.storage)
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {DATA_KINDS}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    answers = find_answers(shards, data.storage) if kind == "vqa" else None
    if kind == "vqa" and not answers:
        raise FileNotFoundError(f"{shards}: VQA shards need an answers.json beside them (or one level up)")

    parts: list[dict[str, np.ndarray]] = []
    captions: dict[int, list[str]] = {}
    types: dict[int, str] = {}
    kept = 0
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal kept, rows
        if rows:
            out = decode_batch(
                _columns(rows), image=data.image, tokenizer=data.tokenizer, kind=kind, answers=answers, train=False
            )
            if out:
                parts.append(out)
                kept += len(out["input_ids"])
        rows = []

    def full() -> bool:
        return max_samples is not None and kept >= max_samples

    for url in list_shards(shards, data.storage):
        for sample in iter_samples(url, data.storage):
            rows.append(raw_row(sample, url))
            if kind in ("captions", "vqa"):
                _note_meta(rows[-1], captions if kind == "captions" else None, types if kind == "vqa" else None)
            # Near the limit, decode smaller chunks so that few rows are decoded only to be dropped.
            want = data.decode_batch_size
            if max_samples is not None:
                want = min(want, max_samples - kept)
            if len(rows) >= want:
                flush()
                if full():
                    break
        if full():
            break
    flush()
    if not parts:
        raise ValueError(f"{shards}: no usable {kind} samples")

    batch = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    if max_samples is not None:
        batch = {k: v[:max_samples] for k, v in batch.items()}
    if captions:
        batch.update(_all_captions(batch, captions, data))
    if types:
        batch["vqa_type"] = [types.get(sid, "") for sid in batch["sample_id"].tolist()]
    return finish_pixels(batch, data.image)


def _note_meta(row: dict[str, Any], captions: dict[int, list[str]] | None, types: dict[int, str] | None) -> None:
    """Note a raw row's caption list (into ``captions``) or VQA question type (into ``types``)."""
    if row["json"] is None:
        return
    try:
        meta = json.loads(row["json"])
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(meta, dict):
        return
    sid = sample_id(row["key"])
    caps = caption_list(meta) if captions is not None else []
    if caps:
        captions[sid] = caps
    if types is not None:
        kind = meta.get("answer_type") or meta.get("question_type")
        if isinstance(kind, str) and kind.strip():
            types[sid] = kind.strip()


def _all_captions(batch: dict[str, Tensor], captions: dict[int, list[str]], data: DataConfig) -> dict[str, Tensor]:
    """Every caption of every kept sample (its own caption when it has no list), tokenised, with its image."""
    first = batch["input_ids"]
    ids, masks, owner = [], [], []
    for i, sid in enumerate(batch["sample_id"].tolist()):
        caps = captions.get(sid)
        if caps:
            tok = tokenize(caps, data.tokenizer)
            ids.append(torch.from_numpy(tok["input_ids"]))
            masks.append(torch.from_numpy(tok["attention_mask"]))
        else:
            ids.append(first[i : i + 1])
            masks.append(batch["attention_mask"][i : i + 1])
        owner.append(torch.full((len(ids[-1]),), i, dtype=torch.int64))
    return {
        "caption_input_ids": torch.cat(ids).to(first.dtype),
        "caption_attention_mask": torch.cat(masks).to(batch["attention_mask"].dtype),
        "caption_image": torch.cat(owner),
    }
