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
  head does with its two fusion outputs.

Both models expose the last layer's per-head queries and keys split by
modality (:class:`~vlforge.objectives.distillation.CrossModalQK`): the student
takes text Q/K from its text encoder's last block and image Q/K from its image
encoder's last block; the teacher slices them from the last block over the
joint ``[text; image]`` sequence.

``DistillationTask`` holds student, teacher and loss weights; its
``forward(batch)`` returns ``{"loss": ..., <term>: ...}`` and is what the
trainer wraps. Loss weights: ``soft`` (teacher soft labels), ``attn``
(cross-modal attention KL), ``hard`` (ground-truth labels) and, for ``itm``,
``itc`` (the student's contrastive loss). Pretraining distillation uses
``task="itm"``: for each image a hard-negative text and for each text a
hard-negative image are sampled from the student's in-batch ITC similarities,
and teacher and student score the same 3B pairs. Fine-tuning distillation uses
``task="vqa"`` or ``task="nlvr2"``.

Usage::

    from vlforge.models import create_model
    teacher = FusionTeacher(create_model("vlmo_base"), num_answers=3129)
    student = DualEncoderStudent(create_model("vlmo_base", vl_layers=0), num_answers=3129)
    task = DistillationTask(student, teacher, "vqa", {"soft": 1.0, "attn": 1.0})
    out = task(batch)            # out["loss"].backward()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, VLModel
from vlforge.models.vlmo import VLMo, VLMoOutput
from vlforge.objectives.distillation import (
    CrossModalQK,
    cross_modal_attention_kl,
    multilabel_bce,
    soft_label_bce,
    soft_label_kl,
)
from vlforge.objectives.itc import contrastive_logits, itc_loss_from_logits
from vlforge.objectives.itm import sample_hard_negatives

__all__ = [
    "TASKS",
    "PairOutput",
    "FusionTeacher",
    "DualEncoderStudent",
    "DistillationTask",
    "FusionFinetuneTask",
    "fusion_qk",
    "dual_qk",
    "as_teacher",
    "task_targets",
    "TARGET_KEYS",
]

TASKS = ("itm", "vqa", "nlvr2")
TARGET_KEYS = {"nlvr2": "label", "vqa": "answer_id"}  # the batch field holding each task's class ids


def _classifier(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _check_task(task: str, heads: nn.ModuleDict) -> None:
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
    """logits: [B, C]; qk: one CrossModalQK per image stream (two for nlvr2)."""

    logits: Tensor
    qk: list[CrossModalQK]


class FusionTeacher(VLModel):
    """VLMo fusion encoder with task heads: ``itm`` (the encoder's own ``heads.itm``), ``vqa``, ``nlvr2``.

    ``embed_image`` / ``embed_text`` (``vlforge.models.interface``) are the encoder's unimodal ITC
    embeddings, the shortlist that fusion retrieval re-ranks.
    """

    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT})

    def __init__(self, encoder: VLMo, num_answers: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        d = encoder.embed_dim
        heads = {"nlvr2": _classifier(2 * d, 2 * d, 2)}
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
        _check_task(task, self.heads)
        enc = self.encoder
        out = enc.forward_fusion(pixel_values, input_ids, attention_mask)
        if task == "itm":
            return PairOutput(enc.itm_logits(out), [fusion_qk(out)])
        if task == "vqa":
            return PairOutput(self.heads["vqa"](enc.pooled(out)), [fusion_qk(out)])
        if pixel_values_2 is None:
            raise ValueError("nlvr2 needs pixel_values_2")
        out2 = enc.forward_fusion(pixel_values_2, input_ids, attention_mask)
        logits = self.heads["nlvr2"](torch.cat([enc.pooled(out), enc.pooled(out2)], dim=-1))  # [B, 2]
        return PairOutput(logits, [fusion_qk(out), fusion_qk(out2)])


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
        heads = {"itm": nn.Linear(d, 2), "nlvr2": _classifier(2 * d, 2 * d, 2)}
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
        _check_task(task, self.heads)
        pair = self.pair_features(image_cls, text_cls)  # [B, D]
        if task != "nlvr2":
            return self.heads[task](pair)
        if image2_cls is None:
            raise ValueError("nlvr2 needs a second image")
        return self.heads["nlvr2"](torch.cat([pair, self.pair_features(image2_cls, text_cls)], dim=-1))  # [B, 2]

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
        img2_cls = None
        if task == "nlvr2":
            if pixel_values_2 is None:
                raise ValueError("nlvr2 needs pixel_values_2")
            img2 = self.encoder.encode_image(pixel_values_2)
            img2_cls = self.encoder.summary(img2)
            qk.append(dual_qk(img2, txt))
        logits = self.classify(task, self.encoder.summary(img), self.encoder.summary(txt), img2_cls)
        return PairOutput(logits, qk)


class DistillationTask(nn.Module):
    """Student + frozen teacher + weighted objectives; ``forward(batch) -> {"loss", <terms>}``.

    VQA soft labels follow how the teacher was trained: softmax KL for a single-answer
    teacher (cross-entropy on ``answer_id``, the built-in corpus), or, with
    ``multilabel_vqa=True`` or on batches that carry ``answer_targets`` (VQAv2-style
    multi-answer shards, on which ``FusionFinetuneTask`` trains the teacher with BCE, as
    VLMo and DiDE do), BCE against the teacher's sigmoid scores.

    The teacher's parameters have ``requires_grad=False``, it runs under ``no_grad``, and
    it stays in eval mode whatever ``train()`` is called on the task.
    """

    WEIGHTS = ("soft", "attn", "hard", "itc")

    def __init__(
        self,
        student: DualEncoderStudent,
        teacher: FusionTeacher | None,
        task: str,
        weights: dict[str, float],
        temperature: float = 1.0,
        gather: bool = True,
        multilabel_vqa: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        unknown = set(weights) - set(self.WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {self.WEIGHTS}")
        if weights.get("itc") and task != "itm":
            raise ValueError("the itc term exists only for task 'itm'")
        self.weights = {k: float(v) for k, v in weights.items() if v}
        if not self.weights:
            raise ValueError("no loss term has a non-zero weight")
        if teacher is None and {"soft", "attn"} & set(self.weights):
            raise ValueError("soft/attn distillation needs a teacher")
        self.student = student
        self.teacher = teacher
        self.task = task
        self.temperature = temperature
        self.gather = gather
        self.multilabel_vqa = multilabel_vqa
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True) -> DistillationTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.task == "itm":
            terms = self._itm_terms(batch)
        else:
            terms = self._task_terms(batch)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def _attn(self, student: list[CrossModalQK], teacher: list[CrossModalQK]) -> Tensor:
        return sum(cross_modal_attention_kl(s, t) for s, t in zip(student, teacher)) / len(student)

    def _task_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w, task = self.weights, self.task
        args = (task, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("pixel_values_2"))
        s = self.student(*args)
        terms: dict[str, Tensor] = {}
        if "soft" in w or "attn" in w:
            with torch.no_grad():
                t = self.teacher(*args)
            if "soft" in w:
                terms["soft"] = (
                    soft_label_bce(s.logits, t.logits)
                    if task == "vqa" and (self.multilabel_vqa or "answer_targets" in batch)
                    else soft_label_kl(s.logits, t.logits, self.temperature)
                )
            if "attn" in w:
                terms["attn"] = self._attn(s.qk, t.qk)
        if "hard" in w:
            if task == "vqa":
                terms["hard"] = (
                    multilabel_bce(s.logits, batch["answer_targets"])
                    if "answer_targets" in batch
                    else F.cross_entropy(s.logits, batch["answer_id"])
                )
            else:
                terms["hard"] = F.cross_entropy(s.logits, batch["label"])
        return terms

    def _itm_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w, enc = self.weights, self.student.encoder
        pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        img, txt = self.student.encode(pv, ids, am)
        logits_i2t, logits_t2i, labels = contrastive_logits(
            enc.image_embedding(img), enc.text_embedding(txt), enc.itc_scale(), self.gather
        )  # [B, N] each
        terms: dict[str, Tensor] = {}
        if "itc" in w:
            terms["itc"] = itc_loss_from_logits(logits_i2t, logits_t2i, labels)
        if not {"soft", "attn", "hard"} & set(w):
            return terms

        b = ids.shape[0]
        local = logits_i2t.detach()[:, labels]  # [B, B], rows images, columns local texts
        sid = batch.get("sample_id")
        exclude = sid.view(-1, 1) == sid.view(1, -1) if sid is not None else None  # [B, B]
        ar = torch.arange(b, device=ids.device)
        neg_text = sample_hard_negatives(local, ar, exclude)  # [B]
        neg_image = sample_hard_negatives(local.t(), ar, exclude.t() if exclude is not None else None)  # [B]
        image_idx = torch.cat([ar, ar, neg_image])  # [3B]
        text_idx = torch.cat([ar, neg_text, ar])  # [3B]
        itm_labels = (torch.arange(3 * b, device=ids.device) < b).long()  # [3B]

        s_logits = self.student.classify("itm", enc.summary(img)[image_idx], enc.summary(txt)[text_idx])  # [3B, 2]
        if "soft" in w or "attn" in w:
            with torch.no_grad():
                t = self.teacher("itm", pv[image_idx], ids[text_idx], am[text_idx])
            if "soft" in w:
                terms["soft"] = soft_label_kl(s_logits, t.logits, self.temperature)
            if "attn" in w:
                terms["attn"] = self._attn([dual_qk(img, txt).select(text_idx, image_idx)], t.qk)
        if "hard" in w:
            terms["hard"] = F.cross_entropy(s_logits, itm_labels)
        return terms


def as_teacher(model: nn.Module) -> FusionTeacher:
    """A pretrained VLMo (retrieval / ITM teacher) or an already fine-tuned ``FusionTeacher``."""
    if isinstance(model, FusionTeacher):
        return model
    if isinstance(model, VLMo):
        return FusionTeacher(model)
    raise TypeError(f"a teacher must be a VLMo or a FusionTeacher, got {type(model).__name__}")


def task_targets(task: str, batch: dict[str, Tensor]) -> Tensor:
    """Ground-truth class ids of a ``vqa`` (``answer_id``, -100 = not in the vocabulary) or ``nlvr2`` batch."""
    return batch[TARGET_KEYS[task]]


class FusionFinetuneTask(nn.Module):
    """Fine-tunes a ``FusionTeacher`` on ``vqa`` or ``nlvr2`` on the ground truth: cross-entropy on the class
    id, or for VQA batches with ``answer_targets`` (VQAv2 soft scores) multi-label BCE; ``acc`` is then the
    VQA score of the argmax answer."""

    def __init__(self, model: FusionTeacher, task: str, weight: float = 1.0) -> None:
        super().__init__()
        if task not in ("vqa", "nlvr2"):
            raise ValueError(f"fusion fine-tuning is for vqa or nlvr2, got {task!r}")
        _check_task(task, model.heads)
        self.model, self.task, self.weight = model, task, weight

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.model(
            self.task, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("pixel_values_2")
        )
        if self.task == "vqa" and "answer_targets" in batch:
            targets = batch["answer_targets"]  # [B, A], VQAv2 soft scores
            hard = multilabel_bce(out.logits, targets)
            acc = targets.gather(1, out.logits.argmax(-1, keepdim=True)).float().mean()  # VQA score of the argmax
        else:
            target = task_targets(self.task, batch)
            hard = F.cross_entropy(out.logits, target, ignore_index=-100)
            acc = (out.logits.argmax(-1) == target).float().mean()
        return {"loss": self.weight * hard, "hard": hard.detach(), "acc": acc.detach()}
