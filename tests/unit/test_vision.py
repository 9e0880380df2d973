"""timm vision towers: every named size gives tokens [B, N, D] and pooled [B, D]."""

from __future__ import annotations

import pytest
import torch

from vlforge.models import create_model, list_models
from vlforge.models.lm import count_parameters
from vlforge.models.vision import VisionConfig, VisionTower, override, vision_config

pytestmark = pytest.mark.unit

EXPECTED = {
    "vision_debug": (32, 16 + 1, 32),
    "vision_small": (128, 64 + 1, 192),
    "vision_nf_resnet26": (128, 16, 2048),
    "vision_nf_resnet50": (224, 49, 2048),
    "vision_lite0": (128, 16, 384),
    "vision_lite0_debug": (64, 4, 32),
}


def test_timm_and_transformers_import_together():
    import timm
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sizes(name):
    img, n_tokens, dim = EXPECTED[name]
    torch.manual_seed(0)
    tower = create_model(name).eval()
    assert tower.img_size == img and tower.num_features == dim
    with torch.no_grad():
        out = tower(torch.randn(1, 3, img, img))
    assert out.tokens.shape == (1, n_tokens, dim)
    assert out.pooled.shape == (1, dim)
    print(f"{name}: {count_parameters(tower):,} parameters")


def test_all_sizes_registered():
    assert set(EXPECTED) <= set(list_models("vision_"))


def test_local_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_model("vision_debug").eval()
    state = dict(source.body.state_dict())
    state["head.weight"] = torch.zeros(10, 32)
    state["head.bias"] = torch.zeros(10)
    path = tmp_path / "tower.safetensors"
    save_file(state, str(path))
    torch.manual_seed(1)
    loaded = create_model("vision_debug", checkpoint=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x).pooled, loaded(x).pooled)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"not.a.weight": torch.zeros(1)}, str(path))
    with pytest.raises(RuntimeError, match="does not fit"):
        create_model("vision_debug", checkpoint=str(path))


def test_override_merges_nested_fields():
    cfg = override(vision_config("debug"), {"img_size": 64, "timm_kwargs": {"img_size": 64}})
    assert cfg.img_size == 64 and cfg.timm_kwargs == {"img_size": 64}
    with pytest.raises(TypeError, match="no field"):
        override(vision_config("debug"), {"nope": 1})
    assert vision_config("debug").img_size == 32


def test_cnn_tokens_are_the_flattened_feature_map():
    tower = VisionTower.from_config(VisionConfig("nf_resnet26", img_size=64)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = tower.body.forward_features(x)
        out = tower(x)
    assert torch.equal(out.tokens, fmap.flatten(2).transpose(1, 2))
    assert torch.allclose(out.pooled, fmap.mean((2, 3)), atol=1e-5)


def test_locked_tower_keeps_its_tokenizer_frozen_and_trains_its_head():
    """vision_lite0*: the pretrained EfficientNet-Lite0 never trains, whatever the globs say; the
    projection, position embedding and blocks above it do, and cached features give the pixels' output."""
    from vlforge.models.trainable import set_trainable
    from vlforge.models.vision import LockedVisionTower

    torch.manual_seed(0)
    tower = create_model("vision_lite0_debug")
    assert isinstance(tower, LockedVisionTower)
    set_trainable(tower, ["*"])
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("tokenizer.") for n in trainable)
    assert {"proj.weight", "pos_embed", "norm.weight"} <= trainable
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    opt = torch.optim.SGD([p for p in tower.parameters() if p.requires_grad], lr=0.1)
    tower.train()
    pixels = torch.randn(2, 3, 64, 64)
    tower(pixels).pooled.pow(2).sum().backward()
    opt.step()
    moved = {n for n, p in tower.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    tower.eval()
    assert not tower.tokenizer.training
    with torch.no_grad():
        grid = tower.tokenizer(pixels)  # [2, 1280, 2, 2]
        torch.testing.assert_close(tower(grid).tokens, tower(pixels).tokens)


def test_locked_tower_sees_where_things_are():
    """Its position embedding makes a cell's token depend on where the cell is: the same grid with two
    cells swapped gives other tokens at those positions (without it, they would swap with the cells)."""
    torch.manual_seed(0)
    tower = create_model("vision_lite0_debug", depth=0).eval()
    grid = torch.randn(1, 1280, 2, 2)
    swapped = grid.clone()
    swapped[..., 0, 0], swapped[..., 1, 1] = grid[..., 1, 1], grid[..., 0, 0]
    with torch.no_grad():
        a, b = tower(grid).tokens, tower(swapped).tokens  # [1, 4, 32]
    assert not torch.allclose(a[:, 0], b[:, 3], atol=1e-4)
