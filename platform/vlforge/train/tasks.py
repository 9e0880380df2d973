"""Task factory: a method name + model + stage objectives -> a module with ``forward(batch) -> {"loss", ...}``.

    task = build_task(cfg, stage)          # TrainTask(module, model, prefix)
    task.module(batch)["loss"]

``task.model`` is the single-device model whose parameter names the stage's
``trainable`` globs match and whose ``state_dict`` is exported; ``task.prefix``
is where it sits inside ``task.module`` (``"model."`` for VLMo's task wrapper).

Methods:

* ``vlmo``: ``VLMoPretrainTask`` with the stage's objective weights.
* ``fusion``: a ``FusionTeacher`` fine-tuned on the stage's ``task`` (``vqa`` / ``nlvr2``) with
  cross-entropy (objective ``hard``).
* ``distill``: a ``DualEncoderStudent`` taught by the frozen teacher in ``stage.teacher`` (a model
  directory: a pretrained VLMo for ``itm``, a fine-tuned fusion model for ``vqa`` / ``nlvr2``) with
  the stage's loss weights (``soft``, ``attn``, ``hard``, ``itc``; ``DistillationTask``).
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

from vlforge.config import DataConfig, StageConfig, TrainRunConfig
from vlforge.data.tokenizer import load_tokenizer
from vlforge.models import create_model
from vlforge.models.distill import DistillationTask, FusionFinetuneTask, as_teacher
from vlforge.models.io import PAIR_METHODS, build_from_spec, load_model_dir
from vlforge.models.lm import LMConfig
from vlforge.models.vlmo import VLMoPretrainTask
from vlforge.train.checkpoint import _local


@dataclass
class TrainTask:
    module: nn.Module
    model: nn.Module
    prefix: str


class CaptionTask(nn.Module):
    """A captioning model (Frozen, VC-GPT) trained on pipeline batches: BERT ids -> caption text -> the
    LM's tokens -> the model's ``forward(batch)`` loss."""

    def __init__(self, model: nn.Module, data: DataConfig, weight: float = 1.0):
        super().__init__()
        self.model = model
        self.weight = weight
        self._text_tokenizer = load_tokenizer(data.tokenizer)

    def captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        return [self._text_tokenizer.decode(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = batch["pixel_values"].device
        tokens = self.model.tokenize(self.captions(batch["input_ids"], batch["attention_mask"]))
        out = self.model({"pixel_values": batch["pixel_values"], **{k: v.to(device) for k, v in tokens.items()}})
        return {**out, "loss": self.weight * out["loss"]}


CAPTION_METHODS = ("frozen", "vcgpt")


class VLKDTask(CaptionTask):
    """VLKD trained on pipeline batches: the pipeline's WordPiece ids are the dual-encoder teacher's
    text input (``teacher_input_ids``); the captions, decoded, are re-tokenised for the BART student.
    The stage's objective weights (``ttd``, ``itc``, ``icti``) weigh the model's three losses."""

    def __init__(self, model: nn.Module, data: DataConfig, weights: dict[str, float]):
        super().__init__(model, data)
        for k in ("ttd", "itc", "icti"):  # the model sums its terms with these (0 for one the stage leaves out)
            setattr(model.config, f"w_{k}", float(weights.get(k, 0.0)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = batch["pixel_values"].device
        tokens = self.model.tokenize(self.captions(batch["input_ids"], batch["attention_mask"]))
        out = self.model(
            {
                "pixel_values": batch["pixel_values"],
                "teacher_input_ids": batch["input_ids"],
                "teacher_attention_mask": batch["attention_mask"],
                **{k: v.to(device) for k, v in tokens.items()},
            }
        )
        return out


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
    return as_teacher(load_model_dir(_local(path)))


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
        return TrainTask(FusionFinetuneTask(model, stage.task, stage.objectives.get("hard", 1.0)), model, prefix)
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
