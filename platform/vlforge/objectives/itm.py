"""Image-text matching with global hard negatives sampled from ITC similarities.

ALBEF (Li et al. 2021, arXiv 2107.07651) and VLMo (Bao et al. 2022,
arXiv 2111.02358): for every image a negative text, and for every text a
negative image, is drawn with probability proportional to the softmax of the
contrastive similarities, so that close-but-wrong pairs are sampled more
often. VLMo draws from the similarities against the *global* batch (all
ranks). The positive gets weight exactly 0, and every sampled index is
checked, so the positive is never returned even when similarities tie or a
duplicate pair sits in the batch. Pass ``sample_id`` to also exclude other
copies of the same sample.

Hand-written: no library ships this sampler in this form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlforge.objectives.itc import gather_nograd, world_info


@torch.no_grad()
def sample_hard_negatives(
    logits: Tensor,
    positive: Tensor,
    exclude: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one negative column per row.

    Args:
        logits: [B, N] similarities of each row against N candidates.
        positive: [B] column index of each row's positive.
        exclude: optional [B, N] bool, True for further columns that must not be drawn.
        generator: optional torch.Generator for reproducible draws.

    Returns:
        [B] long column indices, never ``positive`` nor an excluded column.
    """
    if not torch.isfinite(logits).all():
        raise ValueError("hard-negative sampling needs finite similarities")
    blocked = torch.zeros_like(logits, dtype=torch.bool)  # [B, N]
    blocked.scatter_(1, positive.view(-1, 1), True)
    if exclude is not None:
        blocked |= exclude
    if (~blocked).sum(dim=1).min() == 0:
        raise ValueError("a row has no negative candidate (batch too small or all candidates excluded)")
    weights = logits.float().masked_fill(blocked, float("-inf")).softmax(dim=1)  # [B, N], 0 where blocked
    index = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [B]
    for _ in range(8):
        bad = blocked.gather(1, index.view(-1, 1)).squeeze(1)  # [B]
        if not bad.any():
            return index
        index[bad] = torch.multinomial(weights[bad], 1, generator=generator).squeeze(1)
    raise RuntimeError("torch.multinomial kept drawing zero-weight columns")


def build_itm_batch(
    logits_i2t: Tensor,
    logits_t2i: Tensor,
    labels: Tensor,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    sample_id: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Positives plus one hard-negative text per image and one hard-negative image per text.

    ``logits_*`` and ``labels`` come from :func:`vlforge.objectives.itc.contrastive_logits`.
    When their N is the global batch, the inputs of all ranks are gathered so that a
    negative may come from another rank.

    Returns a dict with ``pixel_values`` [3B, C, H, W], ``input_ids`` / ``attention_mask``
    [3B, T] and ``itm_labels`` [3B] (1 for the first B positive pairs, 0 for the rest).
    """
    b, n = logits_i2t.shape
    _, world = world_info()
    if n == b * world and world > 1:
        all_pixels = gather_nograd(pixel_values)  # [N, C, H, W]
        all_ids = gather_nograd(input_ids)  # [N, T]
        all_mask = gather_nograd(attention_mask)  # [N, T]
        all_sid = gather_nograd(sample_id) if sample_id is not None else None
    elif n == b:
        all_pixels, all_ids, all_mask, all_sid = pixel_values, input_ids, attention_mask, sample_id
    else:
        raise ValueError(f"logits have {n} columns; expected {b} (local) or {b * world} (global)")
    exclude = sample_id.view(-1, 1) == all_sid.view(1, -1) if sample_id is not None else None  # [B, N]
    neg_text = sample_hard_negatives(logits_i2t.detach(), labels, exclude, generator)  # [B]
    neg_image = sample_hard_negatives(logits_t2i.detach(), labels, exclude, generator)  # [B]
    itm_labels = torch.zeros(3 * b, dtype=torch.long, device=input_ids.device)
    itm_labels[:b] = 1
    return {
        "pixel_values": torch.cat([pixel_values, pixel_values, all_pixels[neg_image]]),
        "input_ids": torch.cat([input_ids, all_ids[neg_text], input_ids]),
        "attention_mask": torch.cat([attention_mask, all_mask[neg_text], attention_mask]),
        "itm_labels": itm_labels,
    }


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the 2-way match head: logits [M, 2], labels [M] in {0, 1}."""
    return F.cross_entropy(logits, labels)
