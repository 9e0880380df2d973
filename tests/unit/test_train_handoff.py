"""Stage hand-off: module weights only, from an export or a DeepSpeed checkpoint, shapes restored."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.unit


def test_lift_scalars_and_fit_shapes_round_trip():
    from vlforge.models import create_model
    from vlforge.train.engine import fit_shapes, lift_scalars

    model = create_model("vlmo_debug")
    lifted = lift_scalars(model)
    assert lifted == ["heads.itc.logit_scale"]
    assert model.heads["itc"].logit_scale.shape == (1,)
    fresh = create_model("vlmo_debug")
    fresh.load_state_dict(fit_shapes(model.state_dict(), fresh), strict=True)
    assert fresh.heads["itc"].logit_scale.shape == ()
    assert torch.equal(fresh.heads["itc"].logit_scale.reshape(1), model.heads["itc"].logit_scale)


def test_handoff_from_export_and_zero0_checkpoint_loads_weights_only(tmp_path):
    from safetensors.torch import save_file

    from vlforge.models import create_model
    from vlforge.train.checkpoint import TAG, module_weights
    from vlforge.train.engine import fit_shapes

    torch.manual_seed(1)
    src = create_model("vlmo_debug")
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(export / "model.safetensors"))
    (export / "model.json").write_text(json.dumps({"model": "vlmo_debug", "overrides": {}}))
    # A ZeRO-0 DeepSpeed checkpoint: task-level names ("model." prefix), optimizer state beside it.
    ckpt = tmp_path / "ckpt" / TAG
    ckpt.mkdir(parents=True)
    torch.save(
        {
            "module": {f"model.{k}": v for k, v in src.state_dict().items()},
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}},
        },
        ckpt / "mp_rank_00_model_states.pt",
    )

    for path in (export, tmp_path / "ckpt"):
        torch.manual_seed(2)
        dst = create_model("vlmo_debug")
        weights = module_weights(path)
        assert not any(k.startswith("model.") or "optimizer" in k for k in weights)
        dst.load_state_dict(fit_shapes(weights, dst), strict=True)
        for k, v in src.state_dict().items():
            assert torch.equal(v, dst.state_dict()[k]), k


def test_module_weights_rejects_other_dirs(tmp_path):
    from vlforge.train.checkpoint import module_weights

    with pytest.raises(FileNotFoundError, match="neither an export"):
        module_weights(tmp_path)


def test_resume_on_other_worker_count_says_how_to_convert():
    from vlforge.train.checkpoint import CheckpointMismatch, check_resumable

    state = {"stage": "vl", "step": 10, "world_size": 4, "zero_stage": 2}
    with pytest.raises(CheckpointMismatch, match="ds_to_universal"):
        check_resumable(state, world_size=2, zero_stage=2)
    check_resumable(state, world_size=4, zero_stage=2)
    with pytest.raises(CheckpointMismatch, match="same zero_stage"):
        check_resumable(state, world_size=4, zero_stage=3)


def test_driver_refuses_resume_with_other_worker_count_before_ray(tmp_path):
    from vlforge.config import TrainRunConfig, from_dict
    from vlforge.train.checkpoint import CheckpointMismatch
    from vlforge.train.runner import check_existing_run

    ckpt = tmp_path / "run1" / "checkpoint_2026-01-01_00-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "vlforge_state.json").write_text(
        json.dumps({"stage_index": 0, "stage": "a", "step": 2, "global_step": 2, "world_size": 2, "zero_stage": 2})
    )
    raw = {
        "model": "vlmo_debug",
        "name": "run1",
        "storage_path": str(tmp_path),
        "num_workers": 4,
        "stages": [{"name": "a", "objectives": {"mim": 1.0}}],
    }
    with pytest.raises(CheckpointMismatch, match="written by 2 workers .* this run has 4"):
        check_existing_run(from_dict(TrainRunConfig, raw))
    check_existing_run(from_dict(TrainRunConfig, {**raw, "num_workers": 2}))
