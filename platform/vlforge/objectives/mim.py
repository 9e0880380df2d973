"""Masked image modelling by normalised pixel regression.

VLMo stage 1 (Bao et al. 2022, arXiv 2111.02358) trains the attention and
vision experts with BEiT's MIM (Bao et al. 2021, arXiv 2106.08254), whose
targets are visual tokens of a pretrained DALL-E dVAE. No dVAE ships offline,
and training one is a project of its own, so vlforge regresses the pixels of
masked patches instead: SimMIM (Xie et al. 2022, arXiv 2111.09886) showed that
a linear head regressing raw pixels of masked patches learns representations
as good as BEiT's token targets, and MAE (He et al. 2022, arXiv 2111.06377)
showed that standardising each target patch by its own mean and variance
(``norm_pix_loss``) improves them further. The loss is mean squared error
over masked patches only; visible patches carry no loss.

Masked patches are chosen uniformly at random (SimMIM's random masking),
not with BEiT's blockwise scheme.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(pixel_values: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order (matches a stride-p conv)."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, H/p, W/p, p, p, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)  # [B, N, p*p*C]


def mim_targets(pixel_values: Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """Per-patch regression targets [B, N, p*p*C], standardised per patch when ``norm_pix``."""
    target = patchify(pixel_values, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    return target


@torch.no_grad()
def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, N] bool with exactly ``round(mask_ratio * N)`` (at least 1) True entries per row."""
    n_mask = max(1, round(mask_ratio * num_patches))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # [B, N]
    rank = noise.argsort(dim=1).argsort(dim=1)  # [B, N]
    return rank < n_mask


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MSE over masked patches only: pred/target [B, N, P], mask [B, N] bool."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp(min=1.0)
