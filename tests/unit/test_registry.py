"""vlforge.serving.registry against a local SQLite MLflow store: a vlmo_debug student is
logged as a models-from-code pyfunc, registered, tagged, aliased, loaded back by alias and
checked against the student module itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import png
from vlforge.config import DataConfig, ImageConfig, TokenizerConfig
from vlforge.serving.directory import prepare_serving_dir
from vlforge.serving.registry import RegisteredVersion, load_by_alias, log_and_register

pytestmark = pytest.mark.unit

SPEC = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}
TEXTS = ["a red square", "a green llama above a taxi", "blue", "a very long caption " * 6]


IMAGES = [
    png((220, 30, 30), size=40, shape="square"),
    png((30, 200, 40), size=40, shape="ellipse"),
    png((20, 40, 230), size=32, shape="square"),
    png((90, 90, 90), size=64, shape="square"),
]


def _data() -> DataConfig:
    return DataConfig(image=ImageConfig(size=32, augment=False), tokenizer=TokenizerConfig(max_length=16))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(0)
    model = build_from_spec(SPEC)
    return save_model_dir(model.state_dict(), SPEC, tmp_path_factory.mktemp("student") / "model")


@pytest.fixture(scope="module")
def registered(student_dir, tmp_path_factory):
    """One registration into a fresh SQLite store with artifacts under the test's tmp dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    mp.setenv("MLFLOW_SECRET_FOR_TEST", "s3cr3t-value-xyz")
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    version = log_and_register(
        student_dir,
        _data(),
        model_name="vlforge-student",
        tags={"stage": "distill", "steps": 12, "api_token": "abc123456", "note": "key s3cr3t-value-xyz"},
        tracking_uri=uri,
        experiment="unit-registry",
        artifact_location=(tmp / "artifacts").as_uri(),
    )
    yield version, uri, tmp
    mp.undo()


def _reference(student_dir, images, texts):
    """What the student module computes directly from the same preprocessing."""
    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.data.tokenizer import load_tokenizer
    from vlforge.models.io import load_model_dir

    data = _data()
    student = load_model_dir(student_dir)
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, 32) for b in images]), data.image))
    tok = load_tokenizer(data.tokenizer)(texts)
    ids, mask = torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])
    enc = student.encoder
    with torch.no_grad():
        img, txt = enc.encode_image(pv), enc.encode_text(ids, mask)
        ie, te = enc.image_embedding(img), enc.text_embedding(txt)
        prob = torch.softmax(student.classify("itm", img.hidden[:, 0], txt.hidden[:, 0]), -1)[:, 1]
    return ie.numpy(), te.numpy(), (ie * te).sum(-1).numpy(), prob.numpy()


def test_prepare_serving_dir(student_dir, tmp_path):
    out = prepare_serving_dir(student_dir, _data(), tmp_path / "serving")
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "preprocess.json",
        "tokenizer.json",
    ]
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre == {
        "image": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "background": [255, 255, 255]},
        "tokenizer": {"max_length": 16, "lowercase": True},
    }
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 30522


def test_prepare_serving_dir_rejects_mismatches(student_dir, tmp_path):
    with pytest.raises(ValueError, match="image.size is 64"):
        prepare_serving_dir(student_dir, DataConfig(tokenizer=TokenizerConfig(max_length=16)), tmp_path / "a")
    with pytest.raises(ValueError, match="max_length 32 exceeds"):
        prepare_serving_dir(student_dir, DataConfig(image=ImageConfig(size=32)), tmp_path / "b")
    from vlforge.models.io import save_model_dir

    other = save_model_dir({}, {"model": "vlkd_debug", "method": "mystery"}, tmp_path / "other")
    with pytest.raises(ValueError, match="method 'distill'.*got method 'mystery'"):
        prepare_serving_dir(other, _data(), tmp_path / "c")


def test_version_tags_alias(registered):
    from mlflow import MlflowClient

    version, uri, _ = registered
    assert isinstance(version, RegisteredVersion)
    assert (version.name, version.version, version.alias) == ("vlforge-student", "1", "challenger")
    assert version.model_uri == "models:/vlforge-student/1"
    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version("vlforge-student", "1")
    assert mv.status == "READY" and mv.run_id == version.run_id
    assert mv.tags["stage"] == "distill" and mv.tags["steps"] == "12"
    assert mv.tags["api_token"] == "<redacted>" and mv.tags["note"] == "key ***"
    assert str(client.get_model_version_by_alias("vlforge-student", "challenger").version) == "1"
    assert client.get_run(version.run_id).info.status == "FINISHED"


def test_no_pickles_in_logged_model(registered):
    import mlflow
    from mlflow import MlflowClient

    version, uri, tmp = registered
    location = MlflowClient(tracking_uri=uri).get_model_version_download_uri(version.name, version.version)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=uri, dst_path=str(tmp / "download"))
    )
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))], names
    assert str(tmp / "artifacts") in location  # the experiment's artifact location, not ./mlruns
    assert "pyfunc_model.py" in names and "artifacts/model/model.safetensors" in names
    assert "artifacts/model/tokenizer.json" in names and "artifacts/model/preprocess.json" in names
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "safetensors==" in reqs and "pillow==" in reqs and "+cpu" not in reqs


def test_pyfunc_by_alias_matches_student(registered, student_dir):
    _, uri, _ = registered
    model = load_by_alias("vlforge-student", "challenger", tracking_uri=uri)
    ie, te, score, prob = _reference(student_dir, IMAGES, TEXTS)

    emb_i = model.predict(pd.DataFrame({"image": IMAGES}))
    assert list(emb_i.columns) == ["image_embedding"]
    got_i = np.array(emb_i["image_embedding"].tolist())
    assert got_i.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got_i, ie, atol=1e-5)

    emb_t = model.predict(pd.DataFrame({"text": TEXTS}))
    got_t = np.array(emb_t["text_embedding"].tolist())
    assert got_t.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(got_t, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got_t, te, atol=1e-5)

    pairs = model.predict(pd.DataFrame({"image": IMAGES, "text": TEXTS}, index=[10, 11, 12, 13]))
    assert list(pairs.columns) == ["score", "match_prob"] and list(pairs.index) == [10, 11, 12, 13]
    np.testing.assert_allclose(pairs["score"].to_numpy(), score, atol=1e-5)
    np.testing.assert_allclose(pairs["score"].to_numpy(), (got_i * got_t).sum(1), atol=1e-5)
    np.testing.assert_allclose(pairs["match_prob"].to_numpy(), prob, atol=1e-5)

    forced = model.predict(pd.DataFrame({"image": IMAGES, "text": TEXTS}), params={"mode": "embed_text"})
    np.testing.assert_allclose(np.array(forced["text_embedding"].tolist()), te, atol=1e-5)


def test_pyfunc_batches_beyond_64_rows(registered, student_dir):
    _, uri, _ = registered
    model = load_by_alias("vlforge-student", "challenger", tracking_uri=uri)
    texts = [f"caption number {i}" for i in range(70)]
    got = np.array(model.predict(pd.DataFrame({"text": texts}))["text_embedding"].tolist())
    _, te, _, _ = _reference(student_dir, IMAGES[:1], texts[:1])
    assert got.shape == (70, 32)
    np.testing.assert_allclose(got[0], te[0], atol=1e-5)


def test_pyfunc_bad_input(registered):
    _, uri, _ = registered
    model = load_by_alias("vlforge-student", "challenger", tracking_uri=uri)
    with pytest.raises(Exception, match="needs an 'image' column"):
        model.predict(pd.DataFrame({"caption": ["a llama"]}))
    with pytest.raises(Exception, match=r"mode 'score' needs column"):
        model.predict(pd.DataFrame({"text": ["a llama"]}), params={"mode": "score"})
    with pytest.raises(Exception, match="could not be decoded"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
