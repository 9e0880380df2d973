"""The training jobs end to end through ``main([...])``: Frozen's smoke config, shortened.

The LM of ``frozen_debug`` must come out bit-identical (frozen under DeepSpeed ZeRO-2)
while the vision tower and prefix train; the export loads into the single-device model.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
import yaml

from helpers import dual_encoder_dir, png

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_frozen_lm_job_keeps_lm_frozen(ray_local, corpus, tmp_path, capsys, load_job):
    from vlforge.models import create_model
    from vlforge.train.export import load_export

    raw = yaml.safe_load((REPO / "jobs" / "configs" / "frozen_lm_smoke.yaml").read_text())
    raw["corpus"] = None
    raw["model"] = "frozen_debug"  # the plumbing with a tiny random LM; the smoke recipe's SmolLM2 is measured apart
    raw["data"]["image"]["size"] = 32
    raw["data"]["shards"] = str(corpus / "scenes" / "train")
    raw["data"]["batch_size"] = 4
    raw["stages"][0]["steps"] = 4
    raw["stages"][0]["schedule"]["warmup_steps"] = 1
    name = f"frozen-{uuid.uuid4().hex[:8]}"
    raw.update(
        name=name,
        storage_path=str(tmp_path / "ray"),
        checkpoint_every=0,
        tracking={
            "enabled": True,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "buffer_dir": str(tmp_path / "buf"),
            "experiment": "frozen-it",
        },
    )
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(raw))

    assert load_job("frozen_lm").main(["--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert f"run {name}" in printed and "caption/loss" in printed

    torch.manual_seed(0)
    initial = create_model("frozen_debug").state_dict()
    exported = load_export(tmp_path / "ray" / name / "export").state_dict()
    lm = [k for k in initial if k.startswith("lm.")]
    assert lm
    for k in lm:
        assert torch.equal(initial[k], exported[k]), f"frozen LM parameter {k} changed"
    assert not torch.equal(initial["prefix.proj.weight"], exported["prefix.proj.weight"])
    assert list((tmp_path / "mlruns" / "frozen-it").glob("*/artifacts/loss_curve.png"))


@pytest.mark.parametrize("job, debug_model", [("vcgpt", "vcgpt_debug"), ("vlkd", "vlkd_debug")])
def test_generative_smoke_job_registers_and_captions_by_alias(
    job, debug_model, ray_local, corpus, mlflow_server, tmp_path, capsys, load_job, monkeypatch
):
    """VC-GPT's and VLKD's smoke configs, shortened and at debug sizes, through Ray Train + DeepSpeed with a
    real ``mlflow server``; the export is registered (``vlforge register``, scored on the test scenes) and
    the pyfunc loaded by alias captions images as the exported module does."""
    import numpy as np
    import pandas as pd

    from vlforge.data.pipeline import decode_image, normalise
    from vlforge.models.io import load_model_dir
    from vlforge.serving.registry import load_by_alias
    from vlforge.workflows.register import register_model_dir

    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    raw = yaml.safe_load((REPO / "jobs" / "configs" / f"{job}_smoke.yaml").read_text())
    raw["corpus"] = None
    raw["model"] = debug_model
    if job == "vlkd":
        raw["model_overrides"] = {"teacher": str(dual_encoder_dir(tmp_path / "teacher"))}
    raw["data"].update(shards=str(corpus / "scenes" / "train"), batch_size=4)
    raw["data"]["image"]["size"] = 32
    raw["data"]["tokenizer"]["max_length"] = 16
    raw["stages"][0].update(steps=4)
    raw["stages"][0]["schedule"]["warmup_steps"] = 1
    name = f"{job}-{uuid.uuid4().hex[:8]}"
    raw.update(
        name=name,
        storage_path=str(tmp_path / "ray"),
        checkpoint_every=0,
        tracking={
            "enabled": True,
            "tracking_uri": mlflow_server.uri,
            "buffer_dir": str(tmp_path / "buf"),
            "experiment": f"{job}-it",
        },
    )
    path = tmp_path / f"{job}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_job(job).main(["--config", str(path)]) == 0
    assert f"run {name}" in capsys.readouterr().out

    export = tmp_path / "ray" / name / "export"
    reg = register_model_dir(
        export,
        f"it-{name}",
        evals=[f"test={corpus / 'scenes' / 'test'}"],
        max_samples=8,
        tracking_uri=mlflow_server.uri,
        experiment=f"{job}-it",
        log=lambda *_: None,
    )
    assert reg.version == "1" and reg.alias == "challenger"
    assert {"eval.test.cider", "eval.test.bleu4", "eval.test.rouge_l"} <= set(reg.tags)
    served = load_by_alias(f"it-{name}", "challenger", tracking_uri=mlflow_server.uri)
    images = [png((200, 40, 40), size=40), png((30, 60, 220), size=40)]
    out = served.predict(pd.DataFrame({"image": images}), params={"max_new_tokens": 6})
    pv = torch.from_numpy(normalise(np.stack([decode_image(b, 32) for b in images]), reg_image(export)))
    assert out["caption"].tolist() == load_model_dir(export).generate(pv, max_new_tokens=6)


def reg_image(export):
    from vlforge.workflows.register import serving_data

    return serving_data(export)[0].image
