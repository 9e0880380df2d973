"""VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts.

Bao, Wang, Dong, Liu, Mohammed, Aggarwal, Som, Piao and Wei, NeurIPS 2022,
arXiv 2111.02358.

One pre-norm Transformer whose self-attention is shared by all modalities and
whose feed-forward layer is a set of modality experts. Every block has a
vision expert ``v`` and a language expert ``l``; the top ``vl_layers`` blocks
also have a vision-language expert ``vl``. An expert is its own LayerNorm plus
a two-layer GELU MLP. Routing follows the paper:

* image-only path (``encode_image``): all tokens -> ``v`` in every block;
* text-only path (``encode_text``): all tokens -> ``l`` in every block;
* fusion path (``forward_fusion``), sequence ``[text; image]``: in the bottom
  ``depth - vl_layers`` blocks text tokens -> ``l`` and image tokens -> ``v``,
  in the top ``vl_layers`` blocks the whole sequence -> ``vl``.

The image and text paths form a dual encoder (retrieval, ITC); the fusion path
is a fusion encoder (ITM, VQA, true/false reasoning). The final LayerNorm is
per expert as well (``norm.v``, ``norm.l``, ``norm.vl``, routed like the last
block), so that stage 2 can train the text path while the image path,
including its final norm, stays bit-identical.

Embeddings: image = conv patch embedding, [I_CLS] token, learned position
embedding and a learned modality-type vector; text = word + learned position
embedding + modality-type vector, then LayerNorm (BERT). Text comes first in
the fusion sequence, so its [T_CLS] (position 0) is the pooled token.

Heads (``heads.*``): ``itc`` (linear projections of the image and text [CLS]
states, L2-normalised, and a learnable logit scale clamped at
``logit_scale_max``; with ``itc_norm="batch"`` each projection is preceded by a BatchNorm
without affine parameters, see below), ``itm`` (2-way linear on the pooler output of the
fusion [T_CLS]), ``mlm`` (BERT transform + decoder; the decoder weight is the
word-embedding matrix when ``tie_mlm_decoder`` is set, the default as in BERT
and VLMo, else its own ``heads.mlm.decoder``; tying is done functionally, so
no parameter is shared between two module paths), and ``mim`` (linear
regression of the pixels of masked patches).

Masked image modelling target: the paper uses BEiT's visual tokens from a
DALL-E dVAE, which does not ship offline. vlforge regresses the per-patch
standardised pixels of masked patches instead (SimMIM, arXiv 2111.09886,
showed pixel regression with a linear head matches BEiT's token targets;
MAE, arXiv 2111.06377, showed per-patch normalisation helps). Masked patch
embeddings are replaced by a learned ``image_embed.mask_token``; see
``vlforge.objectives.mim``.

``itc_norm="batch"``: the pooled image and text states are centred and scaled per feature by a
``BatchNorm1d(affine=False)`` before the ITC projections, as SimCLR's and MoCo v3's projection
heads do (Chen et al. 2020, arXiv 2002.05709; Chen, Xie and He 2021, arXiv 2104.02057); at eval time
it is a fixed per-feature map from its running statistics, so embeddings can still be cached. With
mean pooling and templated captions, stages 1 and 2 leave the pooled states of all samples almost
alike (measured on the built-in corpus after 40 MIM + 40 MLM steps: mean cosine between two captions'
text embeddings 0.998, between two images' 0.77), and ITC then stays at chance for the whole of a
short stage 3; centring removes the shared component. It has no parameters, only buffers.

Parameter names are regular so that stage configs can select them with
globs (``vlforge.models.trainable.set_trainable``)::

    image_embed.{patch.weight, patch.bias, cls_token, mask_token, pos, type_embed}
    text_embed.{word.weight, pos.weight, type_embed, norm.*}
    blocks.<i>.attn.{norm, qkv, proj}.*
    blocks.<i>.experts.{v, l, vl}.{norm, fc1, fc2}.*
    norm.{v, l, vl}.*       pooler.dense.*
    heads.{itc, itm, mlm, mim}.*

Stage 2 of the paper (text-only MLM with attention and vision experts frozen)
is ``["text_embed.*", "blocks.*.experts.l.*", "norm.l.*", "heads.mlm.*"]``.

Usage::

    from vlforge.models import create_model
    model = create_model("vlmo_debug")                  # or vlmo_small / vlmo_base / vlmo_large
    img = model.encode_image(pixel_values)               # VLMoOutput
    txt = model.encode_text(input_ids, attention_mask)
    sim = model.image_embedding(img) @ model.text_embedding(txt).t()
    sim = model.embed_image(pixel_values) @ model.embed_text(input_ids, attention_mask).t()   # the same
    joint = model.forward_fusion(pixel_values, input_ids, attention_mask)
    match_logits = model.itm_logits(joint)               # [B, 2]
    joint.q, joint.k, joint.text_len                     # last-layer queries/keys and the split

VLMo's pretraining objectives (``VLMoPretrainTask``) live in ``vlforge.tasks.vlmo``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlforge.models.image_tokenizer import TOKENIZERS, create_image_tokenizer
from vlforge.models.interface import EMBED_IMAGE, EMBED_TEXT, VLModel
from vlforge.models.registry import register_model
from vlforge.objectives.mim import mim_targets

__all__ = ["VLMoConfig", "VLMoOutput", "MoMEBlock", "VLMo"]


@dataclass
class VLMoConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vl_layers: int = 2
    vocab_size: int = 30522
    max_text_len: int = 40
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    # std of the word embeddings' init; None: init_std (BERT's). With BERT's, word, position and type
    # embeddings start at one scale and are LayerNormed together; a fusion encoder trained from
    # scratch on the built-in corpus's true/false task then stayed at chance, with std 1 it learned.
    word_init_std: float | None = None
    itc_embed_dim: int = 768
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    tie_mlm_decoder: bool = True
    mim_mask_ratio: float = 0.4
    mim_norm_pix: bool = True
    image_tokenizer: str | None = None  # a locked pretrained tokenizer (image_tokenizer.TOKENIZERS) instead of patches
    pool: str = "cls"  # "cls": the [CLS] state (paper); "mean": the mean of the real tokens' states
    qk_norm: bool = False  # LayerNorm on each head's queries and keys (stable at higher learning rates)
    itc_norm: str = "none"  # "batch": BatchNorm1d(affine=False) on the pooled states before the ITC projections

    def __post_init__(self) -> None:
        if self.image_tokenizer is not None:
            if self.image_tokenizer not in TOKENIZERS:
                raise ValueError(f"unknown image_tokenizer {self.image_tokenizer!r}; known: {sorted(TOKENIZERS)}")
            self.patch_size = TOKENIZERS[self.image_tokenizer].stride
        if self.itc_norm not in ("none", "batch"):
            raise ValueError(f"itc_norm must be 'none' or 'batch', got {self.itc_norm!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.vl_layers <= self.depth:
            raise ValueError(f"vl_layers must be in [0, depth={self.depth}], got {self.vl_layers}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


@dataclass
class VLMoOutput:
    """Encoder output. Tokens ``[0, text_len)`` are text, the rest image ([I_CLS] first).

    hidden: [B, L, D] after the final norm; q, k: [B, H, L, Dh] of the last block;
    key_mask: [B, L] bool (True = real token) or None when every token is real.
    """

    hidden: Tensor
    q: Tensor
    k: Tensor
    text_len: int
    key_mask: Tensor | None

    @property
    def text_hidden(self) -> Tensor:
        return self.hidden[:, : self.text_len]

    @property
    def image_hidden(self) -> Tensor:
        return self.hidden[:, self.text_len :]


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention that also returns its queries and keys.

    ``qk_norm`` LayerNorms each head's queries and keys before the dot product (Dehghani et al.
    2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322, showed it removes the
    attention-logit growth that makes small transformers diverge at high learning rates); the
    returned q / k are the normalised ones, the ones the attention used.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        eps: float,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        q, k = self.q_norm(q), self.k_norm(k)
        mask = key_mask[:, None, None, :] if key_mask is not None else None  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )  # [B, H, L, Dh]
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out)), q, k


class Expert(nn.Module):
    """Modality expert: LayerNorm + Linear-GELU-Linear."""

    def __init__(self, dim: int, hidden: int, drop: float, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))


MODES = ("image", "text", "fusion")


def _route(experts: nn.ModuleDict, x: Tensor, mode: str, text_len: int) -> Tensor:
    """Apply the modality expert(s) of ``mode`` to x [B, L, D]; fusion is ``[text; image]``."""
    if mode == "image":
        return experts["v"](x)
    if mode == "text":
        return experts["l"](x)
    if "vl" in experts:
        return experts["vl"](x)
    return torch.cat([experts["l"](x[:, :text_len]), experts["v"](x[:, text_len:])], dim=1)


class MoMEBlock(nn.Module):
    """Shared self-attention + Mixture-of-Modality-Experts feed-forward (V, L, and VL if ``has_vl``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        has_vl: bool = False,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.has_vl = has_vl
        self.attn = Attention(dim, num_heads, qkv_bias, attn_dropout, dropout, eps, qk_norm)
        names = ("v", "l", "vl") if has_vl else ("v", "l")
        self.experts = nn.ModuleDict({name: Expert(dim, hidden, dropout, eps) for name in names})
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: Tensor, mode: str, text_len: int = 0, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, q, k = self.attn(x, key_mask)
        x = x + self.drop_path(a)
        x = x + self.drop_path(_route(self.experts, x, mode, text_len))
        return x, q, k


class ImageEmbed(nn.Module):
    """Image tokens [B, 1+N, D]: [I_CLS] + N patch tokens, each + position + modality type.

    Patches come from a conv patch embedding of the pixels, or, with ``tokenizer`` (a locked
    pretrained CNN, :mod:`vlforge.models.image_tokenizer`), from its feature grid through
    LayerNorm + Linear; then ``pixel_values`` may also hold cached features [B, C, h, w].
    """

    def __init__(
        self, img_size: int, patch_size: int, in_chans: int, dim: int, drop: float, tokenizer: str | None = None
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        if tokenizer is None:
            self.tokenizer = None
            self.patch = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.tokenizer = create_image_tokenizer(tokenizer, img_size)
            self.feature_norm = nn.LayerNorm(self.tokenizer.channels)
            self.patch = nn.Linear(self.tokenizer.channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.type_embed = nn.Parameter(torch.zeros(dim))
        self.drop = nn.Dropout(drop)

    def patch_tokens(self, pixel_values: Tensor) -> Tensor:
        """[B, N, D] patch tokens of pixels (or, with a tokenizer, of pixels or cached features)."""
        if self.tokenizer is not None:
            feats = self.tokenizer.features(pixel_values).flatten(2).transpose(1, 2)  # [B, N, C]
            return self.patch(self.feature_norm(feats.to(self.patch.weight.dtype)))  # [B, N, D]
        if pixel_values.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}px images, got {tuple(pixel_values.shape[-2:])}")
        return self.patch(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]

    def forward(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        x = self.patch_tokens(pixel_values)  # [B, N, D]
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+N, D]
        return self.drop(x + self.pos + self.type_embed)


class TextEmbed(nn.Module):
    def __init__(self, vocab_size: int, max_len: int, dim: int, drop: float, eps: float) -> None:
        super().__init__()
        self.max_len = max_len
        self.word = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.type_embed = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(drop)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"text length {t} exceeds max_text_len {self.max_len}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.pos(pos)[None] + self.type_embed  # [B, T, D]
        return self.drop(self.norm(x))


class ITCHead(nn.Module):
    def __init__(self, dim: int, embed_dim: int, scale_init: float, scale_max: float, norm: str = "none") -> None:
        super().__init__()
        batch = norm == "batch"
        self.image_norm = nn.BatchNorm1d(dim, affine=False) if batch else nn.Identity()
        self.text_norm = nn.BatchNorm1d(dim, affine=False) if batch else nn.Identity()
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale_init)))
        self.scale_max = scale_max


class MLMHead(nn.Module):
    """BERT prediction head: dense + GELU + LayerNorm, then the (optionally tied) decoder."""

    def __init__(self, dim: int, vocab_size: int, tied: bool, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = None if tied else nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, word_weight: Tensor) -> Tensor:
        h = self.norm(self.act(self.dense(x)))
        weight = word_weight if self.decoder is None else self.decoder.weight
        return F.linear(h, weight, self.bias)


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x))


class VLMo(VLModel):
    """VLMo model; build with ``VLMo(VLMoConfig(...))``, ``VLMo(**fields)`` or a registered size.

    Interface (``vlforge.models.interface``): ``embed_image`` / ``embed_text``, the ITC embeddings.
    """

    capabilities = frozenset({EMBED_IMAGE, EMBED_TEXT})

    def __init__(self, config: VLMoConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = VLMoConfig(**{**(asdict(config) if config is not None else {}), **overrides})
        self.config = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.num_heads = cfg.num_heads
        self.num_patches = cfg.num_patches
        self.image_embed = ImageEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d, cfg.dropout, cfg.image_tokenizer)
        self.text_embed = TextEmbed(cfg.vocab_size, cfg.max_text_len, d, cfg.dropout, cfg.layer_norm_eps)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_vl = cfg.depth - cfg.vl_layers
        self.blocks = nn.ModuleList(
            MoMEBlock(
                d,
                cfg.num_heads,
                cfg.mlp_ratio,
                has_vl=i >= first_vl,
                qkv_bias=cfg.qkv_bias,
                dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout,
                drop_path=dpr[i],
                eps=cfg.layer_norm_eps,
                qk_norm=cfg.qk_norm,
            )
            for i in range(cfg.depth)
        )
        norms = ("v", "l", "vl") if cfg.vl_layers > 0 else ("v", "l")
        self.norm = nn.ModuleDict({name: nn.LayerNorm(d, eps=cfg.layer_norm_eps) for name in norms})
        self.pooler = Pooler(d)
        self.heads = nn.ModuleDict(
            {
                "itc": ITCHead(d, cfg.itc_embed_dim, cfg.logit_scale_init, cfg.logit_scale_max, cfg.itc_norm),
                "itm": nn.Linear(d, 2),
                "mlm": MLMHead(d, cfg.vocab_size, cfg.tie_mlm_decoder, cfg.layer_norm_eps),
                "mim": nn.Linear(
                    d,
                    self.image_embed.tokenizer.channels
                    if cfg.image_tokenizer
                    else cfg.patch_size * cfg.patch_size * cfg.in_chans,
                ),
            }
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        tok = self.image_embed.tokenizer
        locked = {id(x) for x in tok.modules()} if tok is not None else set()
        for m in self.modules():
            if id(m) in locked:
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (
            self.image_embed.cls_token,
            self.image_embed.mask_token,
            self.image_embed.pos,
            self.image_embed.type_embed,
            self.text_embed.type_embed,
        ):
            nn.init.trunc_normal_(p, std=std)
        if self.config.word_init_std is not None:
            nn.init.normal_(self.text_embed.word.weight, std=self.config.word_init_std)
        nn.init.zeros_(self.heads["mlm"].bias)
        with torch.no_grad():
            self.heads["itc"].logit_scale.fill_(math.log(self.config.logit_scale_init))

    def _encode(self, x: Tensor, mode: str, text_len: int, key_mask: Tensor | None) -> VLMoOutput:
        q = k = None
        for block in self.blocks:
            x, q, k = block(x, mode, text_len, key_mask)
        x = _route(self.norm, x, mode, text_len)
        return VLMoOutput(hidden=x, q=q, k=k, text_len=text_len, key_mask=key_mask)

    def encode_image(self, pixel_values: Tensor, patch_mask: Tensor | None = None) -> VLMoOutput:
        """Image-only path. pixel_values [B, C, H, W]; patch_mask [B, N] bool replaces patches by the mask token."""
        x = self.image_embed(pixel_values, patch_mask)  # [B, 1+N, D]
        return self._encode(x, "image", 0, None)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> VLMoOutput:
        """Text-only path. input_ids / attention_mask [B, T]."""
        key_mask = attention_mask.bool() if attention_mask is not None else None  # [B, T]
        x = self.text_embed(input_ids)  # [B, T, D]
        return self._encode(x, "text", input_ids.shape[1], key_mask)

    def forward_fusion(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> VLMoOutput:
        """Fusion path over ``[text; image]``."""
        t = self.text_embed(input_ids)  # [B, T, D]
        i = self.image_embed(pixel_values)  # [B, 1+N, D]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        key_mask = torch.cat(
            [attention_mask.bool(), torch.ones(i.shape[:2], dtype=torch.bool, device=i.device)], dim=1
        )  # [B, T+1+N]
        return self._encode(torch.cat([t, i], dim=1), "fusion", input_ids.shape[1], key_mask)

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> VLMoOutput:
        """Fusion when both modalities are given, else the image-only or text-only path."""
        if pixel_values is not None and input_ids is not None:
            return self.forward_fusion(pixel_values, input_ids, attention_mask)
        if pixel_values is not None:
            return self.encode_image(pixel_values)
        if input_ids is not None:
            return self.encode_text(input_ids, attention_mask)
        raise ValueError("give pixel_values, input_ids, or both")

    def itc_scale(self) -> Tensor:
        head = self.heads["itc"]
        return head.logit_scale.exp().clamp(max=head.scale_max)

    def summary(self, out: VLMoOutput) -> Tensor:
        """One state per sequence, [B, D]: the first token ([I_CLS], [T_CLS]; [T_CLS] in fusion) with
        ``pool="cls"``, else the mean over real tokens (padding excluded).

        With a locked image tokenizer and a few blocks trained from scratch on CPU, [CLS] pooling
        stayed at chance where mean pooling learned (measured: ITC on the built-in corpus's scenes,
        200 steps at batch 64, text->image R@1 among 1,050 test scenes 0.0 % with [CLS], 83 % with
        the mean), so the CPU sizes pool by mean.
        """
        if self.config.pool == "cls":
            return out.hidden[:, 0]
        if out.key_mask is None:
            return out.hidden.mean(1)
        w = out.key_mask.to(out.hidden.dtype)[..., None]  # [B, L, 1]
        return (out.hidden * w).sum(1) / w.sum(1).clamp(min=1)

    def image_embedding(self, out: VLMoOutput) -> Tensor:
        """L2-normalised ITC embedding [B, E] of an image-only output (see :meth:`summary`)."""
        head = self.heads["itc"]
        return F.normalize(head.image_proj(head.image_norm(self.summary(out))), dim=-1)

    def text_embedding(self, out: VLMoOutput) -> Tensor:
        """L2-normalised ITC embedding [B, E] of a text-only output (see :meth:`summary`)."""
        head = self.heads["itc"]
        return F.normalize(head.text_proj(head.text_norm(self.summary(out))), dim=-1)

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised ITC image embeddings [B, E] (pixels, or a locked tokenizer's cached features)."""
        return self.image_embedding(self.encode_image(pixel_values))

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised ITC text embeddings [B, E] of input_ids / attention_mask [B, T]."""
        return self.text_embedding(self.encode_text(input_ids, attention_mask))

    def pooled(self, out: VLMoOutput) -> Tensor:
        """Pooler (dense + tanh) over the fusion summary ([T_CLS] or the mean): [B, D]."""
        return self.pooler(self.summary(out))

    def itm_logits(self, out: VLMoOutput) -> Tensor:
        return self.heads["itm"](self.pooled(out))  # [B, 2]

    def mlm_logits(self, text_hidden: Tensor) -> Tensor:
        """[..., D] text states -> [..., V] vocabulary logits."""
        return self.heads["mlm"](text_hidden, self.text_embed.word.weight)

    def mim_targets(self, pixel_values: Tensor) -> Tensor:
        """What MIM regresses, [B, N, P]: standardised patch pixels, or, with a locked tokenizer,
        its standardised feature vectors (feature regression as in MaskFeat, Wei et al. 2022,
        arXiv 2112.09133)."""
        tok = self.image_embed.tokenizer
        if tok is None:
            return mim_targets(pixel_values, self.config.patch_size, self.config.mim_norm_pix)
        feats = tok.features(pixel_values).flatten(2).transpose(1, 2).float()  # [B, N, C]
        return F.layer_norm(feats, feats.shape[-1:])

    def mim_predictions(self, out: VLMoOutput) -> Tensor:
        """MIM predictions [B, N, P] for every patch of an image-only output (see :meth:`mim_targets`)."""
        return self.heads["mim"](out.image_hidden[:, 1:])


def _create(defaults: dict, overrides: dict) -> VLMo:
    return VLMo(VLMoConfig(**{**defaults, **overrides}))


@register_model
def vlmo_debug(**overrides) -> VLMo:
    """Tiny VLMo for unit tests: 32px images, patch 8, dim 32, 2 blocks (top 1 with VL expert)."""
    return _create(
        dict(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            vl_layers=1,
            max_text_len=16,
            itc_embed_dim=32,
        ),
        overrides,
    )


@register_model
def vlmo_small(**overrides) -> VLMo:
    """CPU-sized VLMo for the built-in 64x64 emoji corpus: patch 8, dim 192, 4 blocks (top 1 VL)."""
    return _create(
        dict(
            img_size=64,
            patch_size=8,
            embed_dim=192,
            depth=4,
            num_heads=3,
            vl_layers=1,
            max_text_len=32,
            itc_embed_dim=192,
        ),
        overrides,
    )


@register_model
def vlmo_small_effnet(**overrides) -> VLMo:
    """CPU-sized VLMo that learns in minutes: 128px images tokenised by a locked ImageNet-pretrained
    EfficientNet-Lite0 (Apache-2.0, ``vlforge.models.image_tokenizer``) into a 4x4 grid, dim 192,
    4 blocks (top 1 VL), mean pooling, QK-norm; everything above the tokenizer is trained."""
    return _create(
        dict(
            img_size=128,
            image_tokenizer="efficientnet_lite0",
            embed_dim=192,
            depth=4,
            num_heads=3,
            vl_layers=1,
            max_text_len=32,
            itc_embed_dim=192,
            pool="mean",
            qk_norm=True,
        ),
        overrides,
    )


@register_model
def vlmo_base(**overrides) -> VLMo:
    """VLMo-Base (paper): 224px, patch 16, 12 blocks, dim 768, 12 heads, top 2 blocks with VL experts."""
    return _create(
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            vl_layers=2,
            max_text_len=40,
            itc_embed_dim=768,
            drop_path_rate=0.1,
        ),
        overrides,
    )


@register_model
def vlmo_large(**overrides) -> VLMo:
    """VLMo-Large (paper): 224px, patch 16, 24 blocks, dim 1024, 16 heads, top 3 blocks with VL experts."""
    return _create(
        dict(
            img_size=224,
            patch_size=16,
            embed_dim=1024,
            depth=24,
            num_heads=16,
            vl_layers=3,
            max_text_len=40,
            itc_embed_dim=1024,
            drop_path_rate=0.1,
        ),
        overrides,
    )
