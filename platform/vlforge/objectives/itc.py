"""Image-text contrastive loss (symmetric InfoNCE) with a global batch.

CLIP (Radford et al. 2021, arXiv 2103.00020) and VLMo (Bao et al. 2022,
arXiv 2111.02358) score every image of the batch against every text and use
the matching pair as the target class in both directions. When
``torch.distributed`` is initialised the features of all ranks are gathered,
so every local row is contrasted against the global batch; the gather is
differentiable and sends each rank the gradient for its own slice.

Per-rank loss convention: each rank averages over its own rows only. With
equal local batch sizes, the mean of the per-rank losses (which is what data
parallel gradient averaging optimises) equals the single-process loss over
the concatenated batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to each rank's slice."""
    _, world = world_info()
    if world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def gather_nograd(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, without autograd (inputs, ids)."""
    _, world = world_info()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_logits(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, gather: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Scaled similarities of local rows against the (global) batch.

    Args:
        image_emb: [B, E] L2-normalised image embeddings of this rank.
        text_emb: [B, E] L2-normalised text embeddings of this rank (row i matches image i).
        logit_scale: scalar multiplier (already exponentiated and clamped).
        gather: contrast against all ranks when torch.distributed is initialised.

    Returns:
        logits_i2t [B, N], logits_t2i [B, N], labels [B] (column of each row's positive),
        where N = B * world size; all ranks must pass the same B.
    """
    rank, world = world_info() if gather else (0, 1)
    if world > 1:
        all_image = gather_with_grad(image_emb)  # [N, E]
        all_text = gather_with_grad(text_emb)  # [N, E]
    else:
        all_image, all_text = image_emb, text_emb
    logits_i2t = logit_scale * image_emb @ all_text.t()  # [B, N]
    logits_t2i = logit_scale * text_emb @ all_image.t()  # [B, N]
    b = image_emb.shape[0]
    labels = torch.arange(b, device=image_emb.device) + rank * b  # [B]
    return logits_i2t, logits_t2i, labels


def itc_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, gather: bool = True) -> Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy."""
    return itc_loss_from_logits(*contrastive_logits(image_emb, text_emb, logit_scale, gather))


def itc_loss_from_logits(logits_i2t: Tensor, logits_t2i: Tensor, labels: Tensor) -> Tensor:
    """Symmetric InfoNCE from the outputs of :func:`contrastive_logits`."""
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
