"""VC-GPT: unmodified causal LM + cross-attention fusion layers, self-ensembled logits."""

from __future__ import annotations

import pytest
import torch

from vlforge.models import create_model
from vlforge.models.lm import load_smollm2
from vlforge.models.vcgpt import VCGPT, VCGPTConfig
from vlforge.models.vision import vision_config
from vlforge.objectives.captioning import caption_labels, caption_loss

pytestmark = pytest.mark.unit

CAPTIONS = ["a red square", "a blue circle", "two green dots", "a yellow star"]


def batch_for(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = model.vision.img_size
    return {"pixel_values": torch.randn(n, 3, s, s, generator=g), **model.tokenize(CAPTIONS[:n])}


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return create_model("vcgpt_debug").eval()


def test_debug_shapes_and_self_ensemble(debug_model):
    batch = batch_for(debug_model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids[:, 0] == debug_model.tokenizer.bos_id).all()
    with torch.no_grad():
        visual = debug_model.visual_tokens(batch["pixel_values"])
        gpt, fuse = debug_model.branch_logits(visual, ids, mask)
        logits = debug_model.compute_logits(batch["pixel_values"], ids, mask)
        lm_alone = debug_model.lm(input_ids=ids, attention_mask=mask).logits
        out = debug_model(batch)
    v = debug_model.tokenizer.vocab_size
    assert visual.shape == (4, 16 + 1, debug_model.lm.config.hidden_size)
    assert gpt.shape == fuse.shape == logits.shape == (4, ids.shape[1], v)
    assert torch.allclose(logits, gpt + fuse)
    assert torch.allclose(gpt, lm_alone, atol=1e-5)
    labels = caption_labels(ids, mask)
    assert torch.allclose(out["loss"], caption_loss(logits, labels), atol=1e-6)
    assert torch.allclose(out["lm_loss"], caption_loss(gpt, labels), atol=1e-6)
    assert int(out["num_tokens"]) == int(mask.sum()) - 4


def test_padding_tokens_do_not_change_loss(debug_model):
    batch = batch_for(debug_model)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        base = debug_model(batch)["loss"]
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        assert torch.allclose(debug_model(other)["loss"], base, atol=1e-6)


def test_image_reaches_only_the_fusion_branch(debug_model):
    a, b = batch_for(debug_model, seed=0), batch_for(debug_model, seed=1)
    with torch.no_grad():
        va, vb = debug_model.visual_tokens(a["pixel_values"]), debug_model.visual_tokens(b["pixel_values"])
        gpt_a, fuse_a = debug_model.branch_logits(va, a["input_ids"], a["attention_mask"])
        gpt_b, fuse_b = debug_model.branch_logits(vb, a["input_ids"], a["attention_mask"])
    assert torch.equal(gpt_a, gpt_b)
    assert not torch.allclose(fuse_a, fuse_b)


def test_fusion_is_causal(debug_model):
    batch = batch_for(debug_model, n=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    with torch.no_grad():
        a = debug_model.compute_logits(batch["pixel_values"], ids, mask)
        b = debug_model.compute_logits(batch["pixel_values"], changed, mask)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5)


def test_freeze_lm_flag():
    model = create_model("vcgpt_debug", freeze_lm=True)
    assert not any(p.requires_grad for p in model.lm.parameters())
    model.train()
    assert not model.lm.training
    batch = batch_for(model)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.lm.state_dict().items())


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = create_model("vcgpt_debug")
    batch = batch_for(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"vcgpt_debug overfit: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] / 5
    model.eval()
    assert model.generate(batch["pixel_values"], max_new_tokens=20) == CAPTIONS


def test_small_with_smollm2(smollm2_loads):
    lm, tok = load_smollm2()  # from the cache smollm2_loads filled
    model = VCGPT(VCGPTConfig(vision=vision_config("small"), fusion_layers=3, fusion_heads=9), lm=lm, tokenizer=tok)
    model.eval()
    batch = {"pixel_values": torch.randn(1, 3, 128, 128), **model.tokenize(["a photo of a cat"])}
    with torch.no_grad():
        out = model(batch)
        logits = model.compute_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (1, batch["input_ids"].shape[1], lm.config.vocab_size)
    assert torch.isfinite(out["loss"])
    assert isinstance(model.generate(batch["pixel_values"], max_new_tokens=3)[0], str)


def test_registered_sizes():
    from vlforge.models import list_models

    assert {"vcgpt_debug", "vcgpt_small", "vcgpt_lite0"} <= set(list_models("vcgpt"))


def test_the_platform_task_trains_vcgpt_on_pipeline_batches():
    """method vcgpt: CaptionTask turns the pipeline's WordPiece ids into the LM's tokens; the loss on one
    batch goes down with the vision tower and fusion branch trained and the LM frozen, as vcgpt_smoke.yaml does."""
    from vlforge.config import TrainRunConfig, from_dict
    from vlforge.data.tokenizer import load_tokenizer
    from vlforge.models.trainable import set_trainable
    from vlforge.tasks import build_task
    from vlforge.tasks.caption import CaptionTask

    cfg = from_dict(
        TrainRunConfig,
        {
            "method": "vcgpt",
            "model": "vcgpt_debug",
            "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
            "stages": [
                {
                    "name": "caption",
                    "objectives": {"caption": 1.0},
                    "steps": 1,
                    "trainable": ["vision.*", "visual_proj.*", "fusion.*", "fusion_norm.*", "fusion_head.*"],
                }
            ],
        },
    )
    torch.manual_seed(0)
    task = build_task(cfg, cfg.stages[0])
    assert isinstance(task.module, CaptionTask) and task.prefix == "model."
    set_trainable(task.model, cfg.stages[0].trainable)
    assert not any(p.requires_grad for p in task.model.lm.parameters())
    tok = load_tokenizer(cfg.data.tokenizer)(["a llama left of a taxi", "a cat above a dog"])
    batch = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "input_ids": torch.from_numpy(tok["input_ids"]),
        "attention_mask": torch.from_numpy(tok["attention_mask"]),
    }
    assert task.module.captions(batch["input_ids"], batch["attention_mask"]) == [
        "a llama left of a taxi",
        "a cat above a dog",
    ]
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(30):
        out = task.module(batch)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() < 0.5 * first


def test_generate_from_one_branch(debug_model):
    pv = torch.randn(2, 3, 32, 32)
    for branch in ("ensemble", "fusion", "gpt"):
        assert len(debug_model.generate(pv, max_new_tokens=3, branch=branch)) == 2
    with pytest.raises(ValueError, match="branch"):
        debug_model.generate(pv, branch="both")


def test_vcgpt_on_the_locked_tower_learns_and_round_trips(tmp_path):
    """A VC-GPT whose vision is the locked EfficientNet-Lite0 tower (vcgpt_lite0's, at debug sizes): one
    batch's loss falls with the tokenizer untouched, and its model directory generates the same captions."""
    from vlforge.models.io import build_from_spec, load_model_dir, save_model_dir
    from vlforge.models.trainable import set_trainable

    lite = {"image_tokenizer": "efficientnet_lite0", "img_size": 64, "embed_dim": 32, "num_heads": 2}
    spec = {"model": "vcgpt_debug", "method": "vcgpt", "overrides": {"vision": lite}}
    torch.manual_seed(0)
    model = build_from_spec(spec)
    set_trainable(model, ["vision.*", "visual_proj.*", "fusion.*", "fusion_norm.*", "fusion_head.*"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("vision.tokenizer.")}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64), **model.tokenize(["a llama left of a taxi", "a cat"])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved"
    model.eval()
    save_model_dir(model.state_dict(), spec, tmp_path / "m")
    back = load_model_dir(tmp_path / "m")
    assert back.generate(batch["pixel_values"], max_new_tokens=4) == model.generate(
        batch["pixel_values"], max_new_tokens=4
    )
