"""Image-text retrieval: score matrices for teacher and student, and Recall@K.

    eval_set = load_eval_set("data/corpus/scenes/test", data)
    evaluate_retrieval(student, eval_set, "student")
    # {"i2t_r1": 41.0, "i2t_r5": ..., "t2i_r10": ..., "rmean": ..., "n_images": 300, "n_texts": 300}

A score matrix is ``[Ni, Nt]``: row i is image i, column j is text j, higher means
a better match. ``i2t`` ranks the texts of each image row, ``t2i`` the images of
each text column.

* Student (dual encoder): the dot products of the normalised ITC embeddings;
  images and texts are encoded once each, so scoring costs ``Ni + Nt`` encoder
  passes.
* Teacher (fusion encoder): the standard fusion-encoder protocol (ALBEF, VLMo):
  the teacher's own dual mode gives ITC scores for every pair, then the
  ``rerank_k`` best texts of each image and the ``rerank_k`` best images of each
  text are re-scored with the fusion ITM head, at most ``(Ni + Nt) * rerank_k``
  fusion passes instead of ``Ni * Nt``. See :func:`teacher_scores`.

The built-in corpus repeats captions (two scenes can have the same caption), so
the positives of an image are every text whose tokens equal its own caption's
(:func:`caption_positives`), not just the diagonal. Sets whose samples carry several
captions (COCO, Flickr30k through the Karpathy adapter) follow the COCO protocol
instead: every caption is a text, its positives are exactly its own image, and an
image hits at k when any of its captions is among its k best texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from vlforge.evaluation.inference import (
    encoder_of,
    eval_mode,
    image_embeddings,
    image_tokens,
    itm_probs,
    text_embeddings,
)
from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, require

__all__ = [
    "RERANK_OFFSET",
    "caption_positives",
    "evaluate_retrieval",
    "recall_at_k",
    "retrieval_texts",
    "student_scores",
    "teacher_scores",
]

# Added to ITM probabilities (in [0, 1]) so that re-scored pairs rank above every
# ITC-only pair (cosine similarities, in [-1, 1]).
RERANK_OFFSET = 2.0


def _hits(scores: Tensor, positives: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Per-row Recall@K in percent: row r hits at k when fewer than k negatives score >= its best positive.

    Ties between a negative and the best positive count against the query, so a
    constant score matrix gets no credit. Rows without a positive are misses.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best_pos = torch.where(positives, scores, neg_inf).amax(dim=1, keepdim=True)  # [R, 1]
    rank = ((scores >= best_pos) & ~positives).sum(dim=1)  # [R], 0 = a positive is first
    has_pos = positives.any(dim=1)  # [R]
    return {k: 100.0 * ((rank < k) & has_pos).float().mean().item() for k in ks}


def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@K, in percent, and their mean ``rmean``.

    scores: [Ni, Nt]; positives: [Ni, Nt] bool. A query hits at k when any of its
    positives is among its k best-scored candidates (ties broken against it).
    Keys: ``i2t_r{k}`` and ``t2i_r{k}`` for each k, and ``rmean``.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be one [Ni, Nt]")
    scores = scores.detach().float().cpu()
    positives = positives.bool().cpu()
    i2t = _hits(scores, positives, ks)
    t2i = _hits(scores.t(), positives.t(), ks)
    out = {f"i2t_r{k}": i2t[k] for k in ks}
    out.update({f"t2i_r{k}": t2i[k] for k in ks})
    out["rmean"] = sum(out.values()) / len(out)
    return out


def caption_positives(input_ids: Tensor) -> Tensor:
    """[N, T] token rows (row i = image i's caption) -> [N, N] bool, True where image i and text j match.

    Image i matches text j when text j's tokens equal text i's (a repeated caption
    describes every image it was written for).
    """
    _, group = torch.unique(input_ids, dim=0, return_inverse=True)  # [N]
    return group[:, None] == group[None, :]  # [N, N]


def retrieval_texts(eval_set: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The texts of a captions eval set and which image each belongs to: ``(input_ids [Nt, T],
    attention_mask [Nt, T], positives [Ni, Nt] bool)``. Every caption (``caption_input_ids``, owned by
    ``caption_image``) when the set has several per image, else one per image with repeated captions
    shared (:func:`caption_positives`)."""
    if "caption_input_ids" in eval_set:
        owner = eval_set["caption_image"].long()  # [Nt]
        positives = torch.arange(len(eval_set["pixel_values"]))[:, None] == owner[None, :]  # [Ni, Nt]
        return eval_set["caption_input_ids"], eval_set["caption_attention_mask"], positives
    return eval_set["input_ids"], eval_set["attention_mask"], caption_positives(eval_set["input_ids"])


def student_scores(
    student: nn.Module, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 64
) -> Tensor:
    """Dual-encoder scores [Ni, Nt]: dot products of normalised embeddings, on the CPU.

    ``student`` is any model declaring ``embed_image`` and ``embed_text`` (``vlforge.models.interface``):
    a ``DualEncoderStudent`` or a bare ``VLMo`` (their ITC embeddings), a ``FusionTeacher``'s dual mode.
    """
    require(student, EMBED_IMAGE, EMBED_TEXT)
    with eval_mode(student):
        img = image_embeddings(student, pixel_values, batch_size)  # [Ni, E]
        txt = text_embeddings(student, input_ids, attention_mask, batch_size)  # [Nt, E]
        return (img @ txt.t()).float().cpu()  # [Ni, Nt]


def teacher_scores(
    teacher: nn.Module,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    rerank_k: int = 16,
    batch_size: int = 64,
) -> Tensor:
    """Fusion-encoder retrieval scores [Ni, Nt], on the CPU (ITC shortlist, ITM re-rank).

    ``teacher`` is a ``FusionTeacher`` (its ``.encoder`` is used) or a bare ``VLMo``.

    1. ITC scores for every pair from the teacher's dual mode (normalised
       embedding dot products, in [-1, 1]).
    2. Candidates: for each image its ``rerank_k`` highest-scored texts, and for
       each text its ``rerank_k`` highest-scored images (the union of both sets).
    3. Each candidate pair is run through the fusion encoder and its score becomes
       ``P(match) + RERANK_OFFSET`` (ITM softmax probability of class 1, plus 2.0),
       which puts every re-scored pair above every ITC-only pair.

    So within each row (i2t) and column (t2i) the shortlisted candidates come first,
    ordered by ITM, and the rest follow in ITC order, which is what the per-direction
    protocol ranks (the union only adds a few extra ITM-scored candidates to some
    rows). With ``rerank_k >= max(Ni, Nt)`` every pair is ITM-scored, i.e. full
    fusion scoring.
    """
    if rerank_k < 0:
        raise ValueError(f"rerank_k must be >= 0, got {rerank_k}")
    enc = encoder_of(teacher)
    with eval_mode(teacher):
        pixel_values = image_tokens(enc, pixel_values, batch_size)
        img = image_embeddings(enc, pixel_values, batch_size)  # [Ni, E]
        txt = text_embeddings(enc, input_ids, attention_mask, batch_size)  # [Nt, E]
        scores = (img @ txt.t()).float().cpu()  # [Ni, Nt]
        ni, nt = scores.shape
        if rerank_k == 0:
            return scores
        rerank = torch.zeros(ni, nt, dtype=torch.bool)  # [Ni, Nt]
        rerank.scatter_(1, scores.topk(min(rerank_k, nt), dim=1).indices, True)
        rerank.scatter_(0, scores.topk(min(rerank_k, ni), dim=0).indices, True)
        image_idx, text_idx = rerank.nonzero(as_tuple=True)  # [P] each
        probs = itm_probs(enc, pixel_values, input_ids, attention_mask, image_idx, text_idx, batch_size)  # [P]
        scores[image_idx, text_idx] = probs.float().cpu() + RERANK_OFFSET
        return scores


def evaluate_retrieval(
    model: nn.Module,
    eval_set: dict[str, Tensor],
    kind: Literal["teacher", "student"],
    rerank_k: int = 16,
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K of ``model`` on a captions eval set; adds ``n_images``, ``n_texts``.

    Texts are the set's ``caption_input_ids`` when it has them (several captions per image; positives
    by ``caption_image``), else one caption per image (positives by :func:`caption_positives`).
    """
    ids, mask, positives = retrieval_texts(eval_set)
    args = (eval_set["pixel_values"], ids, mask)
    if kind == "teacher":
        scores = teacher_scores(model, *args, rerank_k=rerank_k, batch_size=batch_size)
    elif kind == "student":
        scores = student_scores(model, *args, batch_size=batch_size)
    else:
        raise ValueError(f"kind must be 'teacher' or 'student', got {kind!r}")
    out = recall_at_k(scores, positives, ks)
    out.update(n_images=scores.shape[0], n_texts=scores.shape[1])
    return out
