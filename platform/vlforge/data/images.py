"""Image helpers shared by decoding and ingest: transparency composited over a background colour.

    rgb = to_rgb(Image.open(path), background=(255, 255, 255))

``Image.convert("RGB")`` drops an alpha channel, so transparent pixels show whatever colour
was stored under them (often black, or streaks of the artwork's colours). ``to_rgb`` composites
every kind of transparency PIL knows (an alpha band: RGBA, LA, PA; a palette or colour-key
``transparency`` entry: P, L, RGB) over ``background`` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

WHITE = (255, 255, 255)


def has_transparency(im: PILImage.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def to_rgb(im: PILImage.Image, background: tuple[int, int, int] = WHITE) -> PILImage.Image:
    """``im`` as RGB, any transparency composited over ``background`` (0-255 per channel)."""
    from PIL import Image

    if not has_transparency(im):
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*tuple(int(c) for c in background), 255))
    return Image.alpha_composite(base, rgba).convert("RGB")
