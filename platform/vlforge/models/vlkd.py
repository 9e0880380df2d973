"""VLKD: distil a frozen CLIP-like dual encoder into a BART-style encoder-decoder.

Dai et al. 2022, "Enabling Multimodal Generation on CLIP via Vision-Language
Knowledge Distillation" (arXiv 2203.06386). A frozen dual-encoder teacher (CLIP in
the paper) gives image and text embeddings; a BART student learns, with its own
weights, to live in the teacher's embedding space and to generate text from it.
Three losses, weighted and summed:

* text-text distance (TTD): the student's pooled text-encoder output, linearly
  projected, is pulled to the teacher's text embedding (squared L2 distance of the
  L2-normalised vectors),
* image-text contrastive (ITC): the same student text embedding against the
  teacher's image embeddings of the batch, symmetric InfoNCE,
* image-conditioned text infilling (ICTI): BART's span infilling (Poisson(3) spans,
  each replaced by one mask token) where the encoder input is prefixed with the
  teacher's image embedding projected to ``n_image_prefix`` vectors; the decoder
  reconstructs the whole caption.

At inference the same image prefix alone (no text) lets the decoder caption an image.

The teacher is any module or object with ``encode_image(pixel_values) -> [B, Dt]``
and ``encode_text(input_ids, attention_mask) -> [B, Dt]``, or a callable
``teacher(batch) -> (image_embeds, text_embeds)``. It runs in eval mode without
gradients. Its text input is ``batch["teacher_input_ids"]`` /
``batch["teacher_attention_mask"]`` when the batch has them (a teacher with its own
tokenizer), else the student's ``input_ids``. ``vlkd_debug`` builds a tiny random
:class:`ToyDualEncoder` teacher; a random teacher teaches nothing, so real runs pass
``teacher=...`` (``create_model("vlkd_base", teacher=clip_like)``) or name a model directory of a
vlforge dual encoder, a distilled student or a VLMo (``teacher="out/.../stages/retrieval"``), which
:class:`DualEncoderTeacher` wraps; its weights then travel inside the VLKD's state dict.

    model = create_model("vlkd_debug")
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), **model.tokenize(["a cat", ...])}
    out = model(batch)     # loss, ttd_loss, itc_loss, icti_loss
    model.generate(torch.randn(1, 3, 32, 32))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.decoding import beam_search
from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, GENERATE, VLModel
from vlforge.models.io import load_model_dir, read_spec
from vlforge.models.lm import CaptionTokenizer, freeze, load_tokenizer
from vlforge.models.registry import register_model
from vlforge.models.vision import VisionConfig, VisionTower, override, vision_config

IGNORE_INDEX = -100


@dataclass
class BartSize:
    d_model: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    ffn_dim: int = 128
    max_position_embeddings: int = 128
    dropout: float = 0.0


@dataclass
class VLKDConfig:
    student: BartSize = field(default_factory=BartSize)
    student_name_or_path: str | None = None
    tokenizer: str = "bytes"
    teacher: str = "random"
    teacher_dim: int = 32
    teacher_vision: VisionConfig = field(default_factory=lambda: vision_config("debug"))
    n_image_prefix: int = 2
    temperature: float = 0.07
    w_ttd: float = 1.0
    w_itc: float = 1.0
    w_icti: float = 1.0
    mask_ratio: float = 0.3
    span_lambda: float = 3.0
    max_caption_len: int = 32
    seed: int = 0


class ToyDualEncoder(nn.Module):
    """A small randomly initialised CLIP-shaped teacher for tests: image tower + bag-of-tokens text."""

    def __init__(self, vision: VisionConfig, vocab_size: int, embed_dim: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.vision = VisionTower.from_config(vision)
            self.image_proj = nn.Linear(self.vision.num_features, embed_dim)
            self.token_embed = nn.Embedding(vocab_size, embed_dim)
            self.text_proj = nn.Linear(embed_dim, embed_dim)
        self.embed_dim = embed_dim

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vision(pixel_values).pooled)  # [B, Dt]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(masked_mean(self.token_embed(input_ids), attention_mask))  # [B, Dt]


class DualEncoderTeacher(nn.Module):
    """A vlforge dual encoder as VLKD's CLIP: a VLMo's dual mode (a bare VLMo, or the ``encoder`` of a
    distilled ``DualEncoderStudent``) giving its normalised ITC embeddings. Its text input is the
    WordPiece ids the data pipeline makes (``teacher_input_ids``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = getattr(model, "encoder", model)
        self.embed_dim = int(self.encoder.config.itc_embed_dim)
        self.img_size = int(self.encoder.config.img_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed_image(pixel_values)  # [B, Dt]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed_text(input_ids, attention_mask)  # [B, Dt]


def load_teacher(path: str) -> DualEncoderTeacher:
    """The dual-encoder teacher in the model directory ``path`` (a distilled student or a VLMo)."""
    try:
        method = read_spec(path).get("method", "vlmo")
    except FileNotFoundError:
        raise FileNotFoundError(f"VLKD teacher: no model directory at {path}") from None
    if method not in ("vlmo", "distill"):
        raise ValueError(f"{path}: VLKD's teacher is a dual encoder (method 'vlmo' or 'distill'), got {method!r}")
    return DualEncoderTeacher(load_model_dir(path))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over attended positions: x [B, T, D], mask [B, T] -> [B, D]."""
    m = mask.unsqueeze(-1).to(x.dtype)  # [B, T, 1]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of a [B, D] and b [B, D]."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / temperature  # [B, B]
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def span_infill(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    pad_id: int,
    ratio: float,
    span_lambda: float,
    keep_first: int = 1,
    keep_last: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BART text infilling: spans with Poisson(lambda) lengths (at least 1) covering about
    ``ratio`` of each caption's tokens are each replaced by a single mask token.
    The first ``keep_first`` and last ``keep_last`` tokens (BOS / EOS) are never masked.

    input_ids / attention_mask [B, T] (right-padded) -> masked ids / mask [B, T'] with T' <= T.
    """
    rows = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
        n = sum(m)
        body = ids[keep_first : n - keep_last]
        budget = round(ratio * len(body))
        masked = [False] * len(body)
        while budget > 0 and not all(masked):
            length = int(torch.poisson(torch.tensor(float(span_lambda)), generator=generator).clamp_min(1))
            length = min(length, budget)
            start = int(torch.randint(0, max(1, len(body) - length + 1), (1,), generator=generator))
            for j in range(start, min(start + length, len(body))):
                if not masked[j]:
                    masked[j] = True
                    budget -= 1
        out = ids[:keep_first]
        for j, tok in enumerate(body):
            if not masked[j]:
                out.append(tok)
            elif j == 0 or not masked[j - 1]:
                out.append(mask_id)
        rows.append(out + ids[n - keep_last : n])
    width = max(len(r) for r in rows)
    new_ids = input_ids.new_full((len(rows), width), pad_id)  # [B, T']
    new_mask = torch.zeros_like(new_ids)
    for i, r in enumerate(rows):
        new_ids[i, : len(r)] = torch.tensor(r, dtype=new_ids.dtype)
        new_mask[i, : len(r)] = 1
    return new_ids, new_mask


Teacher = Any


class VLKD(VLModel):
    """BART student taught by a frozen dual encoder; see the module docstring.

    Interface (``vlforge.models.interface``): ``embed_image`` is the teacher's image embedding and
    ``embed_text`` the student's text embedding in the teacher's space (:meth:`encode_text`), both
    L2-normalised, as the ITC loss compares them; ``generate`` captions from the image prefix. With a
    callable teacher (no ``encode_image``) the instance declares ``embed_text`` only.
    """

    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT, GENERATE})

    def __init__(
        self,
        config: VLKDConfig,
        teacher: Teacher | None = None,
        student: nn.Module | None = None,
        tokenizer: CaptionTokenizer | None = None,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, add_mask=True)
        if self.tokenizer.mask_id is None:
            raise ValueError("VLKD's text infilling needs a tokenizer with a mask token")
        self.student = student if student is not None else self._build_student()
        if teacher is None:
            if config.teacher == "random":
                teacher = ToyDualEncoder(
                    config.teacher_vision, self.tokenizer.vocab_size, config.teacher_dim, config.seed
                )
            else:  # a model directory: the platform's own dual encoder in CLIP's role
                teacher = load_teacher(config.teacher)
        if isinstance(teacher, nn.Module):
            freeze(teacher)
        self.teacher = teacher
        if not hasattr(teacher, "encode_image"):
            self.capabilities = frozenset({EMBED_TEXT})
        teacher_dim = int(getattr(teacher, "embed_dim", config.teacher_dim))
        d_model = self.student.config.d_model
        self.text_proj = nn.Linear(d_model, teacher_dim)
        self.image_prefix = nn.Linear(teacher_dim, config.n_image_prefix * d_model)

    def _build_student(self) -> nn.Module:
        from transformers import BartConfig, BartForConditionalGeneration

        if self.config.student_name_or_path:
            return BartForConditionalGeneration.from_pretrained(self.config.student_name_or_path)
        s, tok = self.config.student, self.tokenizer
        cfg = BartConfig(
            vocab_size=tok.vocab_size,
            d_model=s.d_model,
            encoder_layers=s.encoder_layers,
            decoder_layers=s.decoder_layers,
            encoder_attention_heads=s.heads,
            decoder_attention_heads=s.heads,
            encoder_ffn_dim=s.ffn_dim,
            decoder_ffn_dim=s.ffn_dim,
            max_position_embeddings=s.max_position_embeddings,
            dropout=s.dropout,
            attention_dropout=s.dropout,
            activation_dropout=s.dropout,
            pad_token_id=tok.pad_id,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            decoder_start_token_id=tok.eos_id,
            forced_bos_token_id=None,
            forced_eos_token_id=None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.config.seed)
            return BartForConditionalGeneration(cfg)

    def train(self, mode: bool = True) -> VLKD:
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        return self

    def tokenize(self, captions: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Raw captions -> the student's ``<bos> caption <eos>`` ids / mask [B, T]."""
        return self.tokenizer.batch_encode(
            list(captions), max_length or self.config.max_caption_len, add_bos=True, add_eos=True
        )

    @torch.no_grad()
    def teacher_embeddings(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [B, Dt], text [B, Dt]) from the frozen teacher."""
        if hasattr(self.teacher, "encode_image") and hasattr(self.teacher, "encode_text"):
            ids = batch.get("teacher_input_ids", batch["input_ids"])
            mask = batch.get("teacher_attention_mask", batch["attention_mask"])
            return self.teacher.encode_image(batch["pixel_values"]), self.teacher.encode_text(ids, mask)
        image, text = self.teacher(batch)
        return image, text

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Student text embedding in the teacher's space [B, Dt]."""
        hidden = self.student.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(masked_mean(hidden, attention_mask))  # [B, T, d] -> [B, Dt]

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teacher's image embeddings [B, Dt], L2-normalised, without gradients."""
        if EMBED_IMAGE not in self.capabilities:
            raise self._not_declared(EMBED_IMAGE)
        with torch.no_grad():
            return F.normalize(self.teacher.encode_image(pixel_values), dim=-1)  # [B, Dt]

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The student's text embeddings [B, Dt] (:meth:`encode_text`), L2-normalised."""
        return F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)  # [B, Dt]

    def _prefixed_encoder_inputs(self, image_embeds, input_ids=None, attention_mask=None):
        """Encoder inputs [image prefix (n), text tokens]: embeds [B, n + T, d], mask [B, n + T]."""
        b = image_embeds.shape[0]
        prefix = self.image_prefix(image_embeds).view(b, self.config.n_image_prefix, -1)  # [B, n, d]
        prefix_mask = torch.ones(b, prefix.shape[1], dtype=torch.long, device=prefix.device)
        if input_ids is None:
            return prefix, prefix_mask
        text = self.student.get_input_embeddings()(input_ids)  # [B, T, d]
        return torch.cat([prefix, text], 1), torch.cat([prefix_mask, attention_mask], 1)

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        cfg, tok = self.config, self.tokenizer
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        t_image, t_text = self.teacher_embeddings(batch)
        t_image, t_text = t_image.float(), t_text.float()

        s_text = self.encode_text(input_ids, attention_mask)  # [B, Dt]
        ttd = (F.normalize(s_text, dim=-1) - F.normalize(t_text, dim=-1)).pow(2).sum(-1).mean()
        itc = info_nce(s_text, t_image, cfg.temperature)

        masked_ids, masked_mask = span_infill(
            input_ids, attention_mask, tok.mask_id, tok.pad_id, cfg.mask_ratio, cfg.span_lambda, generator=generator
        )
        embeds, enc_mask = self._prefixed_encoder_inputs(t_image, masked_ids, masked_mask)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # [B, T]
        icti = self.student(inputs_embeds=embeds, attention_mask=enc_mask, labels=labels).loss

        loss = cfg.w_ttd * ttd + cfg.w_itc * itc + cfg.w_icti * icti
        return {
            "loss": loss,
            "ttd_loss": ttd.detach(),
            "itc_loss": itc.detach(),
            "icti_loss": icti.detach(),
        }

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20, beams: int = 1) -> list[str]:
        """Captions from the image prefix alone (teacher image embedding -> encoder): greedy, or beam
        search over ``beams`` hypotheses (``models.decoding``)."""
        if GENERATE not in self.capabilities:
            raise TypeError("generation needs a teacher with encode_image")
        image = self.teacher.encode_image(pixel_values)
        embeds, mask = self._prefixed_encoder_inputs(image.float())
        encoder_out = self.student.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        encoder_out.last_hidden_state = encoder_out.last_hidden_state.repeat_interleave(beams, dim=0)
        mask = mask.repeat_interleave(beams, dim=0)  # [B*K, n + T]
        start = self.student.config.decoder_start_token_id

        def step(ids: torch.Tensor) -> torch.Tensor:
            first = torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)
            dec = torch.cat([first, ids], dim=1)  # [B*K, 1 + t]
            return self.student(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]

        rows = beam_search(
            step,
            batch_size=pixel_values.shape[0],
            beams=beams,
            eos_id=self.tokenizer.eos_id,
            max_new_tokens=max_new_tokens,
            device=pixel_values.device,
        )
        bos = self.tokenizer.bos_id
        return [self.tokenizer.decode([t for t in r if t != bos]) for r in rows]


def _vlkd(config: VLKDConfig, overrides: dict) -> VLKD:
    teacher: Teacher | Callable | None = overrides.pop("teacher", None)
    if isinstance(teacher, str):
        overrides["teacher"], teacher = teacher, None
    return VLKD(override(config, overrides), teacher=teacher)


@register_model
def vlkd_debug(**overrides) -> VLKD:
    """Tiny BART (2+2 layers, width 64, byte tokenizer) taught by a tiny random dual encoder."""
    return _vlkd(VLKDConfig(), overrides)


@register_model
def vlkd_base(**overrides) -> VLKD:
    """BART-base shape (6+6 layers, width 768) with SmolLM2's tokenizer; pass teacher=<CLIP-like>."""
    if "teacher" not in overrides:
        warnings.warn("vlkd_base without teacher=...: using a random toy teacher, which teaches nothing")
    config = VLKDConfig(
        student=BartSize(
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            heads=12,
            ffn_dim=3072,
            max_position_embeddings=1024,
            dropout=0.1,
        ),
        tokenizer="smollm2",
        teacher_dim=512,
        teacher_vision=vision_config("small"),
        n_image_prefix=4,
        max_caption_len=64,
    )
    return _vlkd(config, overrides)
