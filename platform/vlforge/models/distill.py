"""Distilled dual encoder: fusion-encoder teacher -> dual-encoder student.

Wang, Bao, Dong, Bjorck, Peng, Ma, Wei, Wei, Wei and Zhou 2021, "Distilled
Dual-Encoder Model for Vision-Language Understanding" (DiDE), arXiv 2112.08723.

The teacher (``FusionTeacher``) is a VLMo in fusion mode with task heads; it
is frozen. The student (``DualEncoderStudent``) is a VLMo used only in dual
mode (separate image-only and text-only paths, so image and text encodings
can be precomputed and cached) plus a shallow fusion head:

* retrieval: dot product of the normalised ITC embeddings;
* classification: an MLP over ``[i, t, i * t, |i - t|]`` of the image and text
  [CLS] states gives a pair representation; ``itm`` and ``vqa`` classify it,
  ``nlvr2`` (two images, one statement) concatenates the representations of
  (image 1, text) and (image 2, text) and classifies that, as VLMo's NLVR2
  head does with its two fusion outputs; ``nlvr2_image`` classifies each of the
  two pair representations alone (does the statement hold in this image), the
  student's side of the teacher's per-image head.

Both models expose the last layer's per-head queries and keys split by
modality (:class:`~vlforge.objectives.distillation.CrossModalQK`): the student
takes text Q/K from its text encoder's last block and image Q/K from its image
encoder's last block; the teacher slices them from the last block over the
joint ``[text; image]`` sequence.

The training tasks over this pair (``DistillationTask``, ``FusionFinetuneTask``) and
``as_teacher`` live in ``vlforge.tasks.distill``.

Usage::

    from vlforge.models import create_model
    teacher = FusionTeacher(create_model("vlmo_base"), num_answers=3129)
    student = DualEncoderStudent(create_model("vlmo_base", vl_layers=0), num_answers=3129)
    out = student("vqa", pixel_values, input_ids, attention_mask)   # PairOutput: logits, qk
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlforge.config import TASKS
from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, VLModel
from vlforge.models.vlmo import VLMo, VLMoOutput
from vlforge.objectives.distillation import CrossModalQK

__all__ = [
    "TASKS",
    "PairOutput",
    "FusionTeacher",
    "DualEncoderStudent",
    "fusion_qk",
    "dual_qk",
    "check_task",
    "task_targets",
    "TARGET_KEYS",
]

TARGET_KEYS = {"nlvr2": "label", "vqa": "answer_id"}  # the batch field holding each task's class ids


def _classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def check_task(task: str, heads: nn.ModuleDict) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    if task != "itm" and task not in heads:
        raise ValueError(f"task {task!r} has no head (vqa needs num_answers > 0)")


def fusion_qk(out: VLMoOutput) -> CrossModalQK:
    """Split a fusion output's last-layer Q/K [B, H, Lt+Li, Dh] at the text/image boundary."""
    t = out.text_len
    return CrossModalQK(
        text_q=out.q[:, :, :t],  # [B, H, Lt, Dh]
        text_k=out.k[:, :, :t],
        image_q=out.q[:, :, t:],  # [B, H, Li, Dh]
        image_k=out.k[:, :, t:],
        text_mask=out.key_mask[:, :t],  # [B, Lt]
    )


def dual_qk(image: VLMoOutput, text: VLMoOutput) -> CrossModalQK:
    """Last-layer Q/K of an image-only and a text-only output (row i of each forms a pair)."""
    text_mask = text.key_mask
    if text_mask is None:
        text_mask = torch.ones(text.q.shape[0], text.q.shape[2], dtype=torch.bool, device=text.q.device)
    return CrossModalQK(text_q=text.q, text_k=text.k, image_q=image.q, image_k=image.k, text_mask=text_mask)


@dataclass
class PairOutput:
    """logits: [B, C]; qk: one CrossModalQK per image stream (two for nlvr2); image_logits: the
    per-image nlvr2 head, [B, 2 images, 2] (does the statement hold in image 1, in image 2)."""

    logits: Tensor
    qk: list[CrossModalQK]
    image_logits: Tensor | None = None


class FusionTeacher(VLModel):
    """VLMo fusion encoder with task heads: ``itm`` (the encoder's own ``heads.itm``), ``vqa``, ``nlvr2``.

    ``nlvr2`` classifies the two fusion outputs together, as VLMo's head does; ``nlvr2_image`` also
    reads each fusion output alone (does the statement hold in this image?), which the fine-tuning
    objective ``image_truth`` trains where the shards carry per-image truths (ours, not NLVR2's).

    ``embed_image`` / ``embed_text`` (``vlforge.models.interface``) are the encoder's unimodal ITC
    embeddings, the shortlist that fusion retrieval re-ranks.
    """

    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT})

    def __init__(self, encoder: VLMo, num_answers: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        heads = {"nlvr2": _classifier(2 * d, 2 * d, 2), "nlvr2_image": _classifier(d, d, 2)}
        if num_answers:
            heads["vqa"] = _classifier(d, 2 * d, num_answers)
        self.heads = nn.ModuleDict(heads)

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        return self.encoder.embed_image(pixel_values)  # [B, E]

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder.embed_text(input_ids, attention_mask)  # [B, E]

    def forward(
        self,
        task: str,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values_2: Tensor | None = None,
    ) -> PairOutput:
        check_task(task, self.heads)
        enc = self.encoder
        out = enc.forward_fusion(pixel_values, input_ids, attention_mask)
        if task == "itm":
            return PairOutput(enc.itm_logits(out), [fusion_qk(out)])
        if task == "vqa":
            return PairOutput(self.heads["vqa"](enc.pooled(out)), [fusion_qk(out)])
        if pixel_values_2 is None:
            raise ValueError("nlvr2 needs pixel_values_2")
        out2 = enc.forward_fusion(pixel_values_2, input_ids, attention_mask)
        pooled = torch.stack([enc.pooled(out), enc.pooled(out2)], dim=1)  # [B, 2, D]
        logits = self.heads["nlvr2"](pooled.flatten(1))  # [B, 2]
        return PairOutput(logits, [fusion_qk(out), fusion_qk(out2)], self.heads["nlvr2_image"](pooled))


class DualEncoderStudent(VLModel):
    """VLMo in dual mode + shallow fusion head over pooled image and text features.

    ``embed_image`` / ``embed_text`` (``vlforge.models.interface``) are the encoder's ITC embeddings,
    whose dot products are :meth:`retrieval_scores`.
    """

    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT})

    def __init__(self, encoder: VLMo, num_answers: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        self.fusion = nn.Sequential(nn.Linear(4 * d, d), nn.LayerNorm(d), nn.GELU())
        heads = {"itm": nn.Linear(d, 2), "nlvr2": _classifier(2 * d, 2 * d, 2), "nlvr2_image": _classifier(d, d, 2)}
        if num_answers:
            heads["vqa"] = _classifier(d, 2 * d, num_answers)
        self.heads = nn.ModuleDict(heads)

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        return self.encoder.embed_image(pixel_values)  # [B, E]

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder.embed_text(input_ids, attention_mask)  # [B, E]

    def encode(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[VLMoOutput, VLMoOutput]:
        return self.encoder.encode_image(pixel_values), self.encoder.encode_text(input_ids, attention_mask)

    def pair_features(self, image_cls: Tensor, text_cls: Tensor) -> Tensor:
        """[B, D] x [B, D] -> [B, D] pair representation."""
        feats = torch.cat([image_cls, text_cls, image_cls * text_cls, (image_cls - text_cls).abs()], dim=-1)  # [B, 4D]
        return self.fusion(feats)

    def classify(self, task: str, image_cls: Tensor, text_cls: Tensor, image2_cls: Tensor | None = None) -> Tensor:
        check_task(task, self.heads)
        pair = self.pair_features(image_cls, text_cls)  # [B, D]
        if task != "nlvr2":
            return self.heads[task](pair)
        return self.heads["nlvr2"](self.nlvr2_pairs(pair, image2_cls, text_cls).flatten(1))  # [B, 2]

    def nlvr2_pairs(self, pair: Tensor, image2_cls: Tensor | None, text_cls: Tensor) -> Tensor:
        """[B, 2, D]: (image 1, text)'s pair representation ``pair`` beside (image 2, text)'s."""
        if image2_cls is None:
            raise ValueError("nlvr2 needs a second image")
        return torch.stack([pair, self.pair_features(image2_cls, text_cls)], dim=1)

    def retrieval_scores(self, image: VLMoOutput, text: VLMoOutput) -> Tensor:
        """Dot products of normalised ITC embeddings: [Bi, Bt]."""
        return self.encoder.image_embedding(image) @ self.encoder.text_embedding(text).t()

    def forward(
        self,
        task: str,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values_2: Tensor | None = None,
    ) -> PairOutput:
        img, txt = self.encode(pixel_values, input_ids, attention_mask)
        qk = [dual_qk(img, txt)]
        if task != "nlvr2":
            return PairOutput(self.classify(task, self.encoder.summary(img), self.encoder.summary(txt)), qk)
        if pixel_values_2 is None:
            raise ValueError("nlvr2 needs pixel_values_2")
        img2 = self.encoder.encode_image(pixel_values_2)
        qk.append(dual_qk(img2, txt))
        text_cls = self.encoder.summary(txt)
        pair = self.pair_features(self.encoder.summary(img), text_cls)  # [B, D]
        pairs = self.nlvr2_pairs(pair, self.encoder.summary(img2), text_cls)  # [B, 2, D]
        return PairOutput(self.heads["nlvr2"](pairs.flatten(1)), qk, self.heads["nlvr2_image"](pairs))


def task_targets(task: str, batch: dict[str, Tensor]) -> Tensor:
    """Ground-truth class ids of a ``vqa`` (``answer_id``, -100 = not in the vocabulary) or ``nlvr2`` batch."""
    return batch[TARGET_KEYS[task]]
