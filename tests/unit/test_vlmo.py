"""Unit tests for the VLMo model, its registry sizes, routing, stage freezing and overfitting."""

from __future__ import annotations

import time

import pytest
import torch

from helpers import overfit
from vlforge.models import create_model, list_models
from vlforge.models.trainable import param_groups, set_trainable
from vlforge.models.vlmo import VLMo, VLMoConfig
from vlforge.tasks.vlmo import VLMoPretrainTask

pytestmark = pytest.mark.unit

STAGE2 = ["text_embed.*", "blocks.*.experts.l.*", "norm.l.*", "heads.mlm.*"]


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
        "input_ids": ids,
        "attention_mask": am,
        "sample_id": torch.arange(b),
    }


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_sizes():
    assert {"vlmo_debug", "vlmo_small", "vlmo_base", "vlmo_large"} <= set(list_models("vlmo_"))


@pytest.mark.parametrize(
    "name, dim, depth, heads, vl_layers, img, patch, paper_params",
    [
        ("vlmo_debug", 32, 2, 2, 1, 32, 8, None),
        ("vlmo_small", 192, 4, 3, 1, 64, 8, None),
        ("vlmo_base", 768, 12, 12, 2, 224, 16, 175e6),
        ("vlmo_large", 1024, 24, 16, 3, 224, 16, 562e6),
    ],
)
def test_sizes_on_meta_device(name, dim, depth, heads, vl_layers, img, patch, paper_params):
    with torch.device("meta"):
        model = create_model(name)
        b, t = 2, model.config.max_text_len
        out = model.forward_fusion(torch.zeros(b, 3, img, img), torch.zeros(b, t, dtype=torch.long), None)
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.vl_layers, cfg.img_size, cfg.patch_size) == (
        dim,
        depth,
        heads,
        vl_layers,
        img,
        patch,
    )
    n_img = 1 + (img // patch) ** 2
    assert out.hidden.shape == (b, t + n_img, dim)
    assert out.q.shape == out.k.shape == (b, heads, t + n_img, dim // heads)
    assert [blk.has_vl for blk in model.blocks] == [False] * (depth - vl_layers) + [True] * vl_layers
    count = n_params(model)
    print(f"{name}: {count / 1e6:.2f}M parameters")
    if paper_params is not None:
        assert abs(count - paper_params) / paper_params < 0.03, count


@pytest.mark.parametrize("name, img", [("vlmo_debug", 32), ("vlmo_small", 64)])
def test_forward_shapes(name, img):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.config
    batch = make_batch(2, 10, img)
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    d, h, n = cfg.embed_dim, cfg.num_heads, model.num_patches
    image = model.encode_image(pv)
    text = model.encode_text(ids, am)
    joint = model.forward_fusion(pv, ids, am)
    assert image.hidden.shape == (2, 1 + n, d) and image.q.shape == (2, h, 1 + n, d // h) and image.text_len == 0
    assert text.hidden.shape == (2, 10, d) and text.k.shape == (2, h, 10, d // h) and text.text_len == 10
    assert joint.hidden.shape == (2, 10 + 1 + n, d) and joint.text_len == 10
    assert joint.text_hidden.shape == (2, 10, d) and joint.image_hidden.shape == (2, 1 + n, d)
    assert torch.equal(joint.key_mask[:, :10], am.bool()) and joint.key_mask[:, 10:].all()
    e_img, e_txt = model.image_embedding(image), model.text_embedding(text)
    assert e_img.shape == e_txt.shape == (2, cfg.itc_embed_dim)
    torch.testing.assert_close(e_img.norm(dim=-1), torch.ones(2))
    assert model.itm_logits(joint).shape == (2, 2)
    assert model.mlm_logits(joint.text_hidden).shape == (2, 10, cfg.vocab_size)
    assert model.mim_predictions(image).shape == (2, n, cfg.patch_size**2 * 3)
    assert model(pixel_values=pv).hidden.shape == image.hidden.shape
    assert model(input_ids=ids, attention_mask=am).hidden.shape == text.hidden.shape


def test_overrides_and_config_validation():
    model = create_model("vlmo_debug", depth=3, vl_layers=2, tie_mlm_decoder=False)
    assert len(model.blocks) == 3 and [b.has_vl for b in model.blocks] == [False, True, True]
    assert "heads.mlm.decoder.weight" in dict(model.named_parameters())
    assert "heads.mlm.decoder.weight" not in dict(create_model("vlmo_debug").named_parameters())
    assert "norm.vl.weight" not in dict(create_model("vlmo_debug", vl_layers=0).named_parameters())
    assert VLMo(VLMoConfig(embed_dim=16, num_heads=2, depth=1, vl_layers=1, img_size=16, patch_size=8)).embed_dim == 16
    with pytest.raises(TypeError):
        create_model("vlmo_debug", not_a_field=1)
    with pytest.raises(ValueError):
        create_model("vlmo_debug", vl_layers=3)
    with pytest.raises(ValueError):
        create_model("vlmo_debug", img_size=30)


def test_word_init_std_sets_only_the_word_embeddings():
    torch.manual_seed(0)
    default, wide = create_model("vlmo_debug"), create_model("vlmo_debug", word_init_std=1.0)
    assert abs(default.text_embed.word.weight.std().item() - 0.02) < 0.002  # BERT's init_std
    assert abs(wide.text_embed.word.weight.std().item() - 1.0) < 0.02
    assert abs(wide.text_embed.pos.weight.std().item() - 0.02) < 0.002  # positions keep init_std


def test_parameter_names_are_regular():
    names = set(dict(create_model("vlmo_debug").named_parameters()))
    for expected in [
        "image_embed.patch.weight",
        "image_embed.cls_token",
        "image_embed.pos",
        "image_embed.type_embed",
        "image_embed.mask_token",
        "text_embed.word.weight",
        "text_embed.pos.weight",
        "text_embed.type_embed",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.norm.weight",
        "blocks.0.experts.v.fc1.weight",
        "blocks.0.experts.l.fc2.bias",
        "blocks.1.experts.vl.norm.weight",
        "norm.v.weight",
        "norm.l.weight",
        "norm.vl.weight",
        "pooler.dense.weight",
        "heads.itc.logit_scale",
        "heads.itc.image_proj.weight",
        "heads.itm.weight",
        "heads.mlm.dense.weight",
        "heads.mlm.bias",
        "heads.mim.weight",
    ]:
        assert expected in names, expected
    assert "blocks.0.experts.vl.fc1.weight" not in names


def _perturb(model: torch.nn.Module, patterns: list[str]) -> None:
    from fnmatch import fnmatchcase

    hit = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(fnmatchcase(name, pat) for pat in patterns):
                p.add_(torch.randn_like(p))
                hit += 1
    assert hit


def test_modality_routing():
    torch.manual_seed(0)
    model = create_model("vlmo_debug", depth=3, vl_layers=1).eval()
    batch = make_batch(2, 8)
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]

    def outputs():
        with torch.no_grad():
            return (
                model.encode_image(pv).hidden,
                model.encode_text(ids, am).hidden,
                model.forward_fusion(pv, ids, am).hidden,
            )

    img0, txt0, joint0 = outputs()

    _perturb(model, ["blocks.*.experts.v.*", "norm.v.*", "image_embed.*"])
    img1, txt1, joint1 = outputs()
    assert torch.equal(txt1, txt0) and not torch.allclose(img1, img0) and not torch.allclose(joint1, joint0)

    _perturb(model, ["blocks.*.experts.l.*", "norm.l.*"])
    img2, txt2, joint2 = outputs()
    assert torch.equal(img2, img1) and not torch.allclose(txt2, txt1) and not torch.allclose(joint2, joint1)

    _perturb(model, ["blocks.*.experts.vl.*", "norm.vl.*"])
    img3, txt3, joint3 = outputs()
    assert torch.equal(img3, img2) and torch.equal(txt3, txt2) and not torch.allclose(joint3, joint2)

    # Top (VL) blocks route the whole fusion sequence to the VL expert: their V/L experts are unused there.
    _perturb(model, ["blocks.2.experts.v.*", "blocks.2.experts.l.*"])
    assert torch.equal(outputs()[2], joint3)
    # Bottom blocks route fusion text tokens to L.
    _perturb(model, ["blocks.0.experts.l.*"])
    assert not torch.allclose(outputs()[2], joint3)


def test_padding_tokens_are_masked():
    torch.manual_seed(0)
    model = create_model("vlmo_debug").eval()
    batch = make_batch(3, 10)
    pv, ids, am = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    other = ids.masked_fill(am == 0, 2000)
    with torch.no_grad():
        a, b = model.encode_text(ids, am), model.encode_text(other, am)
        torch.testing.assert_close(a.hidden[am.bool()], b.hidden[am.bool()])
        ja, jb = model.forward_fusion(pv, ids, am), model.forward_fusion(pv, other, am)
        torch.testing.assert_close(ja.image_hidden, jb.image_hidden)
        assert not am[1].all()
        unmasked = model.encode_text(other, torch.ones_like(am)).hidden
        assert not torch.allclose(unmasked[1][am[1].bool()], b.hidden[1][am[1].bool()])


def test_stage2_only_declared_parameters_train_and_frozen_stay_bit_identical():
    torch.manual_seed(0)
    model = create_model("vlmo_debug")
    trainable = set(set_trainable(model, STAGE2))
    named = dict(model.named_parameters())
    assert "text_embed.word.weight" in trainable and "blocks.1.experts.l.fc1.weight" in trainable
    assert "blocks.0.attn.qkv.weight" not in trainable and "blocks.0.experts.v.fc1.weight" not in trainable
    frozen_before = {n: p.detach().clone() for n, p in named.items() if n not in trainable}
    trainable_before = {n: named[n].detach().clone() for n in trainable}

    groups = param_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(named[n]) for n in trainable}

    task = VLMoPretrainTask(model, {"mlm_text": 1.0})
    batch = make_batch(4, 8)
    model.eval()
    with torch.no_grad():
        image_before = model.encode_image(batch["pixel_values"]).hidden.clone()
    model.train()
    for step in range(4):
        torch.manual_seed(step)
        opt.zero_grad(set_to_none=True)
        task(batch)["loss"].backward()
        for n, p in named.items():
            if n in trainable:
                assert p.grad is not None, n
            else:
                assert p.grad is None, n
        opt.step()

    for n, before in frozen_before.items():
        assert torch.equal(named[n], before), n
    changed = [n for n in trainable if not torch.equal(named[n], trainable_before[n])]
    assert set(changed) == trainable
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["pixel_values"]).hidden, image_before)


def test_set_trainable_rejects_patterns_that_match_nothing():
    model = create_model("vlmo_debug")
    with pytest.raises(ValueError, match="match no parameter"):
        set_trainable(model, ["text_embed.*", "blocks.*.expert.l.*"])
    with pytest.raises(ValueError):
        set_trainable(model, [])
    assert set_trainable(model, ["*"]) == [n for n, _ in model.named_parameters()]


def test_vlmo_itc_itm_mlm_overfits_one_batch():
    torch.manual_seed(0)
    task = VLMoPretrainTask(create_model("vlmo_debug"), {"itc": 1.0, "itm": 1.0, "mlm": 0.25})
    start = time.time()
    first, last, steps = overfit(task, make_batch(4, 8), max_steps=300)
    print(f"VLMo ITC+ITM+0.25*MLM overfit: {first:.4f} -> {last:.4f} in {steps} steps, {time.time() - start:.1f}s")
    assert last < first / 5


def test_vlmo_mim_overfits_one_batch():
    torch.manual_seed(0)
    task = VLMoPretrainTask(create_model("vlmo_debug"), {"mim": 1.0})
    start = time.time()
    first, last, steps = overfit(task, make_batch(4, 8), max_steps=300)
    print(f"VLMo MIM overfit: {first:.4f} -> {last:.4f} in {steps} steps, {time.time() - start:.1f}s")
    assert last < first / 5


def test_pretrain_task_returns_scalar_loss_and_detached_terms():
    torch.manual_seed(0)
    task = VLMoPretrainTask(create_model("vlmo_debug"), {"itc": 1, "itm": 1, "mlm": 0.25, "mim": 1, "mlm_text": 1})
    out = task(make_batch(4, 8))
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert set(out) == {"loss", "itc", "itm", "mlm", "mim", "mlm_text"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    expected = out["itc"] + out["itm"] + 0.25 * out["mlm"] + out["mim"] + out["mlm_text"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    with pytest.raises(ValueError):
        VLMoPretrainTask(create_model("vlmo_debug"), {"contrastive": 1.0})


def test_itc_batch_norm_centres_pooled_states_and_is_fixed_at_eval(tmp_path):
    from vlforge.models.io import load_model_dir, save_model_dir

    assert not list(create_model("vlmo_debug").heads["itc"].buffers())  # off by default: no new state
    with pytest.raises(ValueError, match="itc_norm"):
        create_model("vlmo_debug", itc_norm="layer")
    torch.manual_seed(0)
    model = create_model("vlmo_debug", itc_norm="batch")
    head = model.heads["itc"]
    assert not list(head.image_norm.parameters()) and not list(head.text_norm.parameters())
    batch = make_batch(8, 8)
    # A shared offset on every pooled state (what stages 1-2 leave behind) is removed in training mode.
    pooled = model.summary(model.encode_image(batch["pixel_values"])) + 50.0  # [B, D]
    centred = head.image_norm(pooled)
    torch.testing.assert_close(centred.mean(0), torch.zeros(pooled.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(centred.var(0, unbiased=False), torch.ones(pooled.shape[1]), atol=1e-2, rtol=0)
    for _ in range(5):  # running statistics from training batches
        model.embed_image(batch["pixel_values"])
        model.embed_text(batch["input_ids"], batch["attention_mask"])
    model.eval()
    with torch.no_grad():
        one = model.embed_image(batch["pixel_values"][:1])
        all_ = model.embed_image(batch["pixel_values"])
        texts = model.embed_text(batch["input_ids"], batch["attention_mask"])
    # At eval an image's embedding does not depend on the rest of the batch, so it can be cached.
    torch.testing.assert_close(one, all_[:1])
    # The running statistics travel with the model directory.
    spec = {"model": "vlmo_debug", "overrides": {"itc_norm": "batch"}, "method": "vlmo"}
    loaded = load_model_dir(save_model_dir(model.state_dict(), spec, tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_image(batch["pixel_values"]), all_)
        torch.testing.assert_close(loaded.embed_text(batch["input_ids"], batch["attention_mask"]), texts)


def test_itc_with_batch_norm_overfits_one_batch():
    torch.manual_seed(0)
    task = VLMoPretrainTask(create_model("vlmo_debug", itc_norm="batch"), {"itc": 1.0})
    first, last, steps = overfit(task, make_batch(8, 8), max_steps=300)
    assert last < first / 5
