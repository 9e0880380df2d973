"""Model directories: the on-disk form of a trained model, shared by export, evaluation and serving.

    save_model_dir(model.state_dict(), {"model": "vlmo_small", "method": "distill",
                   "overrides": {"vl_layers": 0}, "num_answers": 276}, "out/student")
    model = load_model_dir("out/student")        # eval mode, weights loaded strictly

A directory holds ``model.safetensors`` (fp32, model-level names, no shared
tensors; never a pickle) and ``model.json``, the spec that rebuilds the module:
``model`` (a registered size), ``overrides`` (config fields), ``method`` and,
for the distillation pair models, ``num_answers`` (the VQA head's size).

Methods: ``vlmo``, ``frozen``, ``vlkd``, ``vcgpt`` build ``create_model(model, **overrides)``;
``fusion`` wraps that VLMo in :class:`~vlforge.models.distill.FusionTeacher`, ``distill`` in
:class:`~vlforge.models.distill.DualEncoderStudent`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlforge.models import create_model
from vlforge.models.distill import DualEncoderStudent, FusionTeacher

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.safetensors"
PAIR_METHODS = ("fusion", "distill")


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised module for ``spec`` (use ``torch.device("meta")`` for names and shapes only)."""
    if "model" not in spec:
        raise ValueError(f"model spec needs 'model': {spec}")
    encoder = create_model(spec["model"], **spec.get("overrides", {}))
    method = spec.get("method", "vlmo")
    if method not in PAIR_METHODS:
        return encoder
    cls = FusionTeacher if method == "fusion" else DualEncoderStudent
    return cls(encoder, num_answers=int(spec.get("num_answers", 0)))


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a model directory (no {SPEC_FILE})")
    return json.loads(path.read_text())


def save_model_dir(
    state_dict: dict[str, torch.Tensor],
    spec: dict[str, Any],
    out_dir: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` (made fp32, contiguous, unshared) and ``spec`` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in state_dict.items()
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
    tmp.replace(out / WEIGHTS_FILE)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=1, sort_keys=True))
    return out


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / WEIGHTS_FILE))


def resolve_spec(spec: dict[str, Any], directory: str | os.PathLike) -> dict[str, Any]:
    """``spec`` with a relative ``overrides.teacher`` (VLKD's teacher model directory, as a serving
    directory ships it beside the student) made a path under ``directory``."""
    teacher = spec.get("overrides", {}).get("teacher")
    if isinstance(teacher, str) and teacher != "random" and not os.path.isabs(teacher):
        inside = Path(directory) / teacher
        if (inside / SPEC_FILE).is_file():
            return {**spec, "overrides": {**spec["overrides"], "teacher": str(inside)}}
    return spec


def input_image_size(model: nn.Module) -> int:
    """The image size a model takes: its vision tower's, its encoder's, or (VLKD) its teacher's."""
    for owner in (model, getattr(model, "encoder", None), getattr(model, "teacher", None)):
        if owner is None:
            continue
        vision = getattr(owner, "vision", None)
        if vision is not None and hasattr(vision, "img_size"):
            return int(vision.img_size)
        for size in (getattr(owner, "img_size", None), getattr(getattr(owner, "config", None), "img_size", None)):
            if size is not None:
                return int(size)
    raise ValueError(f"{type(model).__name__}: cannot tell its input image size")


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The module of a model directory, weights loaded strictly, in eval mode."""
    model = build_from_spec(resolve_spec(read_spec(directory), directory))
    model.load_state_dict(load_weights(directory), strict=True)
    return model.to(device).eval()
