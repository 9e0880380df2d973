"""Helpers shared by the test tiers: small images, model directories of debug sizes, an overfit loop.

    from helpers import debug_model_dir, overfit, png

``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there (pytest's default import mode).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch


def png(color, size: int | tuple[int, int] = 32, shape: str | None = None, fmt: str = "PNG") -> bytes:
    """An encoded image: a solid ``color`` field, or with ``shape`` ("square", "ellipse") that shape in
    ``color`` on white."""
    from PIL import Image, ImageDraw

    w, h = (size, size) if isinstance(size, int) else size
    if shape is None:
        im = Image.new("RGB", (w, h), color)
    else:
        im = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        box = [6, 6, w - 8, h - 10] if shape == "square" else [4, 6, w - 6, h - 4]
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=color)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def debug_model_dir(spec: dict[str, Any], out: str | Path, seed: int = 1) -> Path:
    """A model directory of freshly initialised weights for ``spec`` (``{"model": ..., "method": ...}``)."""
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(seed)
    return save_model_dir(build_from_spec(spec).state_dict(), spec, out)


def dual_encoder_dir(out: str | Path, seed: int = 1) -> Path:
    """A tiny distilled dual encoder (vlmo_debug, 32 px, no fusion layers): VLKD's teacher in CLIP's role."""
    return debug_model_dir({"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}, out, seed)


def overfit(task: torch.nn.Module, batch: dict, max_steps: int, factor: float = 5.0) -> tuple[float, float, int]:
    """Adam at 1e-3 on one fixed batch until the loss falls ``factor``-fold; (first, last, steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy machine
    try:
        opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-3)
        first = last = None
        for step in range(max_steps):
            torch.manual_seed(1234)  # same masks and negatives every step: one fixed batch
            loss = task(batch)["loss"]
            last = loss.item()
            first = last if first is None else first
            if last < first / factor:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return first, last, step
    finally:
        torch.set_num_threads(threads)


def scene_set(
    out: str | Path,
    scenes: list[tuple[str, list[str]]],
    samples_per_shard: int = 2,
    kind: str = "captions",
    colour_step: int = 40,
) -> Path:
    """A tiny captions shard set: one solid-colour 32 px image per ``(caption, object names)``, the names as
    the corpus's ``objects`` metadata."""
    from vlforge.data.shards import ShardWriter

    with ShardWriter(out, samples_per_shard=samples_per_shard, params={"kind": kind}) as w:
        for i, (text, names) in enumerate(scenes):
            w.write(
                f"{i:06d}",
                image=png((colour_step * i, 100, 200)),
                image_ext="png",
                text=text,
                meta={"objects": [{"name": n, "x": 0.5, "y": 0.5} for n in names]},
            )
    return Path(out)
