"""The worker loop's typed state (``vlforge.train.loop.LoopState``): what a checkpoint saves, read back."""

from __future__ import annotations

import json

import pytest

from vlforge.train.loop import LoopState, WorkerArgs, _step_seed

pytestmark = pytest.mark.unit


def test_state_round_trips_through_json():
    st = LoopState(
        stage_index=1,
        stage="text",
        step=3,
        epoch=2,
        batches_in_epoch=5,
        global_step=7,
        world_size=2,
        zero_stage=2,
        history={"mim/loss": [[1, 2.5]]},
        executed_steps=9,
        resumes=[{"stage": "mim", "step": 2}],
        weights_digest="ab",
        data_wait={"mim": [0.5, 10.0]},
        stream_last_ids=[11, 12],
    )
    back = LoopState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert back == st


def test_older_checkpoints_read_with_defaults():
    raw = {
        "stage_index": 0,
        "stage": "mim",
        "step": 2,
        "epoch": 0,
        "batches_in_epoch": 2,
        "global_step": 2,
        "world_size": 2,
        "zero_stage": 0,
        "history": {"mim/loss": [(1, 3.0), (2, 2.0)]},
        "resumes": [],
        "weights_digest": "x",
        "unknown_future_key": 1,
    }
    st = LoopState.from_dict(raw)
    assert st.executed_steps == 2 and st.data_wait == {} and st.stream_last_ids is None
    assert st.history == {"mim/loss": [[1, 3.0], [2, 2.0]]}


def test_step_seeds_differ_per_step_micro_batch_and_rank():
    seeds = {_step_seed(0, g, m, r) for g in range(20) for m in range(4) for r in range(4)}
    assert len(seeds) == 20 * 4 * 4
    assert _step_seed(3, 5, 1, 0) == _step_seed(3, 5, 1, 0) != _step_seed(4, 5, 1, 0)


def test_worker_args_defaults():
    args = WorkerArgs({"method": "vlmo"}, "run")
    assert args.streams == {} and args.validator is None and args.progress_file is None


def test_gathered_weights_load_with_tied_parameters_named_once():
    """A gathered copy names a tied tensor once (vlkd_debug's BART ties embed_tokens and lm_head to
    ``shared``); it loads, while a truly missing or unexpected tensor is still an error."""
    import pytest
    import torch

    from vlforge.models import create_model
    from vlforge.train.loop import load_gathered

    torch.manual_seed(0)
    src, dst = create_model("vlkd_debug"), create_model("vlkd_debug")
    once = dict(src.named_parameters())  # what a gather of the engine's parameters yields
    once.update(dict(src.named_buffers()))
    assert "student.lm_head.weight" not in once
    load_gathered(dst, {k: v.detach().clone() for k, v in once.items()})
    assert torch.equal(dst.student.lm_head.weight, src.student.lm_head.weight)
    short = {k: v for k, v in once.items() if k != "image_prefix.weight"}
    with pytest.raises(RuntimeError, match="missing.*image_prefix.weight"):
        load_gathered(dst, short)
    with pytest.raises(RuntimeError, match="unexpected.*bogus"):
        load_gathered(dst, {**once, "bogus": torch.zeros(1)})
