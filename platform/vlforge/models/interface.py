"""One model interface across the families: image / text embeddings and captions.

As timm's ``forward_features`` / ``forward_head`` are the same on every timm model, every vlforge model
(``create_model(name)``, and the pair models ``FusionTeacher`` / ``DualEncoderStudent``) is a
:class:`VLModel` and declares what it can do in its class attribute ``capabilities``:

* ``"embed_image"``: ``embed_image(pixel_values) -> Tensor [B, E]``, float, unit L2 norm;
* ``"embed_text"``: ``embed_text(input_ids, attention_mask) -> Tensor [B, E]``, float, unit L2 norm;
* ``"generate"``: ``generate(pixel_values, max_new_tokens=20, beams=1) -> list[str]``, one caption per image.

The contract:

* ``pixel_values`` is [B, 3, H, W] at the model's image size, normalised as its data pipeline does;
  ``input_ids`` / ``attention_mask`` are [B, T] in the model's own tokenizer.
* Embeddings are L2-normalised along the last dimension. A model that declares both embeddings puts
  them in one space, and ``embed_image(pv) @ embed_text(ids, mask).T`` ([Bi, Bt]) is its dual-encoder
  retrieval score, the one ``evaluation.retrieval.student_scores`` and the serving pyfunc compute.
* ``generate`` decodes greedily with ``beams=1``, else beam search (``models.decoding``); it runs under
  ``no_grad`` and does not change the training flag.
* A method whose capability the class does not declare raises ``NotImplementedError`` naming the class
  and what it does declare. Callers check with :func:`supports` or :func:`require`, never ``hasattr``.

Who declares what:

* ``VLMo``, ``DualEncoderStudent``, ``FusionTeacher``: ``embed_image``, ``embed_text`` (the ITC
  embeddings of the image-only and text-only paths; the teacher's are its own dual mode, the shortlist
  its retrieval re-ranks). ``VLMo.encode_image`` / ``encode_text`` (a ``VLMoOutput``) stay for the
  objectives and distillation.
* ``VLKD``: ``embed_image`` (its frozen teacher's image embedding), ``embed_text`` (the student's text
  embedding, trained into the teacher's space by TTD and ITC), ``generate``. With a callable teacher
  (``teacher(batch) -> (image, text)``, no ``encode_image``) the instance declares ``embed_text`` only.
* ``Frozen``, ``VCGPT``: ``generate`` only. Their image representations (Frozen's LM prefix
  [B, n, D], VC-GPT's visual tokens [B, N, D]) condition a language model and share no space with
  any text embedding.
* ``VisionTower`` (``vision_*``): nothing; it is a component of the families above (its
  ``forward(pixel_values)`` gives tokens and pooled features).

Usage::

    from vlforge.models import create_model
    from vlforge.models.interface import EMBED_TEXT, GENERATE, supports

    model = create_model("vlkd_debug")
    if supports(model, GENERATE):
        captions = model.generate(pixel_values, max_new_tokens=8)   # list[str], len B
    scores = model.embed_image(pixel_values) @ model.embed_text(input_ids, attention_mask).t()   # [Bi, Bt]
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

__all__ = [
    "CAPABILITIES",
    "EMBED_IMAGE",
    "EMBED_TEXT",
    "GENERATE",
    "VLModel",
    "require",
    "supports",
]

EMBED_IMAGE = "embed_image"
EMBED_TEXT = "embed_text"
GENERATE = "generate"
CAPABILITIES = frozenset({EMBED_IMAGE, EMBED_TEXT, GENERATE})


class VLModel(nn.Module):
    """Base class of every vlforge model: the interface of the module docstring.

    Subclasses set ``capabilities`` and override the methods it names; the others raise
    ``NotImplementedError``. The class adds no parameters or buffers (state dicts are unchanged).
    """

    capabilities: ClassVar[frozenset[str]] = frozenset()

    def _not_declared(self, capability: str) -> NotImplementedError:
        declared = ", ".join(sorted(self.capabilities)) or "nothing"
        return NotImplementedError(f"{type(self).__name__} does not declare {capability!r} (it declares {declared})")

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, E] of ``pixel_values`` [B, 3, H, W]."""
        raise self._not_declared(EMBED_IMAGE)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised text embeddings [B, E] of ``input_ids`` / ``attention_mask`` [B, T]."""
        raise self._not_declared(EMBED_TEXT)

    def generate(self, pixel_values: Tensor, max_new_tokens: int = 20, beams: int = 1) -> list[str]:
        """One caption per image of ``pixel_values`` [B, 3, H, W]."""
        raise self._not_declared(GENERATE)


def supports(model: object, *capabilities: str) -> bool:
    """Whether ``model`` is a :class:`VLModel` declaring every one of ``capabilities``."""
    unknown = set(capabilities) - CAPABILITIES
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
    return isinstance(model, VLModel) and set(capabilities) <= model.capabilities


def require(model: object, *capabilities: str) -> VLModel:
    """``model``, or TypeError naming what it lacks of ``capabilities``."""
    if not supports(model, *capabilities):
        declared = sorted(model.capabilities) if isinstance(model, VLModel) else "no vlforge model interface"
        raise TypeError(f"{type(model).__name__} needs {', '.join(capabilities)}; it declares {declared}")
    return model
