"""Serving directories and the pyfunc for caption models (frozen_debug, vcgpt_debug) without an
MLflow store: what ``prepare_serving_dir`` writes and refuses, the mode / param rules per model
kind, and captions from the pyfunc class itself against the module's ``generate``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import debug_model_dir, dual_encoder_dir, png
from vlforge.config import DataConfig, ImageConfig
from vlforge.models.lm import LMConfig
from vlforge.serving.directory import prepare_serving_dir, serving_kind, serving_preprocessing
from vlforge.serving.logged_model import model_signature, serving_requirements
from vlforge.serving.pyfunc_model import (
    CAPTION,
    DEFAULT_MAX_NEW_TOKENS,
    DUAL_ENCODER,
    VlforgePyfunc,
    max_new_tokens,
    preprocess_kind,
    resolve_mode,
)

pytestmark = pytest.mark.unit

DATA = DataConfig(image=ImageConfig(size=32, augment=False))


@pytest.fixture(scope="module")
def frozen_dir(tmp_path_factory):
    return debug_model_dir({"model": "frozen_debug", "method": "frozen"}, tmp_path_factory.mktemp("frozen") / "model")


def test_prepare_caption_serving_dir(frozen_dir, tmp_path):
    out = prepare_serving_dir(frozen_dir, DATA, tmp_path / "serving")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "preprocess.json"]
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre == {
        "kind": "caption",
        "method": "frozen",
        "lm": {"source": "random", "tokenizer": "bytes"},
        "image": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "background": [255, 255, 255]},
    }
    assert serving_kind(out) == CAPTION
    with pytest.raises(ValueError, match="holds a caption model"):
        serving_preprocessing(out)
    with pytest.raises(ValueError, match="image.size is 64 but model 'frozen_debug' takes 32px"):
        prepare_serving_dir(frozen_dir, DataConfig(image=ImageConfig(size=64)), tmp_path / "bad")


def test_prepare_rejects_lm_needing_network(tmp_path):
    from vlforge.serving.directory import _offline_lm

    assert _offline_lm(tmp_path, LMConfig(source="smollm2")) == {"source": "smollm2", "tokenizer": "smollm2"}
    with pytest.raises(ValueError, match="LM source 'pretrained'"):
        _offline_lm(tmp_path, LMConfig(source="pretrained", name_or_path="some/hub-model"))
    with pytest.raises(ValueError, match="LM tokenizer 'gpt2'"):
        _offline_lm(tmp_path, LMConfig(tokenizer="gpt2"))


def test_kinds_modes_and_params():
    assert preprocess_kind({}) == DUAL_ENCODER
    with pytest.raises(ValueError, match="model kind 'vqa'"):
        preprocess_kind({"kind": "vqa"})
    assert resolve_mode(["image"], None, CAPTION) == "caption"
    assert resolve_mode(["image", "text"], {"mode": "caption"}, CAPTION) == "caption"
    assert resolve_mode(["image", "text"], None) == "score"
    with pytest.raises(ValueError, match="mode 'caption' needs a caption model, but this is a dual_encoder model"):
        resolve_mode(["image"], {"mode": "caption"}, DUAL_ENCODER)
    with pytest.raises(ValueError, match="mode 'embed_text' needs a dual-encoder model, but this is a caption"):
        resolve_mode(["text"], {"mode": "embed_text"}, CAPTION)
    with pytest.raises(ValueError, match="caption model's input needs an 'image' column"):
        resolve_mode(["text"], None, CAPTION)
    assert max_new_tokens(None) == DEFAULT_MAX_NEW_TOKENS == 20
    assert max_new_tokens({"max_new_tokens": 7}) == max_new_tokens({"max_new_tokens": "7"}) == 7
    for bad in (0, -2, 2.5, "many"):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
            max_new_tokens({"max_new_tokens": bad})


def test_signatures_per_kind():
    caption = model_signature(CAPTION)
    assert caption.inputs.input_names() == ["image"] and caption.outputs.input_names() == ["caption"]
    assert {p.name: p.default for p in caption.params.params} == {"mode": "auto", "max_new_tokens": 20}
    dual = model_signature()
    assert dual.inputs.input_names() == ["image", "text"] and "caption" not in dual.outputs.input_names()
    assert [p.name for p in dual.params.params] == ["mode"]
    assert any(r.startswith("transformers==") for r in serving_requirements(CAPTION))
    assert not any(r.startswith("transformers==") for r in serving_requirements())


@pytest.mark.parametrize(
    "spec", [{"model": "vcgpt_debug", "method": "vcgpt"}, {"model": "frozen_debug", "method": "frozen"}]
)
def test_pyfunc_captions_like_generate(spec, tmp_path, monkeypatch):
    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.models.io import load_model_dir

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    model_dir = debug_model_dir(spec, tmp_path / "model")
    serving = prepare_serving_dir(model_dir, DATA, tmp_path / "serving")
    pyfunc = VlforgePyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(serving)}))
    images = [png((220, 30, 30), size=40), png((20, 200, 90), size=64)]
    out = pyfunc.predict(None, pd.DataFrame({"image": images}, index=[5, 9]), {"max_new_tokens": 5})
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, 32) for b in images]), DATA.image))
    assert list(out.index) == [5, 9]
    assert out["caption"].tolist() == load_model_dir(model_dir).generate(pv, max_new_tokens=5)
    with pytest.raises(ValueError, match="but this is a caption model"):
        pyfunc.predict(None, pd.DataFrame({"image": images}), {"mode": "embed_image"})


def test_vlkd_serving_dir_ships_its_teacher(tmp_path, monkeypatch):
    """A VLKD model is rebuilt from its teacher's model directory: the serving directory carries a copy, so
    it serves after the original teacher directory is gone."""
    import shutil

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.models.io import load_model_dir, read_spec

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    teacher = dual_encoder_dir(tmp_path / "t")
    model_dir = debug_model_dir(
        {"model": "vlkd_debug", "method": "vlkd", "overrides": {"teacher": str(teacher)}}, tmp_path / "model"
    )
    serving = prepare_serving_dir(model_dir, DATA, tmp_path / "serving")
    assert read_spec(serving)["overrides"]["teacher"] == "teacher"
    assert (serving / "teacher" / "model.safetensors").is_file()
    assert json.loads((serving / "preprocess.json").read_text())["lm"] == {
        "source": "vlkd-student",
        "tokenizer": "bytes",
    }
    images = [png((220, 30, 30), size=40), png((20, 200, 90), size=40)]
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, 32) for b in images]), DATA.image))
    expected = load_model_dir(model_dir).generate(pv, max_new_tokens=6)
    shutil.rmtree(teacher)
    with pytest.raises(FileNotFoundError, match="VLKD teacher"):
        load_model_dir(model_dir)
    pyfunc = VlforgePyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(serving)}))
    out = pyfunc.predict(None, pd.DataFrame({"image": images}), {"max_new_tokens": 6})
    assert out["caption"].tolist() == expected
