"""Serving a registered model in batch: a vlmo_debug student registered on a real ``mlflow server``
with alias ``champion`` is loaded back as a torch module (same ITC scores as the module that was
registered, same pair score as its pyfunc), and ``jobs/embed.py`` embeds a corpus shard set with
it through Ray Data into Parquet that matches embeddings computed directly."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import png
from vlforge.config import DataConfig, ImageConfig, TokenizerConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}
DATA = DataConfig(image=ImageConfig(size=32, augment=False), tokenizer=TokenizerConfig(max_length=16))


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    from vlforge.models.io import build_from_spec, save_model_dir
    from vlforge.serving.registry import log_and_register

    torch.manual_seed(0)
    model_dir = save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, tmp_path_factory.mktemp("student"))
    name = f"embed-student-{uuid.uuid4().hex[:8]}"
    version = log_and_register(
        model_dir,
        DATA,
        model_name=name,
        tags={"seed": 0},
        alias="champion",
        tracking_uri=mlflow_server.uri,
        experiment=f"it-embed-{uuid.uuid4().hex[:8]}",
    )
    return {"name": name, "dir": model_dir, "version": version, "uri": mlflow_server.uri}


def test_torch_by_alias_matches_registered_module(registered, tmp_path):
    from vlforge.evaluation.retrieval import student_scores
    from vlforge.models.io import load_model_dir
    from vlforge.serving.registry import (
        download_serving_dir,
        load_by_alias,
        load_torch_by_alias,
    )

    name, uri = registered["name"], registered["uri"]
    original = load_model_dir(registered["dir"])
    loaded = load_torch_by_alias(name, "champion", tracking_uri=uri)
    assert type(loaded) is type(original) and not loaded.training

    torch.manual_seed(1)
    pv = torch.randn(3, 3, 32, 32)  # [Ni, 3, H, W]
    ids = torch.randint(1000, 2000, (4, 16))  # [Nt, T]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    assert torch.allclose(student_scores(loaded, pv, ids, mask), student_scores(original, pv, ids, mask), atol=1e-6)

    serving = download_serving_dir(name, "champion", tracking_uri=uri, dst=tmp_path / "dl")
    assert {p.name for p in serving.iterdir()} >= {
        "model.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocess.json",
    }

    image, text = png((30, 160, 60)), "a green square"
    out = load_by_alias(name, "champion", tracking_uri=uri).predict(pd.DataFrame({"image": [image], "text": [text]}))
    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(DATA.tokenizer)([text])
    score = student_scores(
        loaded,
        torch.from_numpy(normalise(decode_image(image, 32)[None], DATA.image)),
        torch.from_numpy(tok["input_ids"]),
        torch.from_numpy(tok["attention_mask"]),
    )
    np.testing.assert_allclose(out["score"].to_numpy(), score[0].numpy(), atol=1e-5)

    with pytest.raises(LookupError, match="no alias 'nope'"):
        load_torch_by_alias(name, "nope", tracking_uri=uri)
    with pytest.raises(LookupError, match="no registered model"):
        download_serving_dir(f"{name}-missing", "champion", tracking_uri=uri)


def test_embed_job_writes_matching_parquet(registered, ray_local, corpus, tmp_path, capsys, load_job):
    import pyarrow.parquet as pq

    from vlforge.data.pipeline import sample_id
    from vlforge.data.shards import read_manifest
    from vlforge.evaluation.data import load_eval_set
    from vlforge.evaluation.inference import encoder_of, image_embeddings, text_embeddings
    from vlforge.models.io import load_model_dir

    job = load_job("embed")
    name, uri = registered["name"], registered["uri"]
    shards, out = corpus / "scenes" / "val", tmp_path / "emb"
    rc = job.main(
        [
            "--model",
            name,
            "--alias",
            "champion",
            str(shards),
            "--out",
            str(out),
            "--tracking-uri",
            uri,
            "--batch-size",
            "16",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"models:/{name}/{registered['version'].version}" in printed.out

    table = pq.read_table(out).to_pandas()
    n = read_manifest(str(shards)).total_samples
    assert len(table) == n and table["key"].is_unique
    assert {"key", "caption", "shard", "image_embedding", "text_embedding"} <= set(table.columns)
    img = np.stack(table["image_embedding"].to_list())  # [N, E]
    txt = np.stack(table["text_embedding"].to_list())  # [N, E]
    assert img.dtype == np.float32 and txt.dtype == np.float32

    student = load_model_dir(registered["dir"])
    enc = encoder_of(student)
    assert img.shape == txt.shape == (n, enc.config.itc_embed_dim)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)

    ref = load_eval_set(str(shards), DATA)
    with torch.no_grad():
        ref_img = image_embeddings(enc, ref["pixel_values"], 64).numpy()  # [N, E]
        ref_txt = text_embeddings(enc, ref["input_ids"], ref["attention_mask"], 64).numpy()  # [N, E]
    assert ref_img.shape == img.shape
    row_of = {sid: i for i, sid in enumerate(ref["sample_id"].tolist())}
    order = [row_of[sample_id(k)] for k in table["key"]]
    np.testing.assert_allclose(img, ref_img[order], atol=1e-5)
    np.testing.assert_allclose(txt, ref_txt[order], atol=1e-5)

    # an existing output is refused before any work, and so is a missing alias
    assert (
        job.main(["--model", name, "--alias", "champion", str(shards), "--out", str(out), "--tracking-uri", uri]) == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (
        job.main(
            ["--model", name, "--alias", "nope", str(shards), "--out", str(tmp_path / "e2"), "--tracking-uri", uri]
        )
        == 2
    )
    assert "no alias 'nope'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert (
        job.main(["--model", name, str(tmp_path / "empty"), "--out", str(tmp_path / "e3"), "--tracking-uri", uri]) == 2
    )
    assert "no .tar shards" in capsys.readouterr().err
