"""Task factory: a method name + model + stage objectives -> a module with ``forward(batch) -> {"loss", ...}``.

    task = build_task(cfg, stage)          # TrainTask(module, model, prefix)
    task.module(batch)["loss"]

``task.model`` is the single-device model whose parameter names the stage's
``trainable`` globs match and whose ``state_dict`` is exported; ``task.prefix``
is where it sits inside ``task.module`` (``"model."`` for VLMo's task wrapper).

Each method's task class declares its objective names (``OBJECTIVES``);
``OBJECTIVES_BY_METHOD`` is built from those declarations and ``check_stages(cfg)``
refuses a stage objective its method does not know (``vlforge.train.runner.validate``
and the sweep's planning call it, before any Ray resource is taken).

Methods:

* ``vlmo``: ``VLMoPretrainTask`` with the stage's objective weights.
* ``fusion``: a ``FusionTeacher`` fine-tuned on the stage's ``task`` (``vqa`` / ``nlvr2``) with
  cross-entropy (objective ``hard``; for nlvr2 also ``image_truth``, the per-image truth).
* ``distill``: a ``DualEncoderStudent`` taught by the frozen teacher in ``stage.teacher`` (a model
  directory: a pretrained VLMo for ``itm``, a fine-tuned fusion model for ``vqa`` / ``nlvr2``) with
  the stage's loss weights (``soft``, ``attn``, ``hard``, ``itc``; for nlvr2 also the per-image
  ``soft_image`` and ``image_truth``; ``DistillationTask``).
* ``frozen`` and ``vcgpt``: a captioning model, Frozen or VC-GPT (objective ``caption``). The data
  pipeline gives BERT WordPiece ids; ``CaptionTask`` decodes them back to text with the
  pipeline's tokenizer (lower-cased, as the BERT uncased vocabulary is) and re-tokenises with
  the LM's own tokenizer (the model's ``tokenize``).
* ``vlkd``: VLKD's BART student taught by the frozen dual encoder its model config names
  (``model_overrides.teacher``: a model directory), with the stage's weights on the three losses
  (``ttd``, ``itc``, ``icti``; ``VLKDTask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlforge.config import ConfigError, StageConfig, TrainRunConfig
from vlforge.data.storage import local_path
from vlforge.models import create_model
from vlforge.models.io import PAIR_METHODS, build_from_spec, load_model_dir
from vlforge.models.lm import LMConfig
from vlforge.tasks.caption import CaptionTask
from vlforge.tasks.distill import DistillationTask, FusionFinetuneTask, as_teacher
from vlforge.tasks.vlkd import VLKDTask
from vlforge.tasks.vlmo import VLMoPretrainTask


@dataclass
class TrainTask:
    module: nn.Module
    model: nn.Module
    prefix: str


CAPTION_METHODS = ("frozen", "vcgpt")

# method -> the task module ``build_task`` wraps its model in; each declares its objective names (``OBJECTIVES``)
TASK_BY_METHOD: dict[str, type[nn.Module]] = {
    "vlmo": VLMoPretrainTask,
    **{m: CaptionTask for m in CAPTION_METHODS},
    "vlkd": VLKDTask,
    "fusion": FusionFinetuneTask,
    "distill": DistillationTask,
}
OBJECTIVES_BY_METHOD: dict[str, tuple[str, ...]] = {m: task.OBJECTIVES for m, task in TASK_BY_METHOD.items()}


def check_stages(cfg: TrainRunConfig) -> None:
    """``ConfigError`` (a ``ValueError``) for a stage objective that the method's task does not declare;
    no model is built (run where a training config is validated, before Ray is touched)."""
    if cfg.method not in OBJECTIVES_BY_METHOD:
        raise ConfigError(f"unknown method {cfg.method!r}; known: {list(OBJECTIVES_BY_METHOD)}")
    known = OBJECTIVES_BY_METHOD[cfg.method]
    for s in cfg.stages:
        unknown = sorted(set(s.objectives) - set(known))
        if unknown:
            raise ConfigError(
                f"stage {s.name}: unknown objectives {unknown} for method {cfg.method!r}; known: {list(known)}"
            )
        if s.objectives.get("itm_swap") and not (s.data or cfg.data).swap_negatives:
            raise ConfigError(
                f"stage {s.name}: objective itm_swap matches against swapped captions; "
                "set the stage's data.swap_negatives (e.g. [left of, right of, above, below])"
            )
        for per_image in ("image_truth", "soft_image"):
            if per_image in s.objectives and s.task != "nlvr2":
                raise ConfigError(f"stage {s.name}: objective {per_image} is for task nlvr2, not {s.task!r}")


def task_prefix(method: str) -> str:
    """Where the trained model sits inside the task module (its checkpoint keys start with it)."""
    return "student." if method == "distill" else "model."


def model_spec(cfg: TrainRunConfig) -> dict[str, Any]:
    """The ``model.json`` spec of the run's model (``vlforge.models.io``)."""
    spec: dict[str, Any] = {"model": cfg.model, "overrides": dict(cfg.model_overrides), "method": cfg.method}
    if cfg.method in PAIR_METHODS:
        spec["num_answers"] = cfg.num_answers
    return spec


def create(cfg: TrainRunConfig) -> nn.Module:
    return build_from_spec(model_spec(cfg))


def load_teacher(path: str) -> nn.Module:
    """The frozen teacher of a distill stage from its model directory (local path or URI)."""
    return as_teacher(load_model_dir(local_path(path)))


def build_task(
    cfg: TrainRunConfig, stage: StageConfig, model: nn.Module | None = None, gather: bool = True
) -> TrainTask:
    """The stage's task around ``model`` (a fresh one from the registry when None)."""
    model = model if model is not None else create(cfg)
    prefix = task_prefix(cfg.method)
    if cfg.method == "vlmo":
        return TrainTask(VLMoPretrainTask(model, dict(stage.objectives), gather=gather), model, prefix)
    if cfg.method in CAPTION_METHODS:
        data = stage.data or cfg.data
        return TrainTask(CaptionTask(model, data, stage.objectives.get("caption", 1.0)), model, prefix)
    if cfg.method == "vlkd":
        return TrainTask(VLKDTask(model, stage.data or cfg.data, dict(stage.objectives)), model, prefix)
    if cfg.method == "fusion":
        return TrainTask(FusionFinetuneTask(model, stage.task, dict(stage.objectives) or None), model, prefix)
    if cfg.method == "distill":
        teacher = load_teacher(stage.teacher) if stage.teacher else None
        task = DistillationTask(model, teacher, stage.task, dict(stage.objectives), stage.temperature, gather=gather)
        return TrainTask(task, model, prefix)
    raise ValueError(f"unknown method {cfg.method!r}")


def model_sizes(cfg: TrainRunConfig) -> dict[str, Any]:
    """``{"img_size", "max_text_len" (or None), "param_names"}`` of the configured model, built on
    the meta device (no memory, no weights), for validation before any Ray resource is taken."""
    if cfg.method in CAPTION_METHODS:
        model = _caption_skeleton(cfg)
    elif cfg.method == "vlkd":
        model = create(cfg)  # on the CPU: its teacher loads from a model directory (small, for validation only)
        names = [n for n, _ in model.named_parameters()]
        img_size = getattr(model.teacher, "img_size", None) or model.config.teacher_vision.img_size
        return {"img_size": int(img_size), "max_text_len": None, "param_names": names}
    else:
        with torch.device("meta"):
            model = create(cfg)
    names = [n for n, _ in model.named_parameters()]
    if cfg.method in PAIR_METHODS:
        model = model.encoder
    if cfg.method == "vlmo" or cfg.method in PAIR_METHODS:
        return {"img_size": model.config.img_size, "max_text_len": model.config.max_text_len, "param_names": names}
    return {"img_size": model.config.vision.img_size, "max_text_len": None, "param_names": names}


def _caption_skeleton(cfg: TrainRunConfig) -> nn.Module:
    """The configured captioning model on the meta device with its LM swapped for the tiny random one
    (loading pretrained weights under meta is refused): vision and prefix names and sizes are
    exact, ``lm.*`` names are only representative (VC-GPT's fusion layers take the tiny LM's width,
    with one head, so that any head count of the real LM's width builds; the names do not change)."""
    swap: dict[str, Any] = {"lm": LMConfig()}
    if cfg.method == "vcgpt":
        swap["fusion_heads"] = 1
    with torch.device("meta"):
        return create_model(cfg.model, **{**cfg.model_overrides, **swap})
