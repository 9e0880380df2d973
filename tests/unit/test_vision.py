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
