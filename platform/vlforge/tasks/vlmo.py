"""VLMo pretraining as a training task: a ``VLMo`` and a stage's objective weights in one module.

``VLMoPretrainTask`` wraps a model and a stage's objective weights into a
module whose ``forward(batch)`` returns ``{"loss": ..., <term>: ...}``::

    from vlforge.models import create_model
    task = VLMoPretrainTask(create_model("vlmo_debug"), {"itc": 1.0, "itm": 1.0, "mlm": 0.25})
    task(batch)["loss"].backward()
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlforge.models.vlmo import VLMo
from vlforge.objectives.itc import contrastive_logits, itc_loss_from_logits
from vlforge.objectives.itm import build_itm_batch, itm_loss
from vlforge.objectives.mim import mim_loss, random_patch_mask
from vlforge.objectives.mlm import CLS_ID, IGNORE_INDEX, MASK_ID, PAD_ID, SEP_ID, mask_tokens, mlm_loss

__all__ = ["VLMoPretrainTask"]


class VLMoPretrainTask(nn.Module):
    """One VLMo pretraining stage as a module: ``forward(batch) -> {"loss", <term>...}``.

    ``weights`` maps objective names to loss weights (0 or absent = not computed):

    * ``mim``: masked patch regression on the image-only path (stage 1);
    * ``mlm_text``: masked LM on the text-only path (stage 2);
    * ``itc``: contrastive loss between the image-only and text-only paths;
    * ``itm``: matching on the fusion path, positives plus hard negatives sampled from
      the ITC similarities over the global batch;
    * ``itm_swap``: matching on the fusion path, each pair that has one against its own caption
      with one phrase swapped (``data.swap_negatives``, ``vlforge.data.negatives``): the same objects in
      another relation, which negatives from other captions seldom are;
    * ``mlm``: masked LM on the fusion path, conditioned on the image (stage 3, 0.25).

    The returned terms other than ``loss`` are detached, for logging.
    """

    OBJECTIVES = ("mim", "mlm_text", "itc", "itm", "itm_swap", "mlm")

    def __init__(
        self,
        model: VLMo,
        weights: dict[str, float],
        mlm_prob: float = 0.15,
        pad_id: int = PAD_ID,
        cls_id: int = CLS_ID,
        sep_id: int = SEP_ID,
        mask_id: int = MASK_ID,
        gather: bool = True,
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(self.OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; known: {self.OBJECTIVES}")
        self.weights = {k: float(v) for k, v in weights.items() if v}
        if not self.weights:
            raise ValueError("no objective has a non-zero weight")
        self.model = model
        self.mlm_prob = mlm_prob
        self.special = dict(pad_id=pad_id, cls_id=cls_id, sep_id=sep_id, mask_id=mask_id)
        self.gather = gather

    def _mask(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        return mask_tokens(input_ids, attention_mask, self.model.config.vocab_size, self.mlm_prob, **self.special)

    def _mlm_term(self, text_hidden: Tensor, labels: Tensor) -> Tensor:
        chosen = labels != IGNORE_INDEX  # [B, T]
        return mlm_loss(self.model.mlm_logits(text_hidden[chosen]), labels[chosen])  # logits [M, V]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        m, w = self.model, self.weights
        terms: dict[str, Tensor] = {}
        if "mim" in w:
            pv = batch["pixel_values"]
            mask = random_patch_mask(pv.shape[0], m.num_patches, m.config.mim_mask_ratio, pv.device)  # [B, N]
            pred = m.mim_predictions(m.encode_image(pv, patch_mask=mask))  # [B, N, P]
            target = m.mim_targets(pv)  # [B, N, P]
            terms["mim"] = mim_loss(pred, target, mask)
        if "mlm_text" in w:
            ids, labels = self._mask(batch["input_ids"], batch["attention_mask"])
            out = m.encode_text(ids, batch["attention_mask"])
            terms["mlm_text"] = self._mlm_term(out.hidden, labels)
        # A locked image tokenizer's features are computed once and shared by every term below
        # (ITM alone would run it on three times the batch).
        pv = self._image_input(batch["pixel_values"]) if set(w) - {"mim", "mlm_text"} else None
        if "itc" in w or "itm" in w:
            ids, am = batch["input_ids"], batch["attention_mask"]
            img, txt = m.encode_image(pv), m.encode_text(ids, am)
            logits = contrastive_logits(m.image_embedding(img), m.text_embedding(txt), m.itc_scale(), self.gather)
            if "itc" in w:
                terms["itc"] = itc_loss_from_logits(*logits)
            if "itm" in w:
                itm = build_itm_batch(*logits, pv, ids, am, sample_id=batch.get("sample_id"))
                out = m.forward_fusion(itm["pixel_values"], itm["input_ids"], itm["attention_mask"])
                terms["itm"] = itm_loss(m.itm_logits(out), itm["itm_labels"])
        if "itm_swap" in w:
            terms["itm_swap"] = self._itm_swap(batch, pv)
        if "mlm" in w:
            ids, labels = self._mask(batch["input_ids"], batch["attention_mask"])
            out = m.forward_fusion(pv, ids, batch["attention_mask"])
            terms["mlm"] = self._mlm_term(out.text_hidden, labels)
        loss = sum(w[name] * value for name, value in terms.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def _image_input(self, pixel_values: Tensor) -> Tensor:
        """The locked tokenizer's feature grid [B, C, h, w] where the model has one, else the pixels."""
        tokenizer = self.model.image_embed.tokenizer
        return tokenizer.features(pixel_values) if tokenizer is not None else pixel_values

    def _itm_swap(self, batch: dict[str, Tensor], pv: Tensor) -> Tensor:
        if "neg_input_ids" not in batch:
            raise ValueError("objective itm_swap needs swapped captions: set the stage's data.swap_negatives")
        valid = batch["neg_valid"].bool()  # [B]
        if not valid.any():  # no caption holds a listed phrase: a zero that keeps the graph
            return 0.0 * self.model.itm_logits(self.model.forward_fusion(pv[:1], batch["input_ids"][:1])).sum()
        v = int(valid.sum())
        pixels = torch.cat([pv[valid], pv[valid]])  # [2V, C, H, W]: each image with its caption, then its twin
        ids = torch.cat([batch["input_ids"][valid], batch["neg_input_ids"][valid]])  # [2V, T]
        mask = torch.cat([batch["attention_mask"][valid], batch["neg_attention_mask"][valid]])  # [2V, T]
        labels = (torch.arange(2 * v, device=pv.device) < v).long()  # [2V]: 1 then 0, balanced
        out = self.model.forward_fusion(pixels, ids, mask)
        return itm_loss(self.model.itm_logits(out), labels)
