"""vlforge.serving.registry against a real ``mlflow server`` (proxied artifacts): two
registrations of a vlmo_debug student give versions 1 and 2, the alias follows the newest,
and the pyfunc loaded by alias scores an image-text pair like the student module does."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import png
from vlforge.config import DataConfig, ImageConfig, TokenizerConfig
from vlforge.serving.registry import load_by_alias, log_and_register

pytestmark = pytest.mark.integration

SPEC = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}


def _student(seed: int, out):
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(seed)
    return save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, out)


def test_register_twice_alias_and_score(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    uri = mlflow_server.uri
    data = DataConfig(image=ImageConfig(size=32, augment=False), tokenizer=TokenizerConfig(max_length=16))
    name = f"student-{uuid.uuid4().hex[:8]}"
    experiment = f"it-registry-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=uri)

    first = log_and_register(
        _student(0, tmp_path / "s0"), data, model_name=name, tags={"seed": 0}, tracking_uri=uri, experiment=experiment
    )
    # the second goes into an existing (still running) run, as a training job would pass its own
    run = client.create_run(client.get_experiment_by_name(experiment).experiment_id)
    second_dir = _student(1, tmp_path / "s1")
    second = log_and_register(
        second_dir,
        data,
        model_name=name,
        tags={"seed": 1},
        run_id=run.info.run_id,
        tracking_uri=uri,
        experiment=experiment,
    )

    assert (first.version, second.version) == ("1", "2")
    assert second.run_id == run.info.run_id and client.get_run(run.info.run_id).info.status == "RUNNING"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert set(versions) == {"1", "2"} and all(v.status == "READY" for v in versions.values())
    assert versions["1"].tags["seed"] == "0" and versions["2"].tags["seed"] == "1"

    model = load_by_alias(name, "challenger", tracking_uri=uri)
    image, text = png((200, 40, 40)), "a red square"
    out = model.predict(pd.DataFrame({"image": [image], "text": [text]}))
    assert list(out.columns) == ["score", "match_prob"]

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.data.tokenizer import load_tokenizer
    from vlforge.models.io import load_model_dir

    student = load_model_dir(second_dir)
    pv = torch.from_numpy(normalise(decode_image(image, 32)[None], data.image))
    tok = load_tokenizer(data.tokenizer)([text])
    with torch.no_grad():
        enc = student.encoder
        ie = enc.image_embedding(enc.encode_image(pv))
        te = enc.text_embedding(
            enc.encode_text(torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"]))
        )
    np.testing.assert_allclose(out["score"].to_numpy(), (ie * te).sum(-1).numpy(), atol=1e-5)
    assert 0.0 <= float(out["match_prob"].iloc[0]) <= 1.0
