"""Batched inference every evaluation module (and the embedding job) runs: the VLMo inside a pair model,
eval mode, batching, and batched embeddings of any model with ``embed_image`` / ``embed_text``
(``vlforge.models.interface``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vlforge.models.interface import VLModel
from vlforge.models.vlmo import VLMo


def encoder_of(model: nn.Module) -> VLMo:
    """The VLMo of a ``FusionTeacher`` / ``DualEncoderStudent`` (``.encoder``), or ``model`` itself."""
    enc = getattr(model, "encoder", model)
    if not isinstance(enc, VLMo):
        raise TypeError(f"expected a VLMo or a model with a VLMo .encoder, got {type(model).__name__}")
    return enc


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock timings include them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def chunks(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def image_tokens(enc: VLMo, pixel_values: Tensor, batch_size: int) -> Tensor:
    """Pixels through the encoder's locked image tokenizer once ([N, C, h, w] features, which every
    VLMo path accepts in place of pixels), so that scoring many pairs per image does not run the
    frozen CNN again for each pair. Without a tokenizer the pixels come back unchanged."""
    tok = enc.image_embed.tokenizer
    if tok is None:
        return pixel_values
    dev = device_of(enc)
    return torch.cat([tok.features(pixel_values[s].to(dev)) for s in chunks(len(pixel_values), batch_size)])


def image_embeddings(model: VLModel, pixel_values: Tensor, batch_size: int) -> Tensor:
    """``model.embed_image`` (normalised; a VLMo's ITC embeddings) of every image, [Ni, E] on the model's
    device, ``batch_size`` at a time (caller's mode and grad)."""
    dev = device_of(model)
    parts = [model.embed_image(pixel_values[s].to(dev)) for s in chunks(len(pixel_values), batch_size)]
    return torch.cat(parts)  # [Ni, E]


def text_embeddings(model: VLModel, input_ids: Tensor, attention_mask: Tensor, batch_size: int) -> Tensor:
    """``model.embed_text`` (normalised; a VLMo's ITC embeddings) of every text, [Nt, E] on the model's
    device, ``batch_size`` at a time (caller's mode and grad)."""
    dev = device_of(model)
    parts = [
        model.embed_text(input_ids[s].to(dev), attention_mask[s].to(dev)) for s in chunks(len(input_ids), batch_size)
    ]
    return torch.cat(parts)  # [Nt, E]


def itm_probs(
    enc: VLMo,
    pixel_values: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    image_idx: Tensor,
    text_idx: Tensor,
    batch_size: int,
) -> Tensor:
    """Fusion ITM match probability (softmax class 1) of the pairs (image_idx[p], text_idx[p]): [P]."""
    dev = device_of(enc)
    out = []
    for s in chunks(len(image_idx), batch_size):
        i, t = image_idx[s], text_idx[s]
        fused = enc.forward_fusion(pixel_values[i].to(dev), input_ids[t].to(dev), attention_mask[t].to(dev))
        out.append(enc.itm_logits(fused).softmax(dim=-1)[:, 1])  # [b]
    if not out:
        return torch.empty(0, device=dev)
    return torch.cat(out)  # [P]
