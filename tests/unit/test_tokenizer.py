import pytest

from vlforge.config import TokenizerConfig
from vlforge.data.tokenizer import load_tokenizer, minilm_dir

pytestmark = pytest.mark.unit


def test_default_is_offline_bert_wordpiece():
    tok = load_tokenizer(TokenizerConfig(max_length=12))
    out = tok(["A Taxi left of a llama", ""])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, 0] == 101 and 102 in ids[0] and ids[1, :2].tolist() == [101, 102]
    assert mask[1].sum() == 2 and (ids[1][mask[1] == 0] == 0).all()
    assert tok.decode(ids[0]) == "a taxi left of a llama"
    assert tok.vocab_size == 30522 and tok.special.mask == 103


def test_truncates_to_max_length():
    tok = load_tokenizer(TokenizerConfig(max_length=6))
    out = tok(["one two three four five six seven eight"])
    assert out["input_ids"].shape == (1, 6) and out["input_ids"][0, -1] == 102 and out["attention_mask"].all()


@pytest.mark.parametrize("which", ["tokenizer.json", "vocab.txt", "dir"])
def test_by_path_matches_default(which, tmp_path):
    path = minilm_dir() if which == "dir" else minilm_dir() / which
    a = load_tokenizer(TokenizerConfig(name=str(path), max_length=16))(["a llama above a taxi"])
    b = load_tokenizer(TokenizerConfig(max_length=16))(["a llama above a taxi"])
    assert (a["input_ids"] == b["input_ids"]).all()


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(TokenizerConfig(name=str(tmp_path / "nope.json")))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(TokenizerConfig(name=str(tmp_path)))
