"""Frozen (visual prefix + frozen LM) and the captioning loss."""

from __future__ import annotations

import pytest
import torch

from vlforge.models import create_model
from vlforge.models.frozen import Frozen, FrozenConfig, few_shot_prompt
from vlforge.models.lm import count_parameters, load_smollm2
from vlforge.models.vision import vision_config
from vlforge.objectives.captioning import IGNORE_INDEX, caption_labels, caption_loss

pytestmark = pytest.mark.unit

CAPTIONS = ["a red square", "a blue circle", "two green dots", "a yellow star"]


def debug_batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.vision.img_size
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), **model.tokenize(CAPTIONS[:n])}


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return create_model("frozen_debug")


def test_caption_labels_ignore_prefix_and_padding():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = caption_labels(ids, mask, prefix_len=2)
    assert labels.tolist() == [[-100, -100, 5, 6, 7], [-100, -100, 8, 9, -100]]


def test_caption_loss_depends_only_on_scored_positions():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = caption_labels(ids, mask, prefix_len=3)  # [2, 7]
    logits = torch.randn(2, 7, 11)
    base = caption_loss(logits, labels)
    changed = logits.clone()
    changed[:, :2] = torch.randn(2, 2, 11) * 10  # prefix positions that predict prefix positions
    changed[1, 4:] = torch.randn(3, 11) * 10  # positions whose targets are padding (and the last one)
    changed[0, 6] = torch.randn(11) * 10  # the last position predicts nothing
    assert torch.allclose(caption_loss(changed, labels), base)
    other_pad = caption_labels(ids.masked_fill(mask == 0, 3), mask, prefix_len=3)
    assert torch.equal(other_pad, labels)
    manual = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, 2:6], logits[1, 2:4]]), torch.cat([ids[0], ids[1, :2]])
    )
    assert torch.allclose(base, manual)
    assert (labels[:, :3] == IGNORE_INDEX).all()


def test_debug_shapes_and_terms(debug_model):
    batch = debug_batch(debug_model)
    t = batch["input_ids"].shape[1]
    logits = debug_model.compute_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (4, 2 + t, debug_model.tokenizer.vocab_size)
    out = debug_model(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert not out["caption_loss"].requires_grad
    assert int(out["num_tokens"]) == int(batch["attention_mask"].sum())
    assert debug_model.image_prefix(batch["pixel_values"]).shape == (4, 2, debug_model.lm.config.hidden_size)


def test_padding_tokens_do_not_change_loss(debug_model):
    batch = debug_batch(debug_model)
    assert (batch["attention_mask"] == 0).any()
    base = debug_model(batch)["loss"]
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 42))
    assert torch.allclose(debug_model(other)["loss"], base, atol=1e-6)


def test_lm_is_frozen_and_untouched_by_training():
    torch.manual_seed(0)
    model = create_model("frozen_debug")
    batch = debug_batch(model)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    trainable_before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    assert trainable_before and all(k.startswith(("vision.", "prefix.")) for k in trainable_before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.lm.training
    for _ in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        assert all(p.grad is None for p in model.lm.parameters())
        assert model.prefix.proj.weight.grad is not None and model.prefix.proj.weight.grad.abs().sum() > 0
        opt.step()
    for k, v in model.lm.state_dict().items():
        assert torch.equal(v, lm_before[k]), k
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, trainable_before[k])]
    assert any(k.startswith("vision.") for k in changed) and any(k.startswith("prefix.") for k in changed)


def pretrain_lm_on_captions(model, steps=150):
    """A stand-in for LM pretraining: teach the tiny LM the caption texts (without images)."""
    lm = model.lm
    for p in lm.parameters():
        p.requires_grad_(True)
    ids = model.tokenize(CAPTIONS)
    bos = torch.full((len(CAPTIONS), 1), model.tokenizer.bos_id)
    input_ids = torch.cat([bos, ids["input_ids"]], 1)
    mask = torch.cat([torch.ones_like(bos), ids["attention_mask"]], 1)
    labels = caption_labels(input_ids, mask)
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    lm.train()
    for _ in range(steps):
        opt.zero_grad()
        caption_loss(lm(input_ids=input_ids, attention_mask=mask).logits, labels).backward()
        opt.step()
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()


def test_overfits_one_batch_with_frozen_lm():
    torch.manual_seed(0)
    model = create_model("frozen_debug")
    pretrain_lm_on_captions(model)
    batch = debug_batch(model)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(120):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"frozen_debug overfit: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] / 5
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    model.eval()
    assert model.generate(batch["pixel_values"][:2], max_new_tokens=20) == CAPTIONS[:2]
    # Beam search ranks by log-probability per token, so a longer training caption may win over greedy's.
    assert set(model.generate(batch["pixel_values"][:2], max_new_tokens=20, beams=3)) <= set(CAPTIONS)


def test_random_frozen_lm_learns_nothing():
    """DESIGN.md: the LM must be pretrained; the prefix alone cannot steer a random frozen LM."""
    torch.manual_seed(0)
    model = create_model("frozen_debug")
    batch = debug_batch(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] > 0.8 * losses[0]


def test_cached_greedy_matches_full_recompute(debug_model):
    debug_model.eval()
    pixels = debug_batch(debug_model, n=2)["pixel_values"]
    embeds = debug_model.image_prefix(pixels)
    cached = debug_model.greedy_from_embeds(embeds, max_new_tokens=6)
    with torch.no_grad():
        seq = embeds
        for step in range(6):
            nxt = debug_model.lm(inputs_embeds=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, debug_model.lm.get_input_embeddings()(nxt)[:, None]], 1)
            for row, tok in zip(cached, nxt.tolist()):
                if step < len(row):
                    assert row[step] == tok


def test_few_shot_prompt_interleaves_images_and_text(debug_model):
    debug_model.eval()
    imgs = debug_batch(debug_model, n=3)["pixel_values"]
    prompt = few_shot_prompt([(imgs[0], "a cat"), (imgs[1], "a dog")], imgs[2], "a")
    assert [type(x) for x in prompt] == [torch.Tensor, str] * 3
    embeds = debug_model.embed_prompt(prompt)
    n = debug_model.config.n_prefix
    assert embeds.shape == (1, 3 * n + (len("a cat") + 1) + (len("a dog") + 1) + 1, debug_model.lm.config.hidden_size)
    assert torch.allclose(embeds[0, :n], debug_model.image_prefix(imgs[:1])[0])
    text = debug_model.generate_from_prompt(prompt, max_new_tokens=5)
    assert isinstance(text, str)


@pytest.fixture(scope="module")
def smollm2(smollm2_loads):
    return load_smollm2()  # from the cache smollm2_loads filled


@pytest.mark.parametrize("size", ["small", "nf_resnet50"])
def test_real_sizes_with_smollm2(smollm2, size):
    lm, tok = smollm2
    config = FrozenConfig(vision=vision_config(size))
    model = Frozen(config, lm=lm, tokenizer=tok).eval()
    assert count_parameters(model, trainable_only=True) == count_parameters(model.vision) + count_parameters(
        model.prefix
    )
    s = model.vision.img_size
    batch = {"pixel_values": torch.randn(1, 3, s, s), **model.tokenize(["a photo of a cat"])}
    with torch.no_grad():
        out = model(batch)
        logits = model.compute_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (1, 2 + batch["input_ids"].shape[1], lm.config.vocab_size)
    assert torch.isfinite(out["loss"])
    assert isinstance(model.generate(batch["pixel_values"], max_new_tokens=3)[0], str)


def test_registered_sizes():
    from vlforge.models import list_models

    assert {"frozen_debug", "frozen_small", "frozen_lite0", "frozen_base"} <= set(list_models("frozen"))


def test_overrides_reach_nested_configs():
    model = create_model("frozen_debug", n_prefix=3, lm={"num_layers": 1, "hidden_size": 32})
    assert model.config.n_prefix == 3 and model.lm.config.num_hidden_layers == 1
    batch = debug_batch(model, n=2)
    assert model.image_prefix(batch["pixel_values"]).shape == (2, 3, 32)
    with pytest.raises(TypeError, match="no field"):
        create_model("frozen_debug", n_prefixes=3)
