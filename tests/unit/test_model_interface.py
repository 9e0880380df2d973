"""Every registered model size and both pair models keep the contract of ``vlforge.models.interface``.

``*_debug`` sizes are built and each declared capability is run on a tiny batch; the larger sizes are
checked through the class their factory declares (``model_class``), without building weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlforge.models import create_model, list_models, model_class
from vlforge.models.interface import CAPABILITIES, EMBED_IMAGE, EMBED_TEXT, GENERATE, VLModel, require, supports
from vlforge.models.io import build_from_spec, input_image_size

NAMES = list_models()
DEBUG = [n for n in NAMES if n.endswith("_debug")]
LARGER = [n for n in NAMES if not n.endswith("_debug")]
B = 2


def _text_batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(model, "tokenize"):
        enc = model.tokenize(["a red square", "two blue circles"])
        return enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (B, 6), generator=g)  # [B, T]
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


def _check_declared(model: VLModel) -> None:
    """Run every capability the instance declares; the others must raise NotImplementedError."""
    assert model.capabilities <= CAPABILITIES
    size = input_image_size(model)
    pv = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]
    model.eval()
    with torch.no_grad():
        dims = {}
        if EMBED_IMAGE in model.capabilities:
            img = model.embed_image(pv)
            assert img.ndim == 2 and img.shape[0] == B and img.dtype == torch.float32
            torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
            dims[EMBED_IMAGE] = img.shape[1]
        else:
            with pytest.raises(NotImplementedError, match=EMBED_IMAGE):
                model.embed_image(pv)
        ids, mask = _text_batch(model)
        if EMBED_TEXT in model.capabilities:
            txt = model.embed_text(ids, mask)
            assert txt.ndim == 2 and txt.shape[0] == B and txt.dtype == torch.float32
            torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))
            dims[EMBED_TEXT] = txt.shape[1]
        else:
            with pytest.raises(NotImplementedError, match=EMBED_TEXT):
                model.embed_text(ids, mask)
        if len(dims) == 2:
            assert dims[EMBED_IMAGE] == dims[EMBED_TEXT], "both embeddings must share one space"
    if GENERATE in model.capabilities:
        for beams in (1, 2):
            captions = model.generate(pv, max_new_tokens=3, beams=beams)
            assert isinstance(captions, list) and len(captions) == B
            assert all(isinstance(c, str) for c in captions)
        assert not model.training
    else:
        with pytest.raises(NotImplementedError, match=GENERATE):
            model.generate(pv, max_new_tokens=3)


def test_every_family_has_a_debug_size():
    assert DEBUG and LARGER
    debug_classes = {model_class(n) for n in DEBUG}
    for name in LARGER:
        assert model_class(name) in debug_classes, f"{name}: no *_debug size builds {model_class(name).__name__}"


@pytest.mark.parametrize("name", NAMES)
def test_registered_size_declares_the_interface(name):
    cls = model_class(name)
    assert issubclass(cls, VLModel), f"{name} builds {cls.__name__}, which is not a VLModel"
    assert isinstance(cls.capabilities, frozenset) and cls.capabilities <= CAPABILITIES
    for capability in cls.capabilities:
        assert getattr(cls, capability) is not getattr(VLModel, capability), f"{cls.__name__} declares {capability}"
    if name in DEBUG:
        model = create_model(name)
        assert type(model) is cls
        _check_declared(model)


@pytest.mark.parametrize("method", ["fusion", "distill"])
def test_pair_models_embed_as_their_encoder(method):
    torch.manual_seed(0)
    model = build_from_spec({"model": "vlmo_debug", "method": method, "num_answers": 3})
    assert model.capabilities == {EMBED_IMAGE, EMBED_TEXT}
    _check_declared(model)
    enc = model.encoder
    pv = torch.randn(B, 3, 32, 32)
    ids, mask = _text_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_image(pv), enc.image_embedding(enc.encode_image(pv)), rtol=0, atol=0)
        torch.testing.assert_close(
            model.embed_text(ids, mask), enc.text_embedding(enc.encode_text(ids, mask)), rtol=0, atol=0
        )


def test_vlkd_embeddings_are_what_its_itc_compares():
    model = create_model("vlkd_debug").eval()
    pv = torch.randn(B, 3, 32, 32)
    ids, mask = _text_batch(model)
    with torch.no_grad():
        image, _ = model.teacher_embeddings({"pixel_values": pv, "input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(model.embed_image(pv), F.normalize(image, dim=-1))
        torch.testing.assert_close(model.embed_text(ids, mask), F.normalize(model.encode_text(ids, mask), dim=-1))


def test_vlkd_with_a_callable_teacher_declares_text_only():
    model = create_model("vlkd_debug", teacher=lambda batch: (torch.zeros(B, 32), torch.zeros(B, 32)))
    assert model.capabilities == {EMBED_TEXT}
    assert type(model).capabilities == {EMBED_IMAGE, EMBED_TEXT, GENERATE}
    with pytest.raises(NotImplementedError, match="VLKD does not declare 'embed_image'"):
        model.embed_image(torch.randn(B, 3, 32, 32))
    with pytest.raises(TypeError, match="encode_image"):
        model.generate(torch.randn(B, 3, 32, 32))


def test_supports_and_require():
    vlmo = create_model("vlmo_debug")
    assert supports(vlmo, EMBED_IMAGE, EMBED_TEXT) and not supports(vlmo, GENERATE)
    assert not supports(torch.nn.Linear(2, 2), EMBED_IMAGE)
    assert require(vlmo, EMBED_IMAGE) is vlmo
    with pytest.raises(TypeError, match="VLMo needs generate"):
        require(vlmo, GENERATE)
    with pytest.raises(ValueError, match="unknown capabilities"):
        supports(vlmo, "embed")
