"""MLflow pyfunc for a distilled dual-encoder student, logged as "models from code".

``vlforge.tracking.registry.log_and_register`` passes this file's path as ``python_model``;
MLflow copies the file into the logged model (``code/pyfunc_model.py``) and runs it when the
model is loaded, so nothing is pickled. The serving directory made by
``vlforge.tracking.registry.prepare_serving_dir`` is the model's only artifact (``model``):
``model.safetensors`` + ``model.json`` (the student, rebuilt by ``vlforge.models.io``),
``tokenizer.json`` and ``preprocess.json``.

The ``vlforge`` package must be importable where the model is served (it is not on PyPI):
install it into the serving environment (for example ``pip install <wheel or checkout>``,
or the project's container image) next to the pinned requirements logged with the model.

Input: a ``pandas.DataFrame`` with an ``image`` column (bytes of an encoded PNG / JPEG /
WebP image; base64 text is accepted too, as JSON requests carry it) and / or a ``text``
column (str). Output, one row per input row (same index):

- only ``image``: ``image_embedding`` (list of floats, L2-normalised ITC embedding);
- only ``text``: ``text_embedding`` (list of floats, L2-normalised);
- both: ``score`` (cosine similarity of the normalised ITC embeddings, what retrieval ranks
  by) and ``match_prob`` (softmax probability of "match" from the student's ITM head).

The param ``mode`` (``"auto"`` by default; ``"embed_image"``, ``"embed_text"``, ``"score"``)
forces one of these whatever other columns are present. Rows are run in batches of
``BATCH_ROWS``. The device is ``VLFORGE_SERVING_DEVICE`` when set, else CUDA when available,
else the CPU.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

MODES = ("embed_image", "embed_text", "score")
AUTO = "auto"
BATCH_ROWS = 64
ARTIFACT_KEY = "model"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_FILE = "tokenizer.json"
DEVICE_ENV = "VLFORGE_SERVING_DEVICE"


def _device() -> str:
    import torch

    chosen = os.environ.get(DEVICE_ENV)
    if chosen:
        return chosen
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_image_bytes(value: Any, row: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"row {row!r}: 'image' is a str but not base64 of an encoded image ({exc})") from exc
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"row {row!r}: 'image' is missing")
    raise ValueError(f"row {row!r}: 'image' must be bytes of an encoded PNG/JPEG image, got {type(value).__name__}")


def _as_text(value: Any, row: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"row {row!r}: 'text' is missing")
    raise ValueError(f"row {row!r}: 'text' must be a str, got {type(value).__name__}")


def resolve_mode(columns: Any, params: dict[str, Any] | None) -> str:
    """The mode for an input with these columns and params; ValueError when it cannot run."""
    cols = [str(c) for c in columns]
    mode = (params or {}).get("mode") or AUTO
    if mode != AUTO and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {(AUTO, *MODES)}")
    has_image, has_text = "image" in cols, "text" in cols
    if mode == AUTO:
        if has_image and has_text:
            return "score"
        if has_image:
            return "embed_image"
        if has_text:
            return "embed_text"
        raise ValueError(
            "model input needs an 'image' column (bytes of an encoded PNG/JPEG image), a 'text' "
            f"column (str), or both; got columns {cols} (MLflow drops columns outside the signature)"
        )
    needed = {"embed_image": ["image"], "embed_text": ["text"], "score": ["image", "text"]}[mode]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"mode {mode!r} needs column(s) {needed}; missing {missing} (got columns {cols})")
    return mode


class DualEncoderPyfunc(mlflow.pyfunc.PythonModel):
    """Embeddings and image-text scores from a ``DualEncoderStudent`` serving directory."""

    def load_context(self, context) -> None:
        import torch

        from vlforge.config import ImageConfig, TokenizerConfig
        from vlforge.data.tokenizer import load_tokenizer
        from vlforge.models.distill import DualEncoderStudent
        from vlforge.models.io import load_model_dir

        directory = Path(context.artifacts[ARTIFACT_KEY])
        pre = json.loads((directory / PREPROCESS_FILE).read_text())
        img, tok = pre["image"], pre["tokenizer"]
        self.image_cfg = ImageConfig(size=int(img["size"]), mean=tuple(img["mean"]), std=tuple(img["std"]),
                                     augment=False, normalize=True)
        self.tokenizer = load_tokenizer(TokenizerConfig(name=str(directory / TOKENIZER_FILE),
                                                        max_length=int(tok["max_length"]),
                                                        lowercase=bool(tok.get("lowercase", True))))
        self.device = torch.device(_device())
        model = load_model_dir(directory, self.device)
        if not isinstance(model, DualEncoderStudent):
            raise TypeError(f"{directory}: expected a DualEncoderStudent (method 'distill'), got {type(model).__name__}")
        self.model = model

    # ------------------------------------------------------------------ preprocessing

    def pixel_values(self, images: list[bytes]):
        import numpy as np
        import torch

        from vlforge.data.pipeline import decode_image, normalise

        size = self.image_cfg.size
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_image(data, size))
            except Exception as exc:  # PIL raises several types for bad bytes
                raise ValueError(f"image {i} of the batch could not be decoded as PNG/JPEG/WebP ({exc})") from exc
        pv = normalise(np.stack(decoded), self.image_cfg)  # [B, 3, H, W] float32
        return torch.from_numpy(np.ascontiguousarray(pv)).to(self.device)

    def text_inputs(self, texts: list[str]):
        import torch

        enc = self.tokenizer(texts)
        return (torch.from_numpy(enc["input_ids"]).to(self.device),
                torch.from_numpy(enc["attention_mask"]).to(self.device))

    # ------------------------------------------------------------------ inference

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        mode = resolve_mode(model_input.columns, params)
        index = model_input.index
        images = ([_as_image_bytes(v, r) for r, v in zip(index, model_input["image"])]
                  if mode in ("embed_image", "score") else None)
        texts = ([_as_text(v, r) for r, v in zip(index, model_input["text"])]
                 if mode in ("embed_text", "score") else None)
        import torch
        import torch.nn.functional as F

        enc = self.model.encoder
        chunks: dict[str, list] = {}
        with torch.inference_mode():
            for start in range(0, len(index), BATCH_ROWS):
                stop = start + BATCH_ROWS
                if mode == "embed_image":
                    out = enc.encode_image(self.pixel_values(images[start:stop]))
                    chunks.setdefault("image_embedding", []).extend(enc.image_embedding(out).float().cpu().tolist())
                elif mode == "embed_text":
                    out = enc.encode_text(*self.text_inputs(texts[start:stop]))
                    chunks.setdefault("text_embedding", []).extend(enc.text_embedding(out).float().cpu().tolist())
                else:
                    img = enc.encode_image(self.pixel_values(images[start:stop]))
                    txt = enc.encode_text(*self.text_inputs(texts[start:stop]))
                    score = (enc.image_embedding(img) * enc.text_embedding(txt)).sum(-1)  # [B]
                    logits = self.model.classify("itm", img.hidden[:, 0], txt.hidden[:, 0])  # [B, 2]
                    prob = F.softmax(logits.float(), dim=-1)[:, 1]
                    chunks.setdefault("score", []).extend(score.float().cpu().tolist())
                    chunks.setdefault("match_prob", []).extend(prob.cpu().tolist())
        columns = {"embed_image": ["image_embedding"], "embed_text": ["text_embedding"],
                   "score": ["score", "match_prob"]}[mode]
        return pd.DataFrame({c: chunks.get(c, []) for c in columns}, index=index)


# Loaded by MLflow as code (module name ``code_model_<uuid>``): register the model object.
# Imported as ``vlforge.tracking.pyfunc_model`` (tests, the registry helpers) it has no side effect.
if __name__ != "vlforge.tracking.pyfunc_model":
    mlflow.models.set_model(DualEncoderPyfunc())
