"""Promotion between registry aliases (``vlforge promote``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlforge.config.data import StorageConfig
from vlforge.config.tracking import TrackingConfig

# ---- promotion between registry aliases (vlforge promote)

RETRIEVAL_PROMOTION_METRICS = ("rmean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
CAPTION_PROMOTION_METRICS = ("cider", "bleu4", "rouge_l", "meteor", "objects_named")
VQA_PROMOTION_METRICS = ("vqa_acc",)
PROMOTION_METRICS = RETRIEVAL_PROMOTION_METRICS + CAPTION_PROMOTION_METRICS + VQA_PROMOTION_METRICS


@dataclass
class PromotionEvalConfig:
    """The fixed evaluation set both models are scored on (percent), each model with the preprocessing it
    was registered with: the first ``max_samples`` samples of ``shards``. What is measured follows from the
    model's kind and the set's task: a dual encoder on a captions set gets image-text retrieval
    (``rmean``, ``i2t_r1``, ...); a captioning model on a captions set its captions' ``cider``,
    ``bleu4``, ``rouge_l`` (``meteor`` with Java) and ``objects_named``; a Frozen model on a VQA set
    its open-ended few-shot ``vqa_acc``."""

    shards: str = "data/corpus/scenes/test"
    max_samples: int = 300
    batch_size: int = 64
    max_new_tokens: int = 20  # captioning models: tokens generated per caption (greedy)
    shots: int = 0  # few-shot VQA: solved examples before each question
    pool: str | None = None  # few-shot VQA: the shard set shots come from (None: the sibling train split)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if self.max_samples < 2 or self.batch_size < 1:
            raise ValueError("eval: max_samples >= 2, batch_size >= 1")
        if self.max_new_tokens < 1 or self.shots < 0:
            raise ValueError("eval: max_new_tokens >= 1, shots >= 0")


@dataclass
class PromoteConfig:
    """``vlforge promote``: re-evaluate the ``challenger`` (an alias or a version number) and the
    current ``champion`` of ``model_name`` on ``eval``; promote when every ``improve`` metric gains
    at least its margin (percentage points) and no ``guard`` metric drops by more than its
    tolerance. With no champion yet the challenger becomes champion. The metrics must be ones the
    evaluation produces for the model's kind (see ``PromotionEvalConfig``); a captioning model is
    gated with, e.g., ``improve: {cider: 1.0}`` and ``guard: {bleu4: 0.5}``."""

    model_name: str = "vlforge-dual-encoder"
    challenger: str = "challenger"
    champion_alias: str = "champion"
    eval: PromotionEvalConfig = field(default_factory=PromotionEvalConfig)
    improve: dict[str, float] = field(default_factory=lambda: {"rmean": 0.5})
    guard: dict[str, float] = field(default_factory=lambda: {"i2t_r1": 0.0, "t2i_r1": 0.0})
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lock_timeout_s: float = 120.0  # wait this long for another promotion of the model to finish
    stale_lock_s: float = 1800.0  # a lock older than this is from a crashed promotion and is broken

    def __post_init__(self):
        if not self.improve:
            raise ValueError("improve: name at least one metric and its margin")
        for group in ("improve", "guard"):
            values = getattr(self, group)
            bad = sorted(set(values) - set(PROMOTION_METRICS))
            if bad:
                raise ValueError(f"{group}: unknown metrics {bad}; known: {list(PROMOTION_METRICS)}")
            if any(v < 0 for v in values.values()):
                raise ValueError(f"{group}: margins and tolerances are >= 0 (percentage points)")
        if self.champion_alias == self.challenger:
            raise ValueError("challenger and champion_alias must differ")
        if self.lock_timeout_s < 0 or self.stale_lock_s <= 0:
            raise ValueError("lock_timeout_s >= 0 and stale_lock_s > 0")
