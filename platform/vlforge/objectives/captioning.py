"""Captioning loss: next-token cross-entropy on caption tokens only.

A generative model's sequence is ``[prefix (P positions: image embeddings, a BOS
token, ...)] + [caption tokens (T positions, right-padded)]``. Only caption tokens
are scored: positions in the prefix and padding positions get label ``-100``. The
logit at position i predicts the token at i + 1 (shift by one), so the last prefix
position predicts the first caption token.

    labels = caption_labels(input_ids, attention_mask, prefix_len=2)   # [B, 2 + T]
    loss = caption_loss(logits, labels)                                  # logits [B, 2 + T, V]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int = 0) -> torch.Tensor:
    """Labels [B, prefix_len + T]: caption ids where attended, IGNORE_INDEX on prefix and padding."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [B, T]
    if prefix_len:
        pad = labels.new_full((labels.shape[0], prefix_len), IGNORE_INDEX)  # [B, P]
        labels = torch.cat([pad, labels], dim=1)  # [B, P + T]
    return labels


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored tokens; logits [B, L, V], labels [B, L] (unshifted)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    pred = logits[:, :-1].float()  # [B, L-1, V]
    target = labels[:, 1:]  # [B, L-1]
    if not (target != IGNORE_INDEX).any():
        return pred.sum() * 0.0
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def scored_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
