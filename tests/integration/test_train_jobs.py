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
