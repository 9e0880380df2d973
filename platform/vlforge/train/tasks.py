"""Task factory: a method name + model + stage objectives -> a module with ``forward(batch) -> {"loss", ...}``.

    task = build_task(cfg, stage)          # TrainTask(module, model, prefix)
    task.module(batch)["loss"]

``task.model`` is the single-device model whose parameter names the stage's
``trainable`` globs match and whose ``state_dict`` is exported; ``task.prefix``
is where it sits inside ``task.module`` (``"model."`` for VLMo's task wrapper).

Methods:

* ``vlmo``: ``VLMoPretrainTask`` with the stage's objective weights.
* ``frozen``: the Frozen model (objective ``caption``). The data pipeline gives BERT
  WordPiece ids; ``FrozenCaptionTask`` decodes them back to text with the pipeline's
  tokenizer (lower-cased, as the BERT uncased vocabulary is) and re-tokenises with the
  LM's own tokenizer (``Frozen.tokenize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlforge.config import DataConfig, StageConfig, TrainRunConfig


@dataclass
class TrainTask:
    module: nn.Module
    model: nn.Module
    prefix: str


class FrozenCaptionTask(nn.Module):
    """Frozen trained on pipeline batches: BERT ids -> caption text -> the LM's tokens."""

    def __init__(self, model: nn.Module, data: DataConfig, weight: float = 1.0):
        super().__init__()
        from vlforge.data.tokenizer import load_tokenizer

        self.model = model
        self.weight = weight
        self._text_tokenizer = load_tokenizer(data.tokenizer)

    def captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        return [self._text_tokenizer.decode(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = batch["pixel_values"].device
        tokens = self.model.tokenize(self.captions(batch["input_ids"], batch["attention_mask"]))
        out = self.model({"pixel_values": batch["pixel_values"],
                          **{k: v.to(device) for k, v in tokens.items()}})
        return {**out, "loss": self.weight * out["loss"]}


def create(cfg: TrainRunConfig) -> nn.Module:
    from vlforge.models import create_model

    return create_model(cfg.model, **cfg.model_overrides)


def build_task(cfg: TrainRunConfig, stage: StageConfig, model: nn.Module | None = None,
               gather: bool = True) -> TrainTask:
    """The stage's task around ``model`` (a fresh one from the registry when None)."""
    model = model if model is not None else create(cfg)
    if cfg.method == "vlmo":
        from vlforge.models.vlmo import VLMoPretrainTask

        return TrainTask(VLMoPretrainTask(model, dict(stage.objectives), gather=gather), model, "model.")
    if cfg.method == "frozen":
        data = stage.data or cfg.data
        return TrainTask(FrozenCaptionTask(model, data, stage.objectives.get("caption", 1.0)), model, "model.")
    raise ValueError(f"unknown method {cfg.method!r}")


def model_sizes(cfg: TrainRunConfig) -> dict[str, Any]:
    """``{"img_size", "max_text_len" (or None), "param_names"}`` of the configured model, built on
    the meta device (no memory, no weights), for validation before any Ray resource is taken."""
    from vlforge.models import create_model

    if cfg.method == "frozen":
        model = _frozen_skeleton(cfg)
    else:
        with torch.device("meta"):
            model = create_model(cfg.model, **cfg.model_overrides)
    names = [n for n, _ in model.named_parameters()]
    if cfg.method == "vlmo":
        return {"img_size": model.config.img_size, "max_text_len": model.config.max_text_len, "param_names": names}
    return {"img_size": model.config.vision.img_size, "max_text_len": None, "param_names": names}


def _frozen_skeleton(cfg: TrainRunConfig) -> nn.Module:
    """The configured Frozen model on the meta device with its LM swapped for the tiny random one
    (loading pretrained weights under meta is refused): vision and prefix names and sizes are
    exact, ``lm.*`` names are only representative."""
    from vlforge.models import create_model
    from vlforge.models.lm import LMConfig

    with torch.device("meta"):
        return create_model(cfg.model, **{**cfg.model_overrides, "lm": LMConfig()})
