"""Validation during training: retrieval on a held-out captions set, called from a training loop.

    v = RetrievalValidator("data/corpus/scenes/val", data_cfg, max_samples=200)
    v(model)   # {"val_i2t_r1": ..., "val_t2i_r10": ..., "val_rmean": ...} (percent)

A sweep passes one to ``vlforge.train.runner.run_training(cfg, validator=v)``; rank 0 calls it
at every report with the current weights, and the figures travel with the report (to Ray Tune,
whose scheduler compares trials on them). The set is decoded once per process, on first use.
Any VLMo-based model works: a bare VLMo, a ``DualEncoderStudent`` or a ``FusionTeacher``
(scored with their ITC embeddings, as a dual encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vlforge.config import DataConfig


@dataclass
class RetrievalValidator:
    shards: str
    data: DataConfig
    max_samples: int = 200
    batch_size: int = 64
    prefix: str = "val_"
    _eval_set: dict[str, Tensor] | None = field(default=None, init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_eval_set": None}  # ship the recipe, not the tensors

    def eval_set(self) -> dict[str, Tensor]:
        if self._eval_set is None:
            from vlforge.evaluation.data import load_eval_set

            self._eval_set = load_eval_set(self.shards, self.data, task="captions", max_samples=self.max_samples)
        return self._eval_set

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from vlforge.evaluation.retrieval import evaluate_retrieval

        out = evaluate_retrieval(model, self.eval_set(), "student", batch_size=self.batch_size)
        return {f"{self.prefix}{k}": float(v) for k, v in out.items() if k not in ("n_images", "n_texts")}
