"""Distillation losses: soft labels and cross-modal attention.

Soft labels (Hinton et al. 2015, arXiv 1503.02531): KL(teacher || student) of
temperature-softened class distributions, scaled by T^2 so gradient magnitudes
do not shrink with T. For multi-label VQA (answers scored with BCE as in VLMo,
arXiv 2111.02358) the teacher's sigmoid probabilities are the soft targets of
a per-answer binary cross-entropy.

Cross-modal attention distillation (Wang et al. 2021, "Distilled Dual-Encoder
Model for Vision-Language Understanding", arXiv 2112.08723): a dual-encoder
student has no cross-modal attention, but the last layer's per-head queries
and keys of its text and image encoders define one. Student
text->image = softmax(Q_T K_I^T / sqrt(d)) and image->text =
softmax(Q_I K_T^T / sqrt(d)). The teacher (a fusion encoder whose attention
runs over the joint sequence) gets the same two distributions recomputed from
its own last-layer queries and keys over the other modality's keys only, so
they are renormalised over those keys rather than sliced from the joint map.
The loss is KL(teacher || student) for both directions, averaged over batch,
heads and (real) query tokens, and the two directions are summed. Padded text
keys get probability exactly 0 in both models, and padded text queries are
left out of the average.

These losses are hand-written because no library implements them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class CrossModalQK:
    """Last-layer per-head queries and keys, split by modality.

    text_q, text_k: [B, H, Lt, Dh]; image_q, image_k: [B, H, Li, Dh];
    text_mask: [B, Lt] bool, True for real (non-padding) text tokens.
    """

    text_q: Tensor
    text_k: Tensor
    image_q: Tensor
    image_k: Tensor
    text_mask: Tensor

    def select(self, text_index: Tensor, image_index: Tensor) -> CrossModalQK:
        """Pairs built from separately encoded texts and images (dual encoders)."""
        return CrossModalQK(
            self.text_q[text_index],
            self.text_k[text_index],
            self.image_q[image_index],
            self.image_k[image_index],
            self.text_mask[text_index],
        )

    def detach(self) -> CrossModalQK:
        return CrossModalQK(
            self.text_q.detach(), self.text_k.detach(), self.image_q.detach(), self.image_k.detach(), self.text_mask
        )


def attention_log_probs(q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """log softmax(q k^T / sqrt(d)) over keys; masked keys get log-probability -inf.

    q: [B, H, Lq, Dh], k: [B, H, Lk, Dh], key_mask: [B, Lk] bool -> [B, H, Lq, Lk].
    """
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.log_softmax(dim=-1)


def _row_kl(logp_teacher: Tensor, logp_student: Tensor, key_mask: Tensor | None) -> Tensor:
    """KL(teacher || student) per query row: [B, H, Lq, Lk] -> [B, H, Lq]; masked keys add 0."""
    terms = logp_teacher.exp() * (logp_teacher - logp_student)  # [B, H, Lq, Lk]
    if key_mask is not None:
        terms = torch.where(key_mask[:, None, None, :], terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


def cross_modal_attention_kl(student: CrossModalQK, teacher: CrossModalQK) -> Tensor:
    """KL(teacher || student) of text->image plus image->text last-layer attention.

    Student and teacher must have the same number of heads and the same token counts
    (head dims may differ). The teacher side is detached.
    """
    teacher = teacher.detach()
    if student.text_q.shape[:3] != teacher.text_q.shape[:3] or student.image_q.shape[:3] != teacher.image_q.shape[:3]:
        raise ValueError(
            f"student/teacher [B, H, L] mismatch: text {tuple(student.text_q.shape[:3])} vs "
            f"{tuple(teacher.text_q.shape[:3])}, image {tuple(student.image_q.shape[:3])} vs "
            f"{tuple(teacher.image_q.shape[:3])}"
        )
    text_mask = teacher.text_mask.bool()  # [B, Lt]
    if not torch.equal(text_mask, student.text_mask.bool()):
        raise ValueError("student and teacher see different text padding")

    t2i = _row_kl(
        attention_log_probs(teacher.text_q, teacher.image_k),
        attention_log_probs(student.text_q, student.image_k),
        None,
    )  # [B, H, Lt]
    query_w = text_mask[:, None, :].expand_as(t2i).to(t2i.dtype)  # [B, H, Lt]
    kl_t2i = (t2i * query_w).sum() / query_w.sum().clamp(min=1.0)

    i2t = _row_kl(
        attention_log_probs(teacher.image_q, teacher.text_k, text_mask),
        attention_log_probs(student.image_q, student.text_k, text_mask),
        text_mask,
    )  # [B, H, Li]
    return kl_t2i + i2t.mean()


def soft_label_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch. Logits [B, C]."""
    t = temperature
    logp_s = F.log_softmax(student_logits.float() / t, dim=-1)  # [B, C]
    logp_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)  # [B, C]
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean") * (t * t)


def multilabel_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """VQA-style BCE: summed over answers, averaged over the batch. logits/targets [B, A]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


def soft_label_bce(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Multi-label distillation: BCE against the teacher's sigmoid probabilities. Logits [B, A]."""
    return multilabel_bce(student_logits, torch.sigmoid(teacher_logits.detach().float()))
