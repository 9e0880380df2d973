"""Retrieval latency: fusion teacher vs dual-encoder student as the candidate set grows.

    rows = latency_table(teacher, student, ev["pixel_values"], ev["input_ids"], ev["attention_mask"])
    print(format_table(rows, ["n", "teacher_s", "student_s", "student_cached_s", "speedup"]))
    growth(rows, "teacher_s")    # about 2: the teacher's cost is quadratic in N
    growth(rows, "student_s")    # about 1: the student's is linear (plus a cheap [N, N] matmul)

For each N, N images and N texts (the given tensors repeated when fewer are
given) are scored all against all, timed with ``time.perf_counter`` under
``torch.no_grad`` in eval mode, after a warm-up call of each model at that N's
batch shapes (one teacher row of N pairs, one full student pass):

* ``teacher_s``: the fusion encoder's ITM head on every (image, text) pair, N*N
  fusion passes. Beyond ``max_teacher_pairs`` pairs only the first full rows
  (one image against all N texts) reaching that many pairs are timed and the
  time is scaled by ``N*N / pairs_timed``; the row then has
  ``teacher_extrapolated: True``. Fusion cost per pair does not depend on N, so
  linear extrapolation is exact up to timing noise.
* ``student_s``: the student encodes N images and N texts, then one [N, N] matmul.
* ``student_cached_s``: image embeddings computed beforehand (an index built
  offline, not timed); N texts encoded, then the matmul.

``speedup`` = teacher_s / student_s, ``speedup_cached`` = teacher_s / student_cached_s.
With ``repeats > 1`` each time is the median of the repeats.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from vlforge.evaluation.inference import (
    device_of,
    encoder_of,
    eval_mode,
    image_embeddings,
    image_tokens,
    itm_probs,
    sync,
    text_embeddings,
)
from vlforge.models.vlmo import VLMo

__all__ = ["growth", "latency_table"]


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _teacher_rows(enc: VLMo, pv: Tensor, ids: Tensor, am: Tensor, rows: int, batch_size: int) -> Tensor:
    """ITM probabilities of images 0..rows-1 against all N texts: [rows * N] (a locked image
    tokenizer runs once per image, as a serving fusion encoder would cache it)."""
    n = len(ids)
    pv = image_tokens(enc, pv[:rows], batch_size)
    image_idx = torch.arange(rows).repeat_interleave(n)  # [rows * N]
    text_idx = torch.arange(n).repeat(rows)  # [rows * N]
    return itm_probs(enc, pv, ids, am, image_idx, text_idx, batch_size)


def _student(enc: VLMo, pv: Tensor, ids: Tensor, am: Tensor, batch_size: int) -> Tensor:
    return _student_cached(enc, image_embeddings(enc, pv, batch_size), ids, am, batch_size)  # [N, N]


def _student_cached(enc: VLMo, img: Tensor, ids: Tensor, am: Tensor, batch_size: int) -> Tensor:
    return img @ text_embeddings(enc, ids, am, batch_size).t()  # [N, N]


def _tile(x: Tensor, n: int) -> Tensor:
    return x[torch.arange(n) % len(x)]


def latency_table(
    teacher: nn.Module,
    student: nn.Module,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    ns: Sequence[int] = (100, 300, 1000),
    max_teacher_pairs: int = 20000,
    batch_size: int = 64,
    repeats: int = 1,
) -> list[dict]:
    """One row per N: ``n``, ``teacher_s``, ``teacher_extrapolated``, ``teacher_pairs_timed``,
    ``student_s``, ``student_cached_s``, ``speedup``, ``speedup_cached`` (seconds, ratios).

    ``teacher`` is a ``FusionTeacher`` or ``VLMo``, ``student`` a ``DualEncoderStudent`` or ``VLMo``.
    Inputs are moved to each model's device once per N, before timing.
    """
    if len(pixel_values) == 0 or len(input_ids) == 0:
        raise ValueError("need at least one image and one text")
    if max_teacher_pairs < 1 or repeats < 1:
        raise ValueError("max_teacher_pairs and repeats must be >= 1")
    t_enc, s_enc = encoder_of(teacher), encoder_of(student)
    t_dev, s_dev = device_of(t_enc), device_of(s_enc)
    out = []
    with eval_mode(teacher), eval_mode(student):
        for n in ns:
            if n < 1:
                raise ValueError(f"N must be >= 1, got {n}")
            pv, ids, am = _tile(pixel_values, n), _tile(input_ids, n), _tile(attention_mask, n)
            tpv, tids, tam = pv.to(t_dev), ids.to(t_dev), am.to(t_dev)
            spv, sids, sam = pv.to(s_dev), ids.to(s_dev), am.to(s_dev)

            rows = min(n, math.ceil(max_teacher_pairs / n)) if n * n > max_teacher_pairs else n
            pairs = rows * n
            # Warm-up at this N's batch shapes (allocator, kernel selection): one teacher row, one student pass.
            _teacher_rows(t_enc, tpv, tids, tam, 1, batch_size)
            _student(s_enc, spv, sids, sam, batch_size)
            teacher_s = _timed(partial(_teacher_rows, t_enc, tpv, tids, tam, rows, batch_size), t_dev, repeats)
            teacher_s *= n * n / pairs

            student_s = _timed(partial(_student, s_enc, spv, sids, sam, batch_size), s_dev, repeats)
            cached = image_embeddings(s_enc, spv, batch_size)  # [N, E]
            sync(s_dev)
            student_cached_s = _timed(partial(_student_cached, s_enc, cached, sids, sam, batch_size), s_dev, repeats)
            out.append(
                {
                    "n": n,
                    "teacher_s": teacher_s,
                    "teacher_extrapolated": pairs < n * n,
                    "teacher_pairs_timed": pairs,
                    "student_s": student_s,
                    "student_cached_s": student_cached_s,
                    "speedup": teacher_s / student_s,
                    "speedup_cached": teacher_s / student_cached_s,
                }
            )
    return out


def growth(rows: list[dict], key: str) -> float:
    """Log-log slope of ``row[key]`` against ``row["n"]`` between the smallest and largest N.

    About 2 means the time grows quadratically with N, about 1 linearly.
    """
    usable = [r for r in rows if r.get(key) is not None and r[key] > 0]
    if not usable:
        raise ValueError(f"no row has a positive {key!r}")
    lo = min(usable, key=lambda r: r["n"])
    hi = max(usable, key=lambda r: r["n"])
    if hi["n"] == lo["n"]:
        raise ValueError("growth needs rows with at least two different N")
    return math.log(hi[key] / lo[key]) / math.log(hi["n"] / lo["n"])
