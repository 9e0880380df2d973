"""Beam search (vlforge.models.decoding) on hand-made next-token tables, and through each captioning model."""

from __future__ import annotations

import math

import pytest
import torch

from vlforge.models import create_model
from vlforge.models.decoding import beam_search

pytestmark = pytest.mark.unit

EOS = 0


def table_step(table: dict[tuple[int, ...], dict[int, float]], vocab: int = 4):
    """A step function from a table prefix -> {token: probability}; unlisted prefixes end at once."""

    def step(ids: torch.Tensor) -> torch.Tensor:
        out = torch.full((ids.shape[0], vocab), -1e9)
        for i, row in enumerate(ids.tolist()):
            for tok, p in table.get(tuple(row), {EOS: 1.0}).items():
                out[i, tok] = math.log(p)
        return out

    return step


# Greedy takes 1 (0.6), then can only go on with probability 0.3 per step; 2 (0.4) ends at once with 0.9.
TRAP = {(): {1: 0.6, 2: 0.4}, (1,): {3: 0.3, EOS: 0.3, 1: 0.4}, (2,): {EOS: 0.9, 3: 0.1}, (1, 1): {EOS: 0.6, 3: 0.4}}


def test_beam_finds_the_sequence_greedy_misses():
    greedy = beam_search(table_step(TRAP), batch_size=1, beams=1, eos_id=EOS, max_new_tokens=5)
    beam = beam_search(table_step(TRAP), batch_size=1, beams=3, eos_id=EOS, max_new_tokens=5)
    assert greedy == [[1, 1]]  # 0.6 * 0.4 * 0.6 = 0.144 over 3 tokens with EOS: 0.52 per token
    assert beam == [[2]]  # 0.4 * 0.9 = 0.36 over 2 tokens: 0.6 per token


def test_length_penalty_zero_ranks_by_total_probability():
    table = {(): {1: 0.5, 2: 0.5}, (1,): {EOS: 1.0}, (2,): {3: 1.0}, (2, 3): {EOS: 1.0}}
    rows = beam_search(table_step(table), batch_size=1, beams=2, eos_id=EOS, max_new_tokens=4, length_penalty=0.0)
    assert rows[0] in ([1], [2, 3])  # a tie in total probability
    long_first = {(): {1: 0.4, 2: 0.6}, (1,): {EOS: 1.0}, (2,): {3: 1.0}, (2, 3): {EOS: 1.0}}
    assert beam_search(table_step(long_first), batch_size=1, beams=2, eos_id=EOS, max_new_tokens=4) == [[2, 3]]


def test_items_are_searched_independently_and_budget_is_kept():
    g = torch.Generator().manual_seed(0)
    bigram = torch.log_softmax(torch.randn(6, 6, generator=g) * 3, dim=-1)  # next-token table on the last token

    def step(ids):
        last = ids[:, -1] if ids.shape[1] else torch.full((ids.shape[0],), 5)
        return bigram[last]

    both = beam_search(step, batch_size=2, beams=3, eos_id=EOS, max_new_tokens=7)
    alone = beam_search(step, batch_size=1, beams=3, eos_id=EOS, max_new_tokens=7)
    assert both[0] == alone[0] == both[1] and all(len(r) <= 7 and EOS not in r for r in both)
    assert beam_search(step, batch_size=2, beams=3, eos_id=EOS, max_new_tokens=0) == [[], []]
    with pytest.raises(ValueError, match="beams"):
        beam_search(step, batch_size=1, beams=0, eos_id=EOS, max_new_tokens=3)


def _greedy_vcgpt(model, pixels, steps):
    visual = model.visual_tokens(pixels)
    ids = torch.full((pixels.shape[0], 1), model.tokenizer.bos_id)
    for _ in range(steps):
        gpt, fuse = model.branch_logits(visual, ids, torch.ones_like(ids))
        ids = torch.cat([ids, (gpt + fuse)[:, -1].argmax(-1, keepdim=True)], 1)
    eos = model.tokenizer.eos_id
    return [model.tokenizer.decode(r[: r.index(eos)] if eos in r else r) for r in ids[:, 1:].tolist()]


@pytest.mark.parametrize("name", ["frozen_debug", "vcgpt_debug", "vlkd_debug"])
def test_every_captioning_model_decodes_greedy_and_beam(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    size = model.vision.img_size if hasattr(model, "vision") else 32  # vlkd_debug: its toy teacher takes 32 px
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        greedy = model.generate(pixels, max_new_tokens=6)
        beam = model.generate(pixels, max_new_tokens=6, beams=3)
        if name == "vcgpt_debug":
            assert greedy == _greedy_vcgpt(model, pixels, 6)
    assert len(greedy) == len(beam) == 3 and all(isinstance(c, str) for c in greedy + beam)
