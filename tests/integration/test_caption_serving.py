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

from vlforge.config import DataConfig, ImageConfig
from vlforge.tracking.registry import load_by_alias, log_and_register

pytestmark = pytest.mark.integration

SPEC = {"model": "frozen_debug", "method": "frozen"}
IMG_SIZE = 32


def _png(color, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(im).ellipse([4, 6, size - 6, size - 4], fill=color)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _captioner(out):
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(3)
    return save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, out)


def test_caption_model_by_alias(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.models.io import load_model_dir

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    uri = mlflow_server.uri
    data = DataConfig(image=ImageConfig(size=IMG_SIZE, augment=False))
    name = f"captioner-{uuid.uuid4().hex[:8]}"
    model_dir = _captioner(tmp_path / "frozen")

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
    images = [_png((200, 40, 40)), _png((30, 60, 220), size=32)]
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
