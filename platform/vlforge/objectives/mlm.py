"""Masked language modelling (BERT; Devlin et al. 2019, arXiv 1810.04805).

15% of the real tokens (not special, not padding) are chosen; of those 80%
become [MASK], 10% a random non-special token and 10% stay unchanged. Labels
are the original ids at chosen positions and -100 elsewhere. VLMo uses MLM
text-only (stage 2) and image-conditioned through the fusion encoder (stage 3,
weight 0.25 next to ITC and ITM).

Defaults are the BERT uncased WordPiece ids: [PAD] 0, [CLS] 101, [SEP] 102,
[MASK] 103.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103


@torch.no_grad()
def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    vocab_size: int,
    mask_prob: float = 0.15,
    pad_id: int = PAD_ID,
    cls_id: int = CLS_ID,
    sep_id: int = SEP_ID,
    mask_id: int = MASK_ID,
    extra_special_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(masked_ids, labels)``, both [B, T] long; labels are -100 where not chosen."""
    special = torch.tensor([pad_id, cls_id, sep_id, mask_id, *extra_special_ids], device=input_ids.device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)  # [B, T]
    dev = input_ids.device

    def rand() -> Tensor:
        return torch.rand(input_ids.shape, device=dev, generator=generator)  # [B, T]

    chosen = eligible & (rand() < mask_prob)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    u = rand()
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)

    allowed = torch.ones(vocab_size, dtype=torch.bool, device=dev)
    allowed[special[special < vocab_size]] = False
    pool = allowed.nonzero().squeeze(1)  # [V']
    pick = torch.randint(len(pool), input_ids.shape, device=dev, generator=generator)  # [B, T]
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, pool[pick], masked)
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over chosen positions; logits [..., V], labels [...] with -100 ignored.

    Returns a zero that still depends on ``logits`` when nothing was chosen, so a batch
    of very short texts does not produce NaN.
    """
    logits = logits.reshape(-1, logits.shape[-1])  # [M, V]
    labels = labels.reshape(-1)  # [M]
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
