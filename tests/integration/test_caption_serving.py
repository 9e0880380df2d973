"""A generative captioning model (frozen_debug) registered against a real ``mlflow server`` and
served by alias: the pyfunc captions an image as the module's own ``generate`` does with the
same preprocessing, and refuses the dual-encoder modes naming the model's kind."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import debug_model_dir, png
from vlforge.config import DataConfig, ImageConfig
from vlforge.serving.registry import load_by_alias, log_and_register

pytestmark = pytest.mark.integration

SPEC = {"model": "frozen_debug", "method": "frozen"}
IMG_SIZE = 32


def test_caption_model_by_alias(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.models.io import load_model_dir

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    uri = mlflow_server.uri
    data = DataConfig(image=ImageConfig(size=IMG_SIZE, augment=False))
    name = f"captioner-{uuid.uuid4().hex[:8]}"
    model_dir = debug_model_dir(SPEC, tmp_path / "frozen", seed=3)

    version = log_and_register(
        model_dir,
        data,
        model_name=name,
        tags={"stage": "frozen"},
        alias="champion",
        tracking_uri=uri,
        experiment=f"it-caption-{uuid.uuid4().hex[:8]}",
    )
    mv = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, "champion")
    assert str(mv.version) == version.version == "1" and mv.status == "READY"

    served = load_by_alias(name, "champion", tracking_uri=uri)
    images = [png((200, 40, 40), size=48, shape="ellipse"), png((30, 60, 220), size=32, shape="ellipse")]
    out = served.predict(pd.DataFrame({"image": images}), params={"max_new_tokens": 6})
    assert list(out.columns) == ["caption"] and len(out) == 2

    module = load_model_dir(model_dir)
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, IMG_SIZE) for b in images]), data.image))
    expected = module.generate(pv, max_new_tokens=6)
    assert out["caption"].tolist() == expected
    assert all(isinstance(c, str) for c in expected) and any(expected)

    default = served.predict(pd.DataFrame({"image": images[:1]}))
    assert default["caption"].tolist() == module.generate(pv[:1], max_new_tokens=20)
    forced = served.predict(pd.DataFrame({"image": images[:1]}), params={"mode": "caption", "max_new_tokens": 6})
    assert forced["caption"].tolist() == expected[:1]

    with pytest.raises(ValueError, match=r"mode 'score' needs a dual-encoder model, but this is a caption model"):
        served.predict(pd.DataFrame({"image": images[:1]}), params={"mode": "score"})
    with pytest.raises(ValueError, match=r"mode 'embed_image' .* caption model"):
        served.predict(pd.DataFrame({"image": images[:1]}), params={"mode": "embed_image"})


CAPTIONS = ["a red square", "a blue circle", "two green dots", "a yellow star"]
COLOURS = [(220, 30, 30), (30, 60, 220), (30, 180, 60), (230, 210, 40)]


def _caption_set(out):
    """Four solid-colour images, each with its own short caption (what a byte-level debug model can learn)."""
    from PIL import Image

    from vlforge.data.shards import ShardWriter

    with ShardWriter(out, samples_per_shard=2, params={"kind": "captions"}) as w:
        for i, (text, colour) in enumerate(zip(CAPTIONS, COLOURS)):
            buf = io.BytesIO()
            Image.new("RGB", (IMG_SIZE, IMG_SIZE), colour).save(buf, format="PNG")
            w.write(f"{i:06d}", image=buf.getvalue(), image_ext="png", text=text)
    return str(out)


def _vcgpt_dir(out, shards: str, data, steps: int):
    """vcgpt_debug trained ``steps`` steps on the set's images as evaluation decodes them (0: as built)."""
    from vlforge.data.pipeline import sample_id
    from vlforge.evaluation.data import load_eval_set
    from vlforge.models.io import build_from_spec, save_model_dir

    spec = {"model": "vcgpt_debug", "method": "vcgpt"}
    torch.manual_seed(0)
    model = build_from_spec(spec)
    ev = load_eval_set(shards, data, kind="captions")
    by_id = {sample_id(f"{i:06d}"): c for i, c in enumerate(CAPTIONS)}
    batch = {"pixel_values": ev["pixel_values"], **model.tokenize([by_id[int(i)] for i in ev["sample_id"]])}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    return save_model_dir(model.state_dict(), spec, out)


def test_caption_models_are_promoted_on_cider(mlflow_server, tmp_path, monkeypatch):
    """vlforge promote gates a captioning model on its captions' CIDEr-D: a trained VC-GPT takes @champion
    from an untrained one, and the untrained one is then refused against it; rules naming a retrieval
    metric are an error for a captioning model."""
    from vlforge.config import PromoteConfig, from_dict
    from vlforge.serving.promotion import PROMOTED, REFUSED, PromotionError, promote

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    uri = mlflow_server.uri
    data = DataConfig(image=ImageConfig(size=IMG_SIZE, augment=False))
    shards = _caption_set(tmp_path / "captions" / "test")
    name = f"captioner-gate-{uuid.uuid4().hex[:8]}"
    untrained = _vcgpt_dir(tmp_path / "untrained", shards, data, steps=0)
    trained = _vcgpt_dir(tmp_path / "trained", shards, data, steps=60)

    def register(model_dir):
        return log_and_register(
            model_dir,
            data,
            model_name=name,
            tags={"stage": "vcgpt"},
            alias="challenger",
            tracking_uri=uri,
            experiment=f"it-caption-gate-{uuid.uuid4().hex[:8]}",
        )

    def gate(**raw):
        raw = {
            "model_name": name,
            "eval": {"shards": shards, "max_samples": 4, "batch_size": 4, "max_new_tokens": 20},
            "improve": {"cider": 10.0},
            "guard": {"bleu4": 0.0},
            "tracking": {"tracking_uri": uri},
            **raw,
        }
        return promote(from_dict(PromoteConfig, raw), log=lambda *_: None)

    register(untrained)
    first = gate()
    assert first.action == PROMOTED and first.challenger == "1"
    register(trained)
    with pytest.raises(PromotionError, match=r"rules name \['i2t_r1', 'rmean', 't2i_r1'\]"):
        gate(improve={"rmean": 0.5}, guard={"i2t_r1": 0.0, "t2i_r1": 0.0})
    better = gate()
    cider = {k: better.metrics[k]["cider"] for k in ("champion", "challenger")}
    print(f"CIDEr untrained {cider['champion']:.1f} -> trained {cider['challenger']:.1f}")
    assert better.action == PROMOTED and better.challenger == "2" and better.champion == "1"
    assert better.metrics["challenger"]["cider"] > better.metrics["champion"]["cider"] + 10.0
    register(untrained)
    worse = gate()
    assert worse.action == REFUSED and worse.champion == "2" and "cider" in worse.reason
