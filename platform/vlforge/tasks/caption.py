"""Captioning as a training task: a captioning model (Frozen, VC-GPT) on the data pipeline's batches.

The data pipeline gives BERT WordPiece ids; ``CaptionTask`` decodes them back to text with the
pipeline's tokenizer (lower-cased, as the BERT uncased vocabulary is) and re-tokenises with the
LM's own tokenizer (the model's ``tokenize``).
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.config import DataConfig
from vlforge.data.tokenizer import load_tokenizer

__all__ = ["CaptionTask"]


class CaptionTask(nn.Module):
    """A captioning model (Frozen, VC-GPT) trained on pipeline batches: BERT ids -> caption text -> the
    LM's tokens -> the model's ``forward(batch)`` loss."""

    OBJECTIVES = ("caption",)  # next-token cross-entropy (VC-GPT's on its self-ensembled logits)

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
