"""Feature-cache sets in the pipeline: ``.npy`` feature grids read as ``pixel_values`` without Ray.

The cache builder itself (Ray Data, the real EfficientNet-Lite0) is tested in
``tests/integration/test_feature_cache.py``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from vlforge.data.shards import ShardWriter

pytestmark = pytest.mark.unit


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _feature_pair_set(path, n: int = 3, shape=(8, 2, 2)):
    rng = np.random.default_rng(0)
    feats = [tuple(rng.standard_normal(shape).astype(np.float16) for _ in range(2)) for _ in range(n)]
    with ShardWriter(path, samples_per_shard=2, params={"kind": "nlvr2"}) as w:
        for i, (left, right) in enumerate(feats):
            w.write(
                f"pair-{i:04d}",
                image=_npy(left),
                image_ext="npy",
                text=f"statement {i}",
                meta={"label": i % 2 == 0, "relation_holds": [True, i % 2 == 0]},
                extra={"right.npy": _npy(right)},
            )
    return feats


def test_cached_features_read_as_pixel_values_unaugmented(tmp_path):
    from vlforge.config import DataConfig, ImageConfig
    from vlforge.data.pipeline import decode_batch, raw_row
    from vlforge.data.shards import iter_samples, list_shards
    from vlforge.evaluation.data import load_eval_set

    feats = _feature_pair_set(tmp_path / "cache")
    ev = load_eval_set(str(tmp_path / "cache"), DataConfig(image=ImageConfig(size=128)))
    pv, pv2 = np.asarray(ev["pixel_values"]), np.asarray(ev["pixel_values_2"])
    assert pv.dtype == np.float32 and pv.shape == (3, 8, 2, 2)
    np.testing.assert_array_equal(pv, np.stack([f[0] for f in feats]).astype(np.float32))
    np.testing.assert_array_equal(pv2, np.stack([f[1] for f in feats]).astype(np.float32))
    assert ev["label"].tolist() == [1, 0, 1] and ev["image_truth"].tolist() == [[1, 1], [1, 0], [1, 1]]

    # training decode: augmentation (shift, brightness) applies to pixels only, never to features
    rows = [raw_row(s, url, i) for url in list_shards(str(tmp_path / "cache")) for i, s in enumerate(iter_samples(url))]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["index"] = batch["index"].astype(np.int64)
    image = ImageConfig(size=128, augment=True, max_shift=0.2, brightness=0.5)
    out = decode_batch(batch, image=image, tokenizer=DataConfig().tokenizer, kind="nlvr2", train=True, seed=3)
    np.testing.assert_array_equal(out["pixel_values"], np.stack([f[0] for f in feats]).astype(np.float32))


def test_feature_members_and_bad_features():
    from vlforge.data.pipeline import decode_pixels_or_features, raw_row

    row = raw_row({"__key__": "k", "npy": b"L", "right.npy": b"R", "txt": b"t"}, "u")
    assert (row["image"], row["image_2"], row["text"]) == (b"L", b"R", b"t")
    with pytest.raises(ValueError, match="not a cached feature grid"):
        decode_pixels_or_features(_npy(np.zeros((2, 2), np.float16)), 128)  # not [C, h, w]
    with pytest.raises(ValueError, match="not a cached feature grid"):
        decode_pixels_or_features(_npy(np.zeros((2, 2, 2), np.float64)), 128)
    # a sample with an image and an .npy member (a third-party embedding, say) reads the image
    row = raw_row({"__key__": "k", "jpg": b"I", "npy": b"N", "txt": b"t"}, "u")
    assert row["image"] == b"I"


def test_cache_location_and_which_models_have_a_locked_tokenizer():
    from vlforge.workflows.features import cache_uri, model_tokenizer

    assert cache_uri("s3://b/corpus/nlvr2/train/", "efficientnet_lite0", 128) == (
        "s3://b/corpus/nlvr2/train.features/efficientnet_lite0-128"
    )
    assert model_tokenizer("vlmo_small_effnet", {"vl_layers": 0}) == ("efficientnet_lite0", 128)
    assert model_tokenizer("vlmo_debug") is None  # a conv patch embedding learns: nothing to cache
