"""Feature caches built by Ray Data with the real locked EfficientNet-Lite0, read back by the pipeline."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def test_cache_holds_the_towers_features_and_is_rebuilt_when_its_source_changes(ray_local, corpus, tmp_path):
    import torch

    from vlforge.config import DataConfig, ImageConfig
    from vlforge.data.pipeline import build_dataset, decode_image, normalise
    from vlforge.data.shards import MANIFEST, iter_samples, list_shards
    from vlforge.models.image_tokenizer import create_image_tokenizer
    from vlforge.workflows.features import ensure_feature_cache

    src = tmp_path / "nlvr2" / "train"
    shutil.copytree(corpus / "nlvr2" / "train", src)
    image = ImageConfig(size=128)
    lines: list[str] = []
    c = ensure_feature_cache(str(src), "efficientnet_lite0", image, log=lines.append)
    total = json.loads((src / MANIFEST).read_text())["total_samples"]
    assert c.built and c.samples == total and c.skipped == {}
    assert c.uri == f"{src}.features/efficientnet_lite0-128"
    assert any("computing efficientnet_lite0 features" in line for line in lines)

    # one cache shard per source shard, the same samples in the same order
    src_shards, cache_shards = list_shards(str(src)), list_shards(c.uri)
    assert len(cache_shards) == len(src_shards)
    for a, b in zip(src_shards, cache_shards):
        assert [x["__key__"] for x in iter_samples(a)] == [x["__key__"] for x in iter_samples(b)]
    # the first sample's cached grids are the tower's features of its decoded (unaugmented) images
    first = next(iter_samples(list_shards(str(src))[0]))
    cached = next(iter_samples(list_shards(c.uri)[0]))
    assert cached["__key__"] == first["__key__"] and cached["txt"] == first["txt"]
    tok = create_image_tokenizer("efficientnet_lite0", 128)
    for img, npy in ((first["jpg"], cached["npy"]), (first["right.jpg"], cached["right.npy"])):
        pixels = torch.from_numpy(normalise(decode_image(img, 128)[None], image))
        want = tok(pixels)[0].numpy()  # [1280, 4, 4]
        got = np.load(io.BytesIO(npy)).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)

    # Ray Data reads the cache as a shard set: features in pixel_values, labels and truths as before
    ds, _ = build_dataset(DataConfig(shards=c.uri, image=image, batch_size=8), train=True)
    batch = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (8, 1280, 4, 4)
    assert batch["pixel_values"].dtype == np.float32 and set(batch["label"].tolist()) <= {0, 1}
    assert batch["image_truth"].shape == (8, 2)

    again = ensure_feature_cache(str(src), "efficientnet_lite0", image)
    assert not again.built and again.samples == total
    # a rebuilt source set (another manifest) makes the cache stale: it is rebuilt
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["params"]["rebuilt"] = True
    (src / MANIFEST).write_text(json.dumps(manifest))
    assert ensure_feature_cache(str(src), "efficientnet_lite0", image).built


def test_bad_samples_are_left_out_of_the_cache_and_counted(ray_local, tmp_path):
    import importlib.util
    from pathlib import Path

    from vlforge.config import ImageConfig
    from vlforge.data.shards import iter_samples, list_shards
    from vlforge.workflows.features import ensure_feature_cache

    # tests/conftest.py's writer (``conftest`` alone names this tier's conftest here); its cut-off
    # tail shard is outside the manifest, so the cache never reads it
    spec = importlib.util.spec_from_file_location("_tests_conftest", Path(__file__).parents[1] / "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    info = shared.write_bad_shards(tmp_path / "set")
    c = ensure_feature_cache(str(tmp_path / "set"), "efficientnet_lite0", ImageConfig(size=128))
    want = {k: v for k, v in info["bad"].items() if k != "truncated_member"}
    assert c.skipped == want
    keys = [s["__key__"] for url in list_shards(c.uri) for s in iter_samples(url)]
    assert keys == [k for k in info["good_keys"] if k.startswith("s")]
