"""Swapped-phrase hard negatives: the caption edit, the decoded batch fields and the ``itm_swap`` objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import overfit, png

pytestmark = pytest.mark.unit

RELATIONS = ["left of", "right of", "above", "below"]


def test_swap_replaces_one_whole_phrase_by_another_of_the_group():
    from vlforge.data.negatives import swap_phrase

    text = "a cat left of a dog, a bee above the dog on a red background"
    seen = set()
    for seed in range(40):
        out = swap_phrase(text, RELATIONS, np.random.default_rng(seed))
        before, after = text.split(), out.split()
        assert out != text and sorted(set(before) ^ set(after)) != []
        # the objects and everything outside the swapped phrase are kept
        assert out.startswith("a cat ") and out.endswith(" on a red background") and "a dog" in out
        seen.add(out)
    assert len(seen) >= 4  # either phrase, any other relation
    assert swap_phrase(text, RELATIONS, np.random.default_rng(3)) == swap_phrase(
        text, RELATIONS, np.random.default_rng(3)
    )
    assert swap_phrase("Left of the tree", RELATIONS, np.random.default_rng(0)).split()[-2:] == ["the", "tree"]
    assert swap_phrase("a leftover aboveground pool", RELATIONS, np.random.default_rng(0)) is None  # whole words only
    assert swap_phrase("a cat left of a dog", ["left of"], np.random.default_rng(0)) is None


def _raw(texts):
    n = len(texts)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "url": np.array(["u"] * n, dtype=object),
        "index": np.arange(n),
        "image": np.array([png((20 * i, 40, 200), 16) for i in range(n)], dtype=object),
        "image_2": np.array([None] * n, dtype=object),
        "text": np.array([t.encode() for t in texts], dtype=object),
        "json": np.array([None] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }


def test_decoded_batch_carries_a_swapped_caption_per_row_and_flags_rows_without_one():
    import dataclasses

    from vlforge.config import ImageConfig, TokenizerConfig
    from vlforge.data.pipeline import decode_batch, tokenize

    texts = [
        "a cat left of a dog",
        "a bee below a car",
        "just a cat",
        "one two three four five six seven eight nine ten eleven twelve above x",
    ]
    image = dataclasses.replace(ImageConfig(size=16), augment=True, max_shift=0.2)
    tok = TokenizerConfig(max_length=12)
    plain = decode_batch(_raw(texts), image=image, tokenizer=tok, seed=5)
    out = decode_batch(_raw(texts), image=image, tokenizer=tok, seed=5, swap=tuple(RELATIONS))
    assert "neg_input_ids" not in plain
    assert np.array_equal(out["pixel_values"], plain["pixel_values"])  # the swap draws after augmentation
    assert np.array_equal(out["input_ids"], plain["input_ids"])
    assert out["neg_valid"].tolist() == [1, 1, 0, 0]  # the last swap lies past max_length: no negative
    assert out["neg_input_ids"].shape == out["input_ids"].shape == out["neg_attention_mask"].shape
    assert np.array_equal(out["neg_input_ids"][2], out["input_ids"][2])
    for i in (0, 1):
        assert not np.array_equal(out["neg_input_ids"][i], out["input_ids"][i])
    bee = tokenize(["a bee above a car", "a bee left of a car", "a bee right of a car"], tok)["input_ids"]
    assert any(np.array_equal(out["neg_input_ids"][1], row) for row in bee)


def _swap_batch(b=4, size=32, t=16):
    from vlforge.config import TokenizerConfig
    from vlforge.data.negatives import swap_phrase
    from vlforge.data.tokenizer import load_tokenizer

    g = torch.Generator().manual_seed(0)
    tok = load_tokenizer(TokenizerConfig(max_length=t))
    texts = ["a cat left of a dog", "a bee above a car", "a red ball below a box", "a cup"][:b]
    rng = np.random.default_rng(0)
    negs = [swap_phrase(x, RELATIONS, rng) for x in texts]
    pos, neg = tok(texts), tok([n or x for n, x in zip(negs, texts)])
    return {
        "pixel_values": torch.randn(b, 3, size, size, generator=g),
        "input_ids": torch.as_tensor(pos["input_ids"]),
        "attention_mask": torch.as_tensor(pos["attention_mask"]),
        "neg_input_ids": torch.as_tensor(neg["input_ids"]),
        "neg_attention_mask": torch.as_tensor(neg["attention_mask"]),
        "neg_valid": torch.tensor([n is not None for n in negs], dtype=torch.long),
    }


def test_itm_swap_learns_one_batch_and_needs_swapped_captions():
    from vlforge.models import create_model
    from vlforge.tasks.vlmo import VLMoPretrainTask

    torch.manual_seed(0)
    task = VLMoPretrainTask(create_model("vlmo_debug"), {"itm_swap": 1.0}, gather=False)
    batch = _swap_batch()
    assert batch["neg_valid"].tolist() == [1, 1, 1, 0]
    out = task(batch)
    assert set(out) == {"loss", "itm_swap"} and out["loss"].requires_grad
    first, last, steps = overfit(task, batch, max_steps=300)
    assert last < first / 5, (first, last, steps)
    none = {**batch, "neg_valid": torch.zeros(4, dtype=torch.long)}
    zero = task(none)
    assert zero["itm_swap"].item() == 0.0
    zero["loss"].backward()  # no twin in the batch: a zero loss that still backpropagates
    with pytest.raises(ValueError, match="data.swap_negatives"):
        task({k: v for k, v in batch.items() if not k.startswith("neg_")})


def test_config_refuses_itm_swap_without_swap_negatives_and_a_one_phrase_group():
    from vlforge.config import ConfigError, DataConfig, TrainRunConfig, from_dict
    from vlforge.tasks import check_stages

    raw = {
        "model": "vlmo_debug",
        "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
        "stages": [{"name": "rel", "objectives": {"itc": 1.0, "itm_swap": 1.0}, "steps": 4}],
    }
    with pytest.raises(ConfigError, match="stage rel: objective itm_swap .* data.swap_negatives"):
        check_stages(from_dict(TrainRunConfig, raw))
    raw["data"]["swap_negatives"] = RELATIONS
    check_stages(from_dict(TrainRunConfig, raw))
    with pytest.raises(ValueError, match="at least two different phrases"):
        DataConfig(swap_negatives=["above", "Above "])


def test_config_refuses_image_truth_outside_nlvr2():
    from vlforge.config import ConfigError, TrainRunConfig, from_dict
    from vlforge.tasks import check_stages

    raw = {
        "model": "vlmo_debug",
        "method": "fusion",
        "num_answers": 5,
        "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
        "stages": [{"name": "ft", "task": "vqa", "objectives": {"hard": 1.0, "image_truth": 1.0}, "steps": 4}],
    }
    with pytest.raises(ConfigError, match="stage ft: objective image_truth is for task nlvr2"):
        check_stages(from_dict(TrainRunConfig, raw))
    raw["stages"][0]["task"] = "nlvr2"
    check_stages(from_dict(TrainRunConfig, raw))
