"""Unit tests for the distillation pair (fusion teacher, dual-encoder student) and DistillationTask."""

from __future__ import annotations

import time

import pytest
import torch

from helpers import overfit
from vlforge.models import create_model
from vlforge.models.distill import DualEncoderStudent, FusionTeacher, dual_qk, fusion_qk
from vlforge.objectives.distillation import cross_modal_attention_kl
from vlforge.tasks.distill import DistillationTask

pytestmark = pytest.mark.unit

A = 6  # answer vocabulary of the VQA-style head


def make_batch(b: int = 4, t: int = 8, img: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, 30522, (b, t), generator=g)
    lengths = torch.tensor([t - (i % 3) for i in range(b)])
    am = (torch.arange(t)[None] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    ids[am == 0] = 0
    return {
        "pixel_values": torch.randn(b, 3, img, img, generator=g),
        "pixel_values_2": torch.randn(b, 3, img, img, generator=g),
        "input_ids": ids,
        "attention_mask": am,
        "label": torch.arange(b) % 2,
        "answer_id": torch.arange(b) % A,
        "answer_targets": (torch.rand(b, A, generator=g) > 0.7).float(),
        "sample_id": torch.arange(b),
    }


def make_pair(seed: int = 0, sharp_teacher: bool = False) -> tuple[DualEncoderStudent, FusionTeacher]:
    torch.manual_seed(seed)
    teacher = FusionTeacher(create_model("vlmo_debug"), num_answers=A)
    student = DualEncoderStudent(create_model("vlmo_debug", vl_layers=0), num_answers=A)
    if sharp_teacher:
        # A randomly initialised teacher attends almost uniformly and predicts almost uniform
        # labels; scale it up so that there is something to distil.
        with torch.no_grad():
            for name, p in teacher.named_parameters():
                if name.endswith("attn.qkv.weight"):
                    p.mul_(6.0)
                elif ("heads." in name or "pooler." in name) and name.endswith("weight") and p.ndim == 2:
                    p.mul_(8.0)
    return student, teacher


def test_student_and_teacher_expose_split_last_layer_qk():
    student, teacher = make_pair()
    batch = make_batch(3, 8)
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    n_img, h, dh = 1 + student.encoder.num_patches, 2, 16

    joint = teacher.encoder.forward_fusion(pv, ids, am)
    tq = fusion_qk(joint)
    assert tq.text_q.shape == tq.text_k.shape == (3, h, 8, dh)
    assert tq.image_q.shape == tq.image_k.shape == (3, h, n_img, dh)
    assert torch.equal(tq.text_q, joint.q[:, :, :8]) and torch.equal(tq.image_k, joint.k[:, :, 8:])
    assert torch.equal(tq.text_mask, am.bool())

    img, txt = student.encode(pv, ids, am)
    sq = dual_qk(img, txt)
    assert torch.equal(sq.text_q, txt.q) and torch.equal(sq.image_k, img.k)
    assert sq.text_q.shape == tq.text_q.shape and sq.image_q.shape == tq.image_q.shape
    assert cross_modal_attention_kl(sq, tq) > 0


@pytest.mark.parametrize("task, classes", [("itm", 2), ("vqa", A), ("nlvr2", 2)])
def test_task_outputs_and_heads(task, classes):
    student, teacher = make_pair()
    batch = make_batch(4, 8)
    args = (task, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["pixel_values_2"])
    s, t = student(*args), teacher(*args)
    assert s.logits.shape == t.logits.shape == (4, classes)
    assert len(s.qk) == len(t.qk) == (2 if task == "nlvr2" else 1)
    weights = {"soft": 1.0, "attn": 1.0, "hard": 1.0, **({"itc": 1.0} if task == "itm" else {})}
    out = DistillationTask(student, teacher, task, weights)(batch)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert set(out) == {"loss", *weights}
    assert all(not v.requires_grad and v.ndim == 0 for k, v in out.items() if k != "loss")
    torch.testing.assert_close(out["loss"].detach(), sum(out[k] for k in weights))


def test_student_nlvr2_concatenates_both_pair_representations():
    student, _ = make_pair()
    student.eval()
    batch = make_batch(2, 8)
    args = ("nlvr2", batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        a = student(*args, batch["pixel_values_2"]).logits
        b = student(*args, batch["pixel_values_2"] + 1.0).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        student(*args)


def test_retrieval_scores_are_dot_products_of_itc_embeddings():
    student, _ = make_pair()
    batch = make_batch(3, 8)
    img, txt = student.encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    scores = student.retrieval_scores(img, txt)
    assert scores.shape == (3, 3) and scores.abs().max() <= 1.0 + 1e-5
    expected = student.encoder.image_embedding(img) @ student.encoder.text_embedding(txt).t()
    torch.testing.assert_close(scores, expected)


def test_teacher_is_frozen_stays_in_eval_and_never_changes():
    student, teacher = make_pair()
    task = DistillationTask(student, teacher, "nlvr2", {"soft": 1.0, "attn": 1.0, "hard": 1.0})
    task.train()
    assert task.training and student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    task.train(True)
    assert not teacher.training
    task.eval()
    assert not teacher.training and not student.training
    task.train()

    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    batch = make_batch(4, 8)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        task(batch)["loss"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None for p in student.parameters())
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training


def test_task_validation():
    student, teacher = make_pair()
    with pytest.raises(ValueError):
        DistillationTask(student, teacher, "vqa", {"itc": 1.0})
    with pytest.raises(ValueError):
        DistillationTask(student, teacher, "vqa", {"kl": 1.0})
    with pytest.raises(ValueError):
        DistillationTask(student, teacher, "captioning", {"soft": 1.0})
    no_vqa = DualEncoderStudent(create_model("vlmo_debug"))
    with pytest.raises(ValueError):
        no_vqa.classify("vqa", torch.zeros(1, 32), torch.zeros(1, 32))


@pytest.mark.parametrize("task_name", ["nlvr2", "itm"])
def test_student_overfits_one_batch(task_name):
    student, teacher = make_pair(sharp_teacher=True)
    weights = {"soft": 1.0, "attn": 1.0}
    task = DistillationTask(student, teacher, task_name, weights)
    batch = make_batch(4, 8)
    start = time.time()
    first, last, steps = overfit(task, batch, max_steps=300)
    torch.manual_seed(1234)
    terms = {k: round(v.item(), 4) for k, v in task(batch).items()}
    print(
        f"distillation student ({task_name}, soft+attn) overfit: {first:.4f} -> {last:.4f} "
        f"in {steps} steps, {time.time() - start:.1f}s; terms now {terms}"
    )
    assert first > 0.2  # the sharpened teacher gives the student something to learn
    assert last < first / 5
