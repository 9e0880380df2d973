"""Select trainable parameters by glob patterns over parameter names.

A training stage names what it trains, e.g. VLMo stage 2::

    set_trainable(model, ["text_embed.*", "blocks.*.experts.l.*", "norm.l.*", "heads.mlm.*"])

Patterns are ``fnmatch`` globs matched case-sensitively against the full names
from ``model.named_parameters()`` (``*`` also crosses dots). Everything else
gets ``requires_grad=False``, and so do the parameters of a module marked ``locked = True``
(a locked pretrained image tokenizer) whatever the patterns say; build the optimizer from :func:`param_groups` so
frozen parameters never reach it (AdamW's decoupled weight decay would
otherwise still move them whenever they carry a gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

NO_DECAY_PATTERNS = ("*.bias", "*norm*", "*.cls_token", "*.mask_token", "*.pos", "*.type_embed", "*.logit_scale")


def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Make exactly the parameters matching ``patterns`` trainable; return their names.

    Raises ValueError when ``patterns`` is empty or a pattern matches no parameter
    (a typo would otherwise silently freeze what it meant to train).
    """
    if isinstance(patterns, str) or not patterns:
        raise ValueError("patterns must be a non-empty list of globs")
    locked = {id(p) for m in model.modules() if getattr(m, "locked", False) for p in m.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in locked]
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n, _ in named)]
    if unmatched:
        raise ValueError(f"trainable patterns match no parameter: {unmatched}")
    trainable = []
    for name, param in named:
        on = any(fnmatchcase(name, p) for p in patterns)
        param.requires_grad_(on)
        if on:
            trainable.append(name)
    return trainable


def param_groups(model: nn.Module, weight_decay: float, no_decay: Sequence[str] = NO_DECAY_PATTERNS) -> list[dict]:
    """Trainable parameters only, split into decayed and non-decayed optimizer groups."""
    decay, skip = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (skip if any(fnmatchcase(name, p) for p in no_decay) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": skip, "weight_decay": 0.0},
    ]
