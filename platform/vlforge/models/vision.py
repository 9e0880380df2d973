"""Vision towers from timm for every vlforge model.

A :class:`VisionTower` wraps any timm image model (``pretrained=False`` always: no
hub at run time; a local checkpoint can be given instead) and exposes two views of
an image batch:

* ``tokens``: [B, N, D] patch tokens (ViT: the normalised token sequence; CNN: the
  last feature map flattened over its H x W positions),
* ``pooled``: [B, D] the pre-logits feature timm's head would classify.

Named towers:

* ``vision_debug``: a 2-layer ViT on 32x32 images (seconds on CPU, for tests),
* ``vision_small``: ViT-Tiny/16 (Dosovitskiy et al. 2021, arXiv 2010.11929) on 128x128,
* ``vision_nf_resnet26``: NF-ResNet-26 on 128x128,
* ``vision_nf_resnet50``: NF-ResNet-50 on 224x224 (Brock et al. 2021, "Characterizing
  signal propagation to close the performance gap in unnormalized ResNets",
  arXiv 2101.08692), the vision encoder of Frozen.
* ``vision_lite0``: a :class:`LockedVisionTower`: the locked pretrained EfficientNet-Lite0
  image tokenizer (``models/image_tokenizer.py``, Apache-2.0 weights from a pip package) at
  128x128, its 4x4 grid of 1280-d cells projected to 384, a learned position embedding and one
  trainable transformer block. The captioning smoke recipes use it, as VC-GPT's paper uses CLIP's
  pretrained ViT: ViT-Tiny trained from pixels for minutes named the background colour in its
  captions but never the objects.

    from vlforge.models import create_model
    tower = create_model("vision_debug")
    out = tower(torch.randn(2, 3, 32, 32))   # out.tokens [2, 17, 32], out.pooled [2, 32]
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vlforge.models.image_tokenizer import create_image_tokenizer
from vlforge.models.interface import VLModel
from vlforge.models.registry import register_model


@dataclass
class VisionConfig:
    timm_name: str = "vit_tiny_patch16_224"
    img_size: int = 32
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    drop_path_rate: float = 0.0
    image_tokenizer: str | None = None  # a locked pretrained tokenizer (models/image_tokenizer.py): a LockedVisionTower
    embed_dim: int = 384  # LockedVisionTower: width of the projected grid cells
    depth: int = 1  # LockedVisionTower: trainable transformer blocks over the grid
    num_heads: int = 6  # LockedVisionTower: heads of those blocks


class VisionOutput(NamedTuple):
    tokens: torch.Tensor
    pooled: torch.Tensor


def override(config, overrides: dict[str, Any]):
    """``dataclasses.replace`` that merges dicts into nested dataclass fields.

    ``override(frozen_cfg, {"n_prefix": 4, "lm": {"num_layers": 1}})``.
    """
    names = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{type(config).__name__} has no field(s) {sorted(unknown)}")
    changes = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = override(current, value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


def import_timm():
    """``import timm``, quiet about torchvision's image codecs: scripts/build_torchvision.sh leaves them
    (and torchvision's C++ ops) out of the CPU build by default (vlforge decodes with PIL, and timm
    needs only torchvision's Python code), and torchvision warns about the codecs at import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to load image Python extension", category=UserWarning)
        import timm
    return timm


class VisionTower(VLModel):
    """A timm image model without its classifier, giving patch tokens and a pooled vector.

    A component of the families: it declares no capability of ``vlforge.models.interface``.
    """

    def __init__(
        self,
        timm_name: str,
        img_size: int,
        timm_kwargs: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        timm = import_timm()
        self.timm_name = timm_name
        self.img_size = img_size
        self.body = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **(timm_kwargs or {}),
        )
        self.num_features = self.body.num_features
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @classmethod
    def from_config(cls, config: VisionConfig) -> VisionTower | LockedVisionTower:
        """The tower ``config`` names: a timm model, or a locked tokenizer with a trainable head."""
        if config.image_tokenizer is not None:
            return LockedVisionTower(config)
        return cls(config.timm_name, config.img_size, config.timm_kwargs, config.checkpoint, config.drop_path_rate)

    def load_checkpoint(self, path: str | Path) -> None:
        """Weights from a local .safetensors / .pth file; classifier weights in it are ignored."""
        from timm.models import load_state_dict

        state = load_state_dict(str(path))
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        classifier = self.body.pretrained_cfg.get("classifier", "head")
        classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        unexpected = [k for k in unexpected if not any(k.startswith(c + ".") for c in classifiers)]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not fit {self.timm_name}: missing {missing}, unexpected {unexpected}"
            )

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.body, "num_prefix_tokens", 0))

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        features = self.body.forward_features(pixel_values)
        pooled = self.body.forward_head(features, pre_logits=True)  # [B, D]
        if features.ndim == 4:
            tokens = features.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        else:
            tokens = features  # [B, N, D]
        return VisionOutput(tokens, pooled)


class LockedVisionTower(VLModel):
    """A locked pretrained image tokenizer with a small trainable head: the same two views as
    :class:`VisionTower`. The grid [B, C, h, w] (or those features, cached) is projected to
    ``embed_dim``, given a learned position embedding so that captions can say where things are,
    and passed through ``depth`` timm ViT blocks; ``pooled`` is the mean of the tokens. Only the
    tokenizer is locked (``vlforge.models.trainable`` never unfreezes it); the head trains.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        import_timm()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.img_size = config.img_size
        self.tokenizer = create_image_tokenizer(config.image_tokenizer, config.img_size)
        n = self.tokenizer.grid**2
        self.proj = nn.Linear(self.tokenizer.channels, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, config.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(config.embed_dim, config.num_heads) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.num_features = config.embed_dim
        self.num_prefix_tokens = 0

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        grid = self.tokenizer.features(pixel_values)  # [B, C, h, w]
        x = self.proj(grid.flatten(2).transpose(1, 2)) + self.pos_embed  # [B, h*w, D]
        tokens = self.norm(self.blocks(x))
        return VisionOutput(tokens, tokens.mean(dim=1))


def _debug_vit() -> VisionConfig:
    return VisionConfig(
        "vit_tiny_patch16_224",
        img_size=32,
        timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    )


VISION_SIZES: dict[str, VisionConfig] = {
    "debug": _debug_vit(),
    "small": VisionConfig("vit_tiny_patch16_224", img_size=128, timm_kwargs=dict(img_size=128)),
    "nf_resnet26": VisionConfig("nf_resnet26", img_size=128),
    "nf_resnet50": VisionConfig("nf_resnet50", img_size=224),
    "lite0": VisionConfig("efficientnet_lite0", img_size=128, image_tokenizer="efficientnet_lite0"),
    "lite0_debug": VisionConfig(
        "efficientnet_lite0", img_size=64, image_tokenizer="efficientnet_lite0", embed_dim=32, num_heads=2
    ),
}


def vision_config(size: str) -> VisionConfig:
    return dataclasses.replace(VISION_SIZES[size], timm_kwargs=dict(VISION_SIZES[size].timm_kwargs))


@register_model
def vision_debug(**overrides) -> VisionTower:
    return VisionTower.from_config(override(vision_config("debug"), overrides))


@register_model
def vision_small(**overrides) -> VisionTower:
    return VisionTower.from_config(override(vision_config("small"), overrides))


@register_model
def vision_nf_resnet26(**overrides) -> VisionTower:
    return VisionTower.from_config(override(vision_config("nf_resnet26"), overrides))


@register_model
def vision_nf_resnet50(**overrides) -> VisionTower:
    return VisionTower.from_config(override(vision_config("nf_resnet50"), overrides))


@register_model
def vision_lite0(**overrides) -> LockedVisionTower:
    return LockedVisionTower(override(vision_config("lite0"), overrides))


@register_model
def vision_lite0_debug(**overrides) -> LockedVisionTower:
    """``vision_lite0`` at 64x64 (a 2x2 grid) with a 32-wide head: the pretrained tokenizer, for tests."""
    return LockedVisionTower(override(vision_config("lite0_debug"), overrides))
