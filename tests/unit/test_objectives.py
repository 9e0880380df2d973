"""Unit tests for vlforge.objectives: ITC, ITM hard negatives, MLM, MIM, distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlforge.objectives.distillation import (
    CrossModalQK,
    attention_log_probs,
    cross_modal_attention_kl,
    multilabel_bce,
    soft_label_bce,
    soft_label_kl,
)
from vlforge.objectives.itc import contrastive_logits, itc_loss
from vlforge.objectives.itm import build_itm_batch, sample_hard_negatives
from vlforge.objectives.mim import mim_loss, mim_targets, patchify, random_patch_mask
from vlforge.objectives.mlm import IGNORE_INDEX, mask_tokens, mlm_loss

pytestmark = pytest.mark.unit


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# ----------------------------------------------------------------------------- ITC


def test_itc_matches_reference_formula():
    img, txt = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    scale = torch.tensor(10.0)
    sim = scale * img @ txt.t()  # [B, B]
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels))
    torch.testing.assert_close(itc_loss(img, txt, scale), expected)
    logits_i2t, logits_t2i, lab = contrastive_logits(img, txt, scale)
    torch.testing.assert_close(logits_t2i, logits_i2t.t())
    assert torch.equal(lab, labels)


def test_itc_is_low_for_aligned_pairs_and_high_for_shuffled():
    img = _unit(8, 16, seed=3)
    scale = torch.tensor(100.0)
    assert itc_loss(img, img, scale) < 1e-3
    assert itc_loss(img, img.roll(1, dims=0), scale) > 1.0


def _itc_worker(rank: int, world: int, store: str) -> None:
    # A file rendezvous: a free TCP port picked before the spawn can be taken by then.
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        b, e = 4, 8
        img_all, txt_all = _unit(world * b, e, seed=11), _unit(world * b, e, seed=12)
        scale = torch.tensor(7.0)
        rows = slice(rank * b, (rank + 1) * b)

        img = img_all[rows].clone().requires_grad_(True)
        txt = txt_all[rows].clone().requires_grad_(True)
        loss = itc_loss(img, txt, scale)
        loss.backward()

        ref_img = img_all.clone().requires_grad_(True)
        ref_txt = txt_all.clone().requires_grad_(True)
        ref = itc_loss(ref_img, ref_txt, scale, gather=False)
        ref.backward()

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        torch.testing.assert_close(mean_loss, ref.detach())
        assert img.grad is not None and txt.grad is not None
        assert img.grad.abs().sum() > 0
        # Each rank's gradient is d(sum of per-rank losses)/d(local slice); data-parallel
        # averaging (divide by world) then gives the gradient of the global loss.
        torch.testing.assert_close(img.grad, world * ref_img.grad[rows])
        torch.testing.assert_close(txt.grad, world * ref_txt.grad[rows])

        # Global hard negatives: candidates come from every rank, never the positive.
        logits = contrastive_logits(img.detach(), txt.detach(), scale)
        assert logits[0].shape == (b, world * b)
        ids_all = torch.arange(world * b * 3).view(world * b, 3)
        pv_all = torch.arange(world * b, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
        out = build_itm_batch(*logits, pv_all[rows], ids_all[rows], torch.ones_like(ids_all[rows]))
        neg_text_rows = out["input_ids"][b : 2 * b, 0] // 3  # global index of each sampled text
        neg_image_rows = out["pixel_values"][2 * b :, 0, 0, 0].long()
        own = torch.arange(rank * b, (rank + 1) * b)
        assert not (neg_text_rows == own).any() and not (neg_image_rows == own).any()
        # Both ranks done before either tears gloo down: a rank that exits while the other is still in
        # a collective aborts it ("terminate called without an active exception", seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_itc_gathered_over_two_gloo_ranks_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_itc_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ----------------------------------------------------------------------------- ITM


def test_hard_negative_sampler_never_returns_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        b = int(torch.randint(2, 9, (1,), generator=g))
        kind = trial % 5
        if kind == 0:
            logits = torch.zeros(b, b)  # every candidate ties
        elif kind == 1:
            logits = torch.randn(b, b, generator=g) * 50
            logits.fill_diagonal_(1e4)  # positive dominates: exp underflow elsewhere
        elif kind == 2:
            logits = torch.randint(0, 2, (b, b), generator=g).float()  # many ties incl. the positive
        elif kind == 3:
            row = torch.randn(1, b, generator=g)
            logits = row.expand(b, b).clone()  # duplicate rows (identical pairs)
        else:
            logits = torch.randn(b, b, generator=g) * 1e3
        positive = torch.randperm(b, generator=g)
        for _ in range(5):
            neg = sample_hard_negatives(logits, positive, generator=g)
            assert neg.shape == (b,)
            assert not (neg == positive).any(), (trial, logits, positive, neg)


def test_hard_negative_sampler_respects_exclusions_and_prefers_hard_candidates():
    logits = torch.tensor([[9.0, 9.0, 8.0, -5.0], [0.0, 5.0, 0.0, 0.0]])
    exclude = torch.tensor([[False, True, False, False], [False, False, False, False]])
    draws = torch.stack([sample_hard_negatives(logits, torch.tensor([0, 1]), exclude) for _ in range(400)])
    assert not (draws[:, 0] == 0).any() and not (draws[:, 0] == 1).any()
    assert (draws[:, 0] == 2).float().mean() > 0.95  # softmax mass of 8 vs -5
    assert not (draws[:, 1] == 1).any()
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.zeros(1, 1), torch.tensor([0]))
    with pytest.raises(ValueError):
        sample_hard_negatives(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))


def test_build_itm_batch_layout_and_sample_id_exclusion():
    b, t = 4, 5
    ids = torch.arange(b * t).view(b, t)
    pv = torch.arange(b, dtype=torch.float).view(b, 1, 1, 1).expand(b, 3, 2, 2)
    am = torch.ones(b, t, dtype=torch.long)
    sample_id = torch.tensor([7, 7, 8, 9])  # rows 0 and 1 are the same sample
    logits = torch.zeros(b, b)
    for _ in range(50):
        out = build_itm_batch(logits, logits, torch.arange(b), pv, ids, am, sample_id=sample_id)
        assert out["input_ids"].shape == (3 * b, t) and out["pixel_values"].shape == (3 * b, 3, 2, 2)
        assert out["itm_labels"].tolist() == [1] * b + [0] * (2 * b)
        assert torch.equal(out["input_ids"][:b], ids) and torch.equal(out["pixel_values"][:b], pv)
        neg_text = out["input_ids"][b : 2 * b, 0] // t
        neg_image = out["pixel_values"][2 * b :, 0, 0, 0].long()
        assert not (sample_id[neg_text] == sample_id).any()
        assert not (sample_id[neg_image] == sample_id).any()


# ----------------------------------------------------------------------------- MLM


def _text_batch(b: int = 256, t: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, 30522, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    am = (torch.arange(t)[None] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    ids[am == 0] = 0
    return ids, am


def test_mask_tokens_rates_and_special_tokens():
    ids, am = _text_batch()
    masked, labels = mask_tokens(ids, am, 30522, generator=torch.Generator().manual_seed(1))
    special = torch.isin(ids, torch.tensor([0, 101, 102, 103]))
    eligible = am.bool() & ~special
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    rate = chosen.sum() / eligible.sum()
    assert 0.13 < rate < 0.17
    n = chosen.sum()
    to_mask = (masked == 103) & chosen
    unchanged = (masked == ids) & chosen
    randomised = chosen & ~to_mask & ~unchanged
    assert 0.76 < to_mask.sum() / n < 0.84
    assert 0.07 < randomised.sum() / n < 0.13
    assert 0.07 < unchanged.sum() / n < 0.13  # random draws equal to the original are rare
    assert not torch.isin(masked[randomised], torch.tensor([0, 101, 102, 103])).any()


def test_mlm_loss_ignores_unchosen_and_never_nans():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    empty = mlm_loss(logits, labels)
    assert empty.item() == 0.0 and not torch.isnan(empty)
    empty.backward()
    labels[0, 1] = 4
    expected = F.cross_entropy(logits[0, 1][None], torch.tensor([4]))
    torch.testing.assert_close(mlm_loss(logits, labels), expected)


# ----------------------------------------------------------------------------- MIM


def test_patchify_matches_patch_order_of_a_strided_conv():
    x = torch.randn(2, 3, 16, 16)
    patches = patchify(x, 4)  # [B, 16, 48]
    assert patches.shape == (2, 16, 48)
    weight = torch.randn(5, 3, 4, 4)
    conv = F.conv2d(x, weight, stride=4).flatten(2).transpose(1, 2)  # [B, 16, 5]
    flat_w = weight.permute(0, 2, 3, 1).reshape(5, 48)  # (p, p, C) order like patchify
    torch.testing.assert_close(patches @ flat_w.t(), conv, atol=1e-4, rtol=1e-4)
    target = mim_targets(x, 4)
    torch.testing.assert_close(target.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_mim_loss_counts_masked_patches_only():
    mask = random_patch_mask(3, 10, 0.4, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4, 4, 4]
    target = torch.randn(3, 10, 6)
    pred = target.clone()
    pred[~mask] += 100.0
    assert mim_loss(pred, target, mask).item() == 0.0
    pred[mask] += 1.0
    torch.testing.assert_close(mim_loss(pred, target, mask), torch.tensor(1.0))


# ----------------------------------------------------------------------------- distillation


def _qk(b=2, h=3, lt=5, li=7, d=4, seed=0, text_mask=None) -> CrossModalQK:
    g = torch.Generator().manual_seed(seed)
    if text_mask is None:
        text_mask = torch.ones(b, lt, dtype=torch.bool)
        text_mask[0, 3:] = False
    r = lambda n: torch.randn(b, h, n, d, generator=g)  # noqa: E731
    return CrossModalQK(r(lt), r(lt), r(li), r(li), text_mask)


def test_attention_kl_is_zero_for_identical_qk_and_positive_otherwise():
    teacher = _qk(seed=0)
    assert torch.allclose(cross_modal_attention_kl(teacher, teacher), torch.tensor(0.0), atol=1e-6)
    student = _qk(seed=1, text_mask=teacher.text_mask)
    assert cross_modal_attention_kl(student, teacher) > 1e-3


def test_attention_kl_matches_explicit_reference():
    teacher, student = _qk(seed=2), _qk(seed=3)
    teacher.text_mask = student.text_mask
    d = teacher.text_q.shape[-1]

    def kl(p, q):
        return (p * (p.log() - q.log())).sum()

    total_t2i, n_t2i, total_i2t, n_i2t = 0.0, 0, 0.0, 0
    b, h, lt, _ = teacher.text_q.shape
    li = teacher.image_q.shape[2]
    for i in range(b):
        real = teacher.text_mask[i].nonzero().squeeze(1)
        for j in range(h):
            for qi in real:  # text queries over image keys, padded queries skipped
                pt = torch.softmax(teacher.text_q[i, j, qi] @ teacher.image_k[i, j].t() / math.sqrt(d), -1)
                ps = torch.softmax(student.text_q[i, j, qi] @ student.image_k[i, j].t() / math.sqrt(d), -1)
                total_t2i += kl(pt, ps)
                n_t2i += 1
            for qi in range(li):  # image queries over real text keys only
                pt = torch.softmax(teacher.image_q[i, j, qi] @ teacher.text_k[i, j, real].t() / math.sqrt(d), -1)
                ps = torch.softmax(student.image_q[i, j, qi] @ student.text_k[i, j, real].t() / math.sqrt(d), -1)
                total_i2t += kl(pt, ps)
                n_i2t += 1
    expected = total_t2i / n_t2i + total_i2t / n_i2t
    torch.testing.assert_close(cross_modal_attention_kl(student, teacher), expected, atol=1e-5, rtol=1e-5)


def test_teacher_distributions_are_renormalised_not_sliced_from_the_joint_map():
    # A teacher whose joint map puts most text-query mass on text keys: slicing would not sum to 1.
    teacher = _qk(seed=4)
    teacher.text_k = teacher.text_q * 5
    logp = attention_log_probs(teacher.text_q, teacher.image_k)  # [B, H, Lt, Li]
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(logp.shape[:3]))
    joint_k = torch.cat([teacher.text_k, teacher.image_k], dim=2)
    joint = torch.softmax(teacher.text_q @ joint_k.transpose(-1, -2) / 2.0, -1)
    assert (joint[..., teacher.text_k.shape[2] :].sum(-1) < 0.9).any()


def test_padded_text_keys_get_zero_probability_and_padded_queries_do_not_count():
    teacher, student = _qk(seed=5), _qk(seed=6)
    student.text_mask = teacher.text_mask
    probs = attention_log_probs(student.image_q, student.text_k, teacher.text_mask).exp()  # [B, H, Li, Lt]
    assert torch.all(probs[0, :, :, 3:] == 0.0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]))
    base = cross_modal_attention_kl(student, teacher)
    student.text_k[0, :, 3:] = torch.randn_like(student.text_k[0, :, 3:]) * 10  # padded keys
    student.text_q[0, :, 3:] = torch.randn_like(student.text_q[0, :, 3:]) * 10  # padded queries
    torch.testing.assert_close(cross_modal_attention_kl(student, teacher), base)
    student.text_q[0, :, 1] += 3.0  # a real query does count
    assert not torch.allclose(cross_modal_attention_kl(student, teacher), base)


def test_attention_kl_gradients_reach_student_only_and_are_finite():
    teacher = _qk(seed=7)
    student = _qk(seed=8, text_mask=teacher.text_mask)
    for t in (teacher.text_q, teacher.text_k, teacher.image_q, teacher.image_k):
        t.requires_grad_(True)
    for t in (student.text_q, student.text_k, student.image_q, student.image_k):
        t.requires_grad_(True)
    cross_modal_attention_kl(student, teacher).backward()
    assert teacher.text_q.grad is None and teacher.image_k.grad is None
    for t in (student.text_q, student.text_k, student.image_q, student.image_k):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.all(student.text_k.grad[0, :, 3:] == 0)


def test_soft_label_kl_temperature_scaling_and_zero_at_match():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    temp = 2.0
    p_t = torch.softmax(t / temp, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    torch.testing.assert_close(soft_label_kl(s, t, temp), expected)
    assert soft_label_kl(t, t, temp).abs() < 1e-6
    assert soft_label_kl(s, t, temp) > 0


def test_soft_label_bce_uses_teacher_sigmoid_targets():
    s = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(3, 6)
    expected = F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="sum") / 3
    torch.testing.assert_close(soft_label_bce(s, t), expected)
    at_match = torch.randn(3, 6, requires_grad=True)
    soft_label_bce(at_match, at_match.detach().clone()).backward()
    assert at_match.grad.abs().max() < 1e-6  # minimum when the student matches the teacher
    torch.testing.assert_close(multilabel_bce(s, torch.sigmoid(t)), expected)
