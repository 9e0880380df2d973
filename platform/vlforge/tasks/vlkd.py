"""VLKD as a training task: the VLKD model (``vlforge.models.vlkd``: a BART student and its frozen
dual-encoder teacher) on the data pipeline's batches, with the stage's weights on its three losses."""

from __future__ import annotations

import torch
from torch import nn

from vlforge.config import DataConfig
from vlforge.tasks.caption import CaptionTask

__all__ = ["VLKDTask"]


class VLKDTask(CaptionTask):
    """VLKD trained on pipeline batches: the pipeline's WordPiece ids are the dual-encoder teacher's
    text input (``teacher_input_ids``); the captions, decoded, are re-tokenised for the BART student.
    The stage's objective weights (``ttd``, ``itc``, ``icti``) weigh the model's three losses."""

    OBJECTIVES = ("ttd", "itc", "icti")  # text-text distance, image-text contrastive, image-conditioned infilling

    def __init__(self, model: nn.Module, data: DataConfig, weights: dict[str, float]):
        super().__init__(model, data)
        for k in self.OBJECTIVES:  # the model sums its terms with these (0 for one the stage leaves out)
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
