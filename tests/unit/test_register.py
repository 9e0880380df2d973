"""``vlforge register`` and ``vlforge eval NAME@ALIAS`` against a local SQLite MLflow store: a VLMo
export (what a stagewise run writes) is scored, registered as a dual-encoder pyfunc with its figures
as tags, served by alias (embeddings from its dual mode, match probability from its fusion ITM head),
and scored again from the registry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import png
from vlforge.cli import main
from vlforge.workflows.register import eval_name, eval_tags, serving_data

pytestmark = pytest.mark.unit

SPEC = {"model": "vlmo_debug", "method": "vlmo", "overrides": {}}
CONFIG = """\
method: vlmo
model: vlmo_debug
data:
  image: {size: 64}
stages:
  - name: itc
    objectives: {itc: 1.0}
    steps: 1
    data:
      shards: unused
      image: {size: 32, mean: [0.4, 0.4, 0.4], std: [0.3, 0.3, 0.3]}
      tokenizer: {max_length: 12}
"""


COLORS = [(220, 30, 30), (30, 200, 40), (20, 40, 230), (200, 200, 20), (120, 20, 160), (20, 180, 180)]
NAMES = ["red", "green", "blue", "yellow", "purple", "teal"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(0)
    out = save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, tmp_path_factory.mktemp("run") / "export")
    (out / "config.yaml").write_text(CONFIG)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from vlforge.data.shards import ShardWriter

    out = tmp_path_factory.mktemp("sets") / "colors" / "test"
    with ShardWriter(out, samples_per_shard=4, params={"kind": "captions"}) as w:
        for i, (color, name) in enumerate(zip(COLORS, NAMES)):
            w.write(f"{i:06d}", image=png(color), image_ext="png", text=f"a {name} square", meta={})
    return out


def test_serving_data_comes_from_the_export_config_else_the_model(export, tmp_path):
    from vlforge.models.io import build_from_spec, save_model_dir

    data, source = serving_data(export)
    assert source.endswith("config.yaml")
    assert data.image.size == 32 and data.image.mean == (0.4, 0.4, 0.4) and data.image.augment is False
    assert data.tokenizer.max_length == 12
    bare = save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, tmp_path / "bare")
    data, source = serving_data(bare)
    assert source.startswith("the model") and data.image.size == 32 and data.tokenizer.max_length == 16


def test_eval_names_and_tags():
    assert eval_name("data/mine/scenes/test") == ("scenes/test", "data/mine/scenes/test")
    assert eval_name("coco=s3://b/coco/val") == ("coco", "s3://b/coco/val")
    assert eval_name("s3://b/x=y/val") == ("x=y/val", "s3://b/x=y/val")
    tags = eval_tags("coco", {"model": "m", "task": "captions", "i2t_r1": 12.345, "n_texts": 30, "vqa_metric": "vqav2"})
    assert tags == {"eval.coco.i2t_r1": "12.35", "eval.coco.n_texts": "30", "eval.coco.vqa_metric": "vqav2"}


def test_register_a_vlmo_export_serve_it_and_eval_it_by_alias(export, shards, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from vlforge.serving.registry import load_by_alias

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # artifacts of the default experiment land under the test's tmp dir
    code = main(
        [
            "register",
            str(export),
            "--name",
            "stagewise-vlmo",
            "--eval",
            f"colors={shards}",
            "--tag",
            "team=vision",
            "--tracking-uri",
            uri,
            "--experiment",
            "unit-register",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "registered stagewise-vlmo version 1 as @challenger" in out and "config.yaml" in out

    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version_by_alias("stagewise-vlmo", "challenger")
    assert mv.tags["team"] == "vision" and mv.tags["vlforge.method"] == "vlmo"
    assert mv.tags["eval.colors.n_texts"] == "6" and 0.0 <= float(mv.tags["eval.colors.i2t_r1"]) <= 100.0

    model = load_by_alias("stagewise-vlmo", "challenger", tracking_uri=uri)
    images, texts = [png(COLORS[0]), png(COLORS[2])], ["a red square", "a red square"]
    scored = model.predict(pd.DataFrame({"image": images, "text": texts}))
    assert list(scored.columns) == ["score", "match_prob"]

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.data.tokenizer import load_tokenizer
    from vlforge.models.io import load_model_dir

    data, _ = serving_data(export)
    vlmo = load_model_dir(export)
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, 32) for b in images]), data.image))
    tok = load_tokenizer(data.tokenizer)(texts)
    ids, mask = torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])
    with torch.no_grad():
        score = (vlmo.image_embedding(vlmo.encode_image(pv)) * vlmo.text_embedding(vlmo.encode_text(ids, mask))).sum(-1)
        prob = vlmo.itm_logits(vlmo.forward_fusion(pv, ids, mask)).softmax(-1)[:, 1]
    np.testing.assert_allclose(scored["score"].to_numpy(), score.numpy(), atol=1e-5)
    np.testing.assert_allclose(scored["match_prob"].to_numpy(), prob.numpy(), atol=1e-5)

    # The same figures again, scored from the registry with the preprocessing it was registered with.
    report = tmp_path / "row.json"
    code = main(
        [
            "eval",
            "stagewise-vlmo@challenger",
            str(shards),
            "--tracking-uri",
            uri,
            "--json",
            str(report),
            "--mlflow-experiment",
            "unit-eval",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    row = json.loads(report.read_text())
    assert row["model"] == "stagewise-vlmo@challenger" and row["n_texts"] == 6
    assert f"{row['i2t_r1']:.2f}" == mv.tags["eval.colors.i2t_r1"]
    [run] = client.search_runs([client.get_experiment_by_name("unit-eval").experiment_id])
    assert run.data.metrics["i2t_r1"] == pytest.approx(row["i2t_r1"]) and run.info.status == "FINISHED"


def test_register_and_eval_errors(export, shards, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["register", str(export), "--name", "x", "--tag", "novalue", "--tracking-uri", uri]) == 2
    assert "--tag takes KEY=VALUE" in capsys.readouterr().err
    assert main(["register", str(tmp_path / "nowhere"), "--name", "x", "--tracking-uri", uri]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["eval", "no-such-model@champion", str(shards), "--tracking-uri", uri]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["register", str(export)])  # --name is required
