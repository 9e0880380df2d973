"""Distillation tasks over the fusion teacher and the dual-encoder student (``vlforge.models.distill``).

Wang, Bao, Dong, Bjorck, Peng, Ma, Wei, Wei, Wei and Zhou 2021, "Distilled
Dual-Encoder Model for Vision-Language Understanding" (DiDE), arXiv 2112.08723.

``DistillationTask`` holds student, teacher and loss weights; its
``forward(batch)`` returns ``{"loss": ..., <term>: ...}`` and is what the
trainer wraps. Loss weights: ``soft`` (teacher soft labels), ``attn``
(cross-modal attention KL), ``hard`` (ground-truth labels), for ``itm``
``itc`` (the student's contrastive loss), and for ``nlvr2`` the per-image terms:
``soft_image`` (the teacher's per-image soft labels) and ``image_truth`` (the
shards' per-image truths, as the teacher is fine-tuned). Pretraining distillation uses
``task="itm"``: for each image a hard-negative text and for each text a
hard-negative image are sampled from the student's in-batch ITC similarities,
and teacher and student score the same 3B pairs. Fine-tuning distillation uses
``task="vqa"`` or ``task="nlvr2"``.

``FusionFinetuneTask`` fine-tunes the teacher on ``vqa`` or ``nlvr2`` (objective ``hard``, and for
``nlvr2`` ``image_truth``: the statement's truth in each image, where the shards carry it);
``as_teacher`` turns a loaded model (a pretrained VLMo or a fine-tuned ``FusionTeacher``)
into the teacher a ``DistillationTask`` takes.

Usage::

    from vlforge.models import create_model
    from vlforge.models.distill import DualEncoderStudent, FusionTeacher
    teacher = FusionTeacher(create_model("vlmo_base"), num_answers=3129)
    student = DualEncoderStudent(create_model("vlmo_base", vl_layers=0), num_answers=3129)
    task = DistillationTask(student, teacher, "vqa", {"soft": 1.0, "attn": 1.0})
    out = task(batch)            # out["loss"].backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlforge.config import TASKS
from vlforge.models.distill import (
    DualEncoderStudent,
    FusionTeacher,
    check_task,
    dual_qk,
    task_targets,
)
from vlforge.models.vlmo import VLMo
from vlforge.objectives.distillation import (
    CrossModalQK,
    cross_modal_attention_kl,
    multilabel_bce,
    soft_label_bce,
    soft_label_kl,
)
from vlforge.objectives.itc import contrastive_logits, itc_loss_from_logits
from vlforge.objectives.itm import sample_hard_negatives

__all__ = ["DistillationTask", "FusionFinetuneTask", "as_teacher"]


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

    OBJECTIVES = ("soft", "attn", "hard", "itc", "soft_image", "image_truth")  # loss weights

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
        unknown = set(weights) - set(self.OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {self.OBJECTIVES}")
        if weights.get("itc") and task != "itm":
            raise ValueError("the itc term exists only for task 'itm'")
        if (weights.get("soft_image") or weights.get("image_truth")) and task != "nlvr2":
            raise ValueError("the soft_image and image_truth terms exist only for task 'nlvr2'")
        self.weights = {k: float(v) for k, v in weights.items() if v}
        if not self.weights:
            raise ValueError("no loss term has a non-zero weight")
        if teacher is None and {"soft", "attn", "soft_image"} & set(self.weights):
            raise ValueError("soft/attn/soft_image distillation needs a teacher")
        self.student = student
        self.teacher = teacher
        self.task = task
        self.temperature = temperature
        self.gather = gather
        self.multilabel_vqa = multilabel_vqa
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        # a flag, not the module: a submodule attribute would add the tokenizer's weights to the state dict twice
        self._share_features = _shares_tokenizer(student, teacher)

    def train(self, mode: bool = True) -> DistillationTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        batch = self._features(batch)
        if self.task == "itm":
            terms = self._itm_terms(batch)
        else:
            terms = self._task_terms(batch)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def _features(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with its images as the shared locked tokenizer's feature grids [B, C, h, w], computed
        once here for the student and the teacher (the teacher alone would tokenise 3B images an ITM step)."""
        if not self._share_features:
            return batch
        tokenizer = self.student.encoder.image_embed.tokenizer
        keys = [k for k in ("pixel_values", "pixel_values_2") if k in batch]
        return {**batch, **{k: tokenizer.features(batch[k]) for k in keys}}

    def _attn(self, student: list[CrossModalQK], teacher: list[CrossModalQK]) -> Tensor:
        return sum(cross_modal_attention_kl(s, t) for s, t in zip(student, teacher)) / len(student)

    def _task_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w, task = self.weights, self.task
        args = (task, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("pixel_values_2"))
        s = self.student(*args)
        terms: dict[str, Tensor] = {}
        if {"soft", "attn", "soft_image"} & set(w):
            with torch.no_grad():
                t = self.teacher(*args)
            if "soft_image" in w:
                terms["soft_image"] = soft_label_kl(
                    s.image_logits.reshape(-1, 2), t.image_logits.reshape(-1, 2), self.temperature
                )
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
        if "image_truth" in w:
            terms["image_truth"] = _image_truth_loss(s.image_logits, batch.get("image_truth"))
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


def _shares_tokenizer(student: DualEncoderStudent, teacher: FusionTeacher | None) -> bool:
    """Whether the student has a locked image tokenizer and the teacher (if any) has the same network
    with the same weights; otherwise each model tokenises the pixels itself."""
    mine = student.encoder.image_embed.tokenizer
    if mine is None or teacher is None:
        return mine is not None
    theirs = teacher.encoder.image_embed.tokenizer
    if theirs is None or (theirs.name, theirs.grid) != (mine.name, mine.grid):
        return False
    a, b = mine.state_dict(), theirs.state_dict()
    return a.keys() == b.keys() and not any(v.is_meta or b[k].is_meta or not torch.equal(v, b[k]) for k, v in a.items())


def as_teacher(model: nn.Module) -> FusionTeacher:
    """A pretrained VLMo (retrieval / ITM teacher) or an already fine-tuned ``FusionTeacher``."""
    if isinstance(model, FusionTeacher):
        return model
    if isinstance(model, VLMo):
        return FusionTeacher(model)
    raise TypeError(f"a teacher must be a VLMo or a FusionTeacher, got {type(model).__name__}")


class FusionFinetuneTask(nn.Module):
    """Fine-tunes a ``FusionTeacher`` on ``vqa`` or ``nlvr2`` on the ground truth: cross-entropy on the class
    id, or for VQA batches with ``answer_targets`` (VQAv2 soft scores) multi-label BCE; ``acc`` is then the
    VQA score of the argmax answer.

    ``image_truth`` (nlvr2 only) adds cross-entropy of the teacher's per-image head on the batch's
    ``image_truth`` [B, 2] (does the statement hold in each image; -100 where unknown). Trained on the
    pair label alone, the teacher stayed at chance on the built-in corpus; with this term it learns to
    check the statement in each image, and the pair label follows from the two answers.
    """

    OBJECTIVES = ("hard", "image_truth")  # fine-tuning the fusion teacher on a downstream task

    def __init__(self, model: FusionTeacher, task: str, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        if task not in ("vqa", "nlvr2"):
            raise ValueError(f"fusion fine-tuning is for vqa or nlvr2, got {task!r}")
        check_task(task, model.heads)
        weights = {"hard": 1.0} if weights is None else dict(weights)
        unknown = set(weights) - set(self.OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {self.OBJECTIVES}")
        if "image_truth" in weights and task != "nlvr2":
            raise ValueError("objective 'image_truth' is for nlvr2 (two images per statement)")
        self.model, self.task, self.weights = model, task, weights

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
        terms = {"hard": hard}
        if "image_truth" in self.weights:
            terms["image_truth"] = _image_truth_loss(out.image_logits, batch.get("image_truth"))
        loss = sum(self.weights.get(k, 0.0) * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}, "acc": acc.detach()}


def _image_truth_loss(logits: Tensor, truth: Tensor | None) -> Tensor:
    """Cross-entropy of per-image logits [B, 2, 2] on truths [B, 2] (-100: unknown); a graph-keeping
    zero when the batch knows none, so every rank still runs the same backward."""
    if truth is None:
        raise ValueError("objective 'image_truth' needs the batch's 'image_truth' (nlvr2 shards with relation_holds)")
    flat = truth.reshape(-1)  # [2B]
    if not bool((flat != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, 2), flat, ignore_index=-100)
