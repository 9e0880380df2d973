"""Hard-negative captions made by swapping one phrase of a caption for another of its group.

A caption such as "a cat left of a dog" and its swap "a cat above a dog" name the same
objects, so only a model that looks at where they are can tell them apart. Matching
against such negatives (``itm_swap`` in ``vlforge.tasks.vlmo``) is what teaches the fusion
path relations; negatives drawn from other captions (``itm``) differ mostly in the objects.
Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"
(arXiv 2210.01936), train NegCLIP against negatives made by reordering a caption's words; this
module substitutes listed phrases instead. The replacement is drawn from the whole list, so with
real captions a swap can still be true of the image ("left of" -> "above").

``swap_phrase("a cat left of a dog", ["left of", "right of", "above", "below"], rng)``
returns the caption with one listed phrase (whole words, any case) replaced by another
listed phrase, or ``None`` when the caption holds none. Hand-written: a few lines of ``re``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["swap_phrase"]


@lru_cache(maxsize=32)
def _group(phrases: tuple[str, ...]) -> tuple[tuple[str, ...], re.Pattern[str]]:
    """The distinct phrases (stripped, lower case) and one pattern that finds any of them; built once
    per group, not per caption."""
    options = tuple(dict.fromkeys(p.strip().lower() for p in phrases if p.strip()))
    longest_first = sorted(options, key=len, reverse=True)  # "right of" before a bare "right"
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in longest_first) + r")\b", re.IGNORECASE)
    return options, pattern


def swap_phrase(text: str, phrases: Sequence[str], rng: np.random.Generator) -> str | None:
    """``text`` with one occurrence of a phrase of ``phrases`` replaced by a different one, both
    drawn from ``rng``; ``None`` when no phrase occurs (or fewer than two phrases are given)."""
    options, pattern = _group(tuple(phrases))
    if len(options) < 2:
        return None
    hits = list(pattern.finditer(text))
    if not hits:
        return None
    hit = hits[int(rng.integers(len(hits)))]
    found = hit.group(0).lower()
    others = [p for p in options if p != found]
    return text[: hit.start()] + others[int(rng.integers(len(others)))] + text[hit.end() :]
