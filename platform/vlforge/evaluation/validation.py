"""Validation during training, called from a training loop: retrieval or captioning on a held-out
captions set.

    v = RetrievalValidator("data/corpus/scenes/val", data_cfg, max_samples=200)
    v(model)   # {"val_i2t_r1": ..., "val_t2i_r10": ..., "val_rmean": ...} (percent)
    c = CaptionValidator("data/corpus/scenes/val", data_cfg, max_samples=100, max_new_tokens=32)
    c(model)   # {"val_cider": ..., "val_bleu4": ..., "val_rouge_l": ..., "val_objects_named": ...} (percent)

A sweep passes one to ``vlforge.train.runner.run_training(cfg, validator=v)``; rank 0 calls it
at every report with the current weights, and the figures travel with the report (to Ray Tune,
whose scheduler compares trials on them). Both pickle as their recipe (shards, data settings,
sizes), without what they cached.

``RetrievalValidator``: any VLMo-based model (a bare VLMo, a ``DualEncoderStudent`` or a
``FusionTeacher``), scored with its ITC embeddings as a dual encoder. The set is decoded once per
process, on first use.

``CaptionValidator``: a generative model with ``generate(pixel_values, max_new_tokens)`` (Frozen,
VC-GPT, VLKD), its greedy captions of the set's images scored against the set's captions by
``evaluation.generation.score_captioner`` with the plain tokenizer (no Java subprocess inside a
training worker, so no METEOR): CIDEr-D, BLEU-4, ROUGE-L, and the share of captions naming exactly
the scene's objects (``val_objects_named``, where the samples list their objects, as the built-in
corpus's do). ``data.image.size`` must be the model's input size (VLKD: its teacher's). The set is
read at every call (a few hundred samples are quick); that it is a captions set is checked once
per process, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vlforge.config import DataConfig
from vlforge.data.pipeline import detect_kind
from vlforge.evaluation.data import load_eval_set
from vlforge.evaluation.generation import score_captioner
from vlforge.evaluation.retrieval import evaluate_retrieval


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
            self._eval_set = load_eval_set(self.shards, self.data, kind="captions", max_samples=self.max_samples)
        return self._eval_set

    def __call__(self, model: nn.Module) -> dict[str, float]:
        out = evaluate_retrieval(model, self.eval_set(), "student", batch_size=self.batch_size)
        return {f"{self.prefix}{k}": float(v) for k, v in out.items() if k not in ("n_images", "n_texts")}


@dataclass
class CaptionValidator:
    shards: str
    data: DataConfig
    max_samples: int = 100
    batch_size: int = 32
    max_new_tokens: int = 20
    prefix: str = "val_"
    _checked: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.max_samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"CaptionValidator: max_samples, batch_size and max_new_tokens must be >= 1, got "
                f"{self.max_samples}, {self.batch_size}, {self.max_new_tokens}"
            )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_checked": False}  # each process checks the set itself

    def check(self) -> None:
        """Refuse a shard set that holds no captions (VQA, NLVR2), naming it."""
        if self._checked:
            return
        kind = detect_kind(self.shards, self.data.storage)
        if kind != "captions":
            raise ValueError(f"CaptionValidator: {self.shards} is a {kind} shard set; captioning needs captions")
        self._checked = True

    def __call__(self, model: nn.Module) -> dict[str, float]:
        self.check()
        out = score_captioner(
            model,
            self.shards,
            self.data,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            java=False,
        )
        names = ("cider", "bleu4", "rouge_l", "objects_named")
        return {f"{self.prefix}{k}": float(out[k]) for k in names if k in out}
