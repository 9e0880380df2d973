"""Beam search for the captioning models (Frozen, VC-GPT, VLKD), written once for all three.

    rows = beam_search(step, batch_size=B, beams=3, eos_id=tok.eos_id, max_new_tokens=20, device=dev)
    # step(ids [B * beams, t]) -> next-token logits [B * beams, V]; row i * beams + k is beam k of item i

Written by hand: transformers' ``generate`` drives a plain LM or encoder-decoder, but VC-GPT's next
token comes from its own fusion layers and self-ensembled logits, so one model-agnostic search (a
``step`` closure per model) serves all three and ranks their beams the same way. Finished beams stay
in the beam, extended by EOS at no cost; hypotheses are ranked by their summed log-probability
divided by ``length ** length_penalty`` (length counting the EOS), as in Wu et al. 2016 without the
+5 offset. ``beams=1`` is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def beam_search(
    step: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    beams: int,
    eos_id: int,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """The best hypothesis per item (token ids, EOS and what follows cut off); see the module docstring."""
    if beams < 1 or max_new_tokens < 0:
        raise ValueError(f"beams >= 1 and max_new_tokens >= 0, got {beams} and {max_new_tokens}")
    b, k = batch_size, beams
    if max_new_tokens == 0:
        return [[] for _ in range(b)]
    ids = torch.zeros(b * k, 0, dtype=torch.long, device=device)  # [B*K, t]
    scores = torch.full((b, k), float("-inf"), device=device)  # [B, K]
    scores[:, 0] = 0.0  # one live beam per item until the first step fans out
    done = torch.zeros(b * k, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(step(ids).float(), dim=-1)  # [B*K, V]
        vocab = logp.shape[-1]
        ended = torch.full_like(logp, float("-inf"))
        ended[:, eos_id] = 0.0
        logp = torch.where(done[:, None], ended, logp)
        total = (scores.view(-1, 1) + logp).view(b, k * vocab)  # [B, K*V]
        scores, flat = total.topk(k, dim=-1)  # [B, K]
        origin = (flat // vocab + torch.arange(b, device=device)[:, None] * k).view(-1)  # [B*K]
        token = (flat % vocab).view(-1)  # [B*K]
        ids = torch.cat([ids[origin], token[:, None]], dim=1)
        done = done[origin] | (token == eos_id)
        if bool(done.all()):
            break
    is_eos = ids == eos_id  # [B*K, t]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(done, ids.shape[1], dtype=torch.long))
    length = (first + is_eos.any(1).long()).clamp(min=1).float().view(b, k)  # tokens up to and with EOS
    best = (scores / length**length_penalty).argmax(-1)  # [B]
    rows = ids.view(b, k, -1)[torch.arange(b, device=device), best]  # [B, t]
    cut = first.view(b, k)[torch.arange(b, device=device), best].tolist()
    return [r[:n] for r, n in zip(rows.tolist(), cut)]


__all__ = ["beam_search"]
