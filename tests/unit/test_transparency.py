"""Transparent images: composited over a background colour in decoding (and kept by ingest), never
flattened by dropping alpha. Tiny RGBA, LA, palette and GIF images are built here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlforge.config import DataConfig, ImageConfig
from vlforge.data.images import to_rgb
from vlforge.data.pipeline import decode_image

S = 8  # image side; the left half is opaque artwork, the right half transparent


def _save(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgba() -> Image.Image:
    """Left half opaque blue; right half alpha 0 over stored red (what convert('RGB') would show)."""
    a = np.zeros((S, S, 4), np.uint8)
    a[:, : S // 2] = (0, 0, 255, 255)
    a[:, S // 2 :] = (255, 0, 0, 0)
    return Image.fromarray(a, "RGBA")


def _la() -> Image.Image:
    a = np.zeros((S, S, 2), np.uint8)
    a[:, : S // 2] = (30, 255)
    a[:, S // 2 :] = (0, 0)  # black under full transparency
    return Image.fromarray(a, "LA")


def _palette() -> Image.Image:
    im = Image.new("P", (S, S), 0)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    for y in range(S):
        for x in range(S // 2):
            im.putpixel((x, y), 1)
    im.info["transparency"] = 0
    return im


@pytest.mark.parametrize(
    "make, opaque, fmt",
    [
        (_rgba, (0, 0, 255), "PNG"),
        (_la, (30, 30, 30), "PNG"),
        (_palette, (0, 200, 0), "PNG"),
        (_palette, (0, 200, 0), "GIF"),
    ],
)
def test_decode_composites_transparency_over_the_background(make, opaque, fmt):
    im = make()
    data = _save(im, fmt, transparency=0) if fmt == "GIF" else _save(im)
    white = decode_image(data, S)
    assert tuple(white[0, 0]) == opaque
    assert (white[:, S // 2 + 1 :] == 255).all()  # transparent: white, not the red / black stored under it
    black = decode_image(data, S, background=(0, 0, 0))
    assert (black[:, S // 2 + 1 :] == 0).all()


def test_half_transparent_pixels_blend():
    a = np.zeros((S, S, 4), np.uint8)
    a[..., 3] = 128  # black at half opacity over white
    out = np.asarray(to_rgb(Image.fromarray(a, "RGBA")))
    assert np.abs(out.astype(int) - 127).max() <= 1


def test_opaque_images_are_unchanged():
    a = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(a, "RGB"))), a)


def test_ingest_keeps_alpha_and_the_pipeline_composites_it(tmp_path):
    from vlforge.data.ingest import ingest
    from vlforge.evaluation.data import load_eval_set

    img = tmp_path / "imgs"
    img.mkdir()
    (img / "rgba.png").write_bytes(_save(_rgba()))
    (img / "la.png").write_bytes(_save(_la()))
    (img / "pal.gif").write_bytes(_save(_palette(), "GIF", transparency=0))  # re-encoded by ingest
    (tmp_path / "caps.csv").write_text("file,caption\nrgba.png,a blue half\nla.png,a grey half\npal.gif,a green half\n")
    rep = ingest(img, tmp_path / "caps.csv", tmp_path / "out")
    assert rep.written == 3 and not rep.skipped
    data = DataConfig(image=ImageConfig(size=S, augment=False))
    ev = load_eval_set(str(tmp_path / "out"), data, kind="captions")
    px = np.rint((ev["pixel_values"].numpy() * 0.5 + 0.5) * 255)  # [3, 3, S, S] back to 0-255, file order
    assert px.shape == (3, 3, S, S)
    assert (px[:, :, :, S // 2 + 1 :] == 255).all()
    assert tuple(px[0, :, 0, 0]) == (0, 0, 255) and tuple(px[2, :, 0, 0]) == (0, 200, 0)


def test_background_must_be_rgb_bytes():
    with pytest.raises(ValueError, match="three integers 0-255"):
        ImageConfig(background=(0, 0, 256))
