"""The locked EfficientNet-Lite0 image tokenizer, VLMo on top of it, mean pooling, QK-norm, malloc tuning."""

from __future__ import annotations

import json

import pytest
import torch

from vlforge.models import create_model
from vlforge.models.image_tokenizer import TOKENIZERS, create_image_tokenizer
from vlforge.models.io import load_model_dir, save_model_dir
from vlforge.models.trainable import param_groups, set_trainable
from vlforge.tasks.vlmo import VLMoPretrainTask

pytestmark = pytest.mark.unit


def _batch(b: int = 4, t: int = 8, img: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, 30522, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[1, 5:] = 0
    ids[:, 0] = 101
    ids[am == 0] = 0
    return {
        "pixel_values": torch.rand(b, 3, img, img, generator=g) * 2 - 1,
        "input_ids": ids,
        "attention_mask": am,
        "sample_id": torch.arange(b),
    }


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vlmo_small_effnet", img_size=64, depth=2, embed_dim=64, num_heads=2, itc_embed_dim=64)


def test_pretrained_weights_load_and_grid_shape():
    tok = create_image_tokenizer("efficientnet_lite0", 64)
    feats = tok(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, TOKENIZERS["efficientnet_lite0"].channels, 2, 2)
    # ImageNet weights, not a fresh init: BatchNorm statistics differ from the defaults (0 / 1).
    assert tok.net._bn0.running_mean.abs().sum() > 0
    assert not any(p.requires_grad for p in tok.parameters())
    # weights stay contiguous NCHW (DeepSpeed's parameter broadcast cannot view channels-last ones as
    # bytes); the input goes channels-last, the output comes back contiguous
    assert all(p.is_contiguous() for p in tok.parameters())
    assert feats.is_contiguous()


def test_tokenizer_stays_frozen_and_in_eval_mode(small):
    names = set_trainable(small, ["*"])
    assert names and not any(".tokenizer." in n for n in names)
    assert not any(p.requires_grad for p in small.image_embed.tokenizer.parameters())
    small.train()
    assert small.training and not small.image_embed.tokenizer.training
    groups = param_groups(small, 0.01)
    tok_ids = {id(p) for p in small.image_embed.tokenizer.parameters()}
    assert not any(id(p) in tok_ids for g in groups for p in g["params"])


def test_pixels_and_cached_features_give_the_same_outputs(small):
    small.eval()
    b = _batch()
    feats = small.image_embed.tokenizer(b["pixel_values"])
    with torch.no_grad():
        a = small.image_embedding(small.encode_image(b["pixel_values"]))
        c = small.image_embedding(small.encode_image(feats))
        fa = small.forward_fusion(b["pixel_values"], b["input_ids"], b["attention_mask"]).hidden
        fc = small.forward_fusion(feats, b["input_ids"], b["attention_mask"]).hidden
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(fa, fc)
    with pytest.raises(ValueError, match="expected pixels"):
        small.encode_image(torch.randn(2, 5, 2, 2))


def test_mean_pool_ignores_padding(small):
    small.eval()
    b = _batch()
    with torch.no_grad():
        out = small.encode_text(b["input_ids"], b["attention_mask"])
        pooled = small.summary(out)
    expected = out.hidden[1, :5].mean(0)
    torch.testing.assert_close(pooled[1], expected)


def test_qk_norm_returns_normalised_queries(small):
    small.eval()
    b = _batch()
    with torch.no_grad():
        out = small.encode_text(b["input_ids"], b["attention_mask"])
    # LayerNorm over the head dimension (unit weight at init): zero mean per head vector.
    assert out.q.mean(-1).abs().max() < 1e-4
    assert small.config.qk_norm


def test_one_step_lowers_the_loss_and_mim_regresses_features(small):
    set_trainable(small, ["*"])
    task = VLMoPretrainTask(small, {"itc": 1.0, "itm": 1.0, "mim": 1.0}, gather=False)
    opt = torch.optim.AdamW(param_groups(small, 0.0), lr=1e-3)
    b = _batch(b=6)
    b["pixel_values"] = small.image_embed.tokenizer(b["pixel_values"])  # cached features, as training reads them
    torch.manual_seed(0)
    first = task(b)["loss"].item()
    for _ in range(15):
        torch.manual_seed(0)
        loss = task(b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(0)
    assert task(b)["loss"].item() < first
    assert small.mim_targets(b["pixel_values"]).shape == (
        6,
        small.num_patches,
        TOKENIZERS["efficientnet_lite0"].channels,
    )


def test_model_dir_round_trip_keeps_the_tokenizer(small, tmp_path):
    spec = {
        "model": "vlmo_small_effnet",
        "method": "vlmo",
        "overrides": {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2, "itc_embed_dim": 64},
    }
    save_model_dir(small.state_dict(), spec, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["model"] == "vlmo_small_effnet"
    back = load_model_dir(tmp_path / "m")
    b = _batch()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            back.image_embedding(back.encode_image(b["pixel_values"])),
            small.image_embedding(small.encode_image(b["pixel_values"])),
        )


def test_meta_device_builds_without_weights():
    with torch.device("meta"):
        m = create_model("vlmo_small_effnet")
    assert m.image_embed.tokenizer.net._conv_stem.weight.device.type == "meta"
    assert m.num_patches == 16


def test_unknown_tokenizer_and_bad_pool_are_refused():
    with pytest.raises(ValueError, match="unknown image_tokenizer"):
        create_model("vlmo_debug", image_tokenizer="resnet9000")
    with pytest.raises(ValueError, match="pool must be"):
        create_model("vlmo_debug", pool="max")


def test_tune_malloc_applies_on_glibc():
    from vlforge.runtime import tune_malloc

    assert tune_malloc() is True
    assert tune_malloc() is True  # idempotent


def _effnet(**kw) -> torch.nn.Module:
    return create_model("vlmo_small_effnet", img_size=64, depth=2, embed_dim=64, num_heads=2, itc_embed_dim=64, **kw)


def test_tasks_tokenise_each_image_once_with_the_same_losses(small):
    """The VLMo task and the distillation task run the locked tokenizer once per image and hand its
    features to every term (and to the teacher); the losses equal those of tokenising in each term."""
    from vlforge.models.distill import DualEncoderStudent, FusionTeacher
    from vlforge.tasks.distill import DistillationTask

    calls = []
    handle = small.image_embed.tokenizer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    task = VLMoPretrainTask(small, {"itc": 1.0, "itm": 1.0, "mlm": 0.25}, gather=False)
    b = _batch(b=6)
    torch.manual_seed(0)
    shared = task(b)
    handle.remove()
    assert calls == [6]
    task._image_input = lambda pv: pv  # each term tokenises the pixels itself
    torch.manual_seed(0)
    each = task(b)
    assert all(torch.allclose(shared[k], each[k], atol=1e-6) for k in shared), (shared, each)

    torch.manual_seed(0)
    teacher, student = FusionTeacher(_effnet()), DualEncoderStudent(_effnet(vl_layers=0))
    b2 = {
        **_batch(b=6, seed=1),
        "pixel_values_2": _batch(b=6, seed=2)["pixel_values"],
        "label": torch.tensor([0, 1] * 3),
    }
    tok = student.encoder.image_embed.tokenizer
    for kind, batch in (("itm", _batch(b=6)), ("nlvr2", b2)):
        dist = DistillationTask(student, teacher, kind, {"soft": 1.0, "attn": 1.0, "hard": 1.0}, gather=False)
        assert dist._share_features
        keys = set(dist.state_dict())
        assert keys == {f"student.{k}" for k in student.state_dict()} | {f"teacher.{k}" for k in teacher.state_dict()}
        calls = []
        hooks = [
            m.image_embed.tokenizer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
            for m in (student.encoder, teacher.encoder)
        ]
        torch.manual_seed(0)
        once = dist(batch)
        assert calls == [6] * (1 if kind == "itm" else 2), calls  # the teacher's 3B / pairs reuse the features
        calls.clear()
        dist._share_features = False
        torch.manual_seed(0)
        twice = dist(batch)
        assert len(calls) == (2 if kind == "itm" else 4), calls
        for h in hooks:
            h.remove()
        assert all(torch.allclose(once[k], twice[k], atol=1e-6) for k in once), (kind, once, twice)
    assert tok is student.encoder.image_embed.tokenizer
    other = FusionTeacher(_effnet())
    next(other.encoder.image_embed.tokenizer.parameters()).data.add_(1.0)  # a different network: no sharing
    assert not DistillationTask(student, other, "itm", {"soft": 1.0}, gather=False)._share_features
