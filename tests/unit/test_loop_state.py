"""The worker loop's typed state (``vlforge.train.loop.LoopState``): what a checkpoint saves, read back."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys

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


class _Stop(Exception):
    """Ends a run where its first engine would be built."""


class _Stream:
    """Records when an epoch's batches are opened (an EpochStream's ``batches``)."""

    def __init__(self, name: str, events: list[str]):
        self.name, self.events = name, events

    def batches(self, epoch, rank, world, batch_size, device):
        self.events.append(f"open {self.name} epoch {epoch}")
        return iter([{"sample_id": [0]}])


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        pass


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """The run's events; importing deepspeed is one of them (a stub module, for this test only)."""
    out: list[str] = []

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "deepspeed":
                return None
            out.append("import deepspeed")
            return importlib.util.spec_from_loader(name, _StubLoader())

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # restored (or removed) after the test
    del sys.modules["deepspeed"]
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    return out


def _trainer(events: list[str], restore: tuple[int, bool], streams=("a", "b")):
    from vlforge.config import TrainRunConfig, from_dict
    from vlforge.train.loop import Trainer

    t = Trainer.__new__(Trainer)  # no Ray Train session: only the run order is exercised
    t.cfg = from_dict(
        TrainRunConfig,
        {"method": "vlmo", "stages": [{"name": n, "steps": 1, "objectives": {"itc": 1.0}} for n in "ab"]},
    )
    t.args = WorkerArgs({}, "run", streams={n: _Stream(n, events) for n in streams})
    t.rank, t.world, t.device, t.early = 0, 1, "cpu", {}
    t._restore = lambda: restore
    t._start_tracking = lambda: events.append("tracking")

    def start_stage(si, resume):
        events.append(f"build {si} resume={resume} early={si in t.early}")
        raise _Stop

    t._start_stage = start_stage
    return t


def test_a_fresh_run_opens_its_first_epoch_before_deepspeed_tracking_and_the_engine(events):
    """The first stage's data cold start overlaps DeepSpeed's import, tracking and the engine build."""
    with pytest.raises(_Stop):
        _trainer(events, restore=(0, False)).train()
    assert events == ["open a epoch 0", "import deepspeed", "tracking", "build 0 resume=False early=True"]


def test_a_mid_stage_resume_opens_nothing_ahead(events):
    """A resume skips the batches it consumed, from its saved epoch: no epoch 0 is opened ahead of it."""
    with pytest.raises(_Stop):
        _trainer(events, restore=(1, True)).train()
    assert events == ["import deepspeed", "tracking", "build 1 resume=True early=False"]


def test_a_run_resumed_at_a_stage_boundary_opens_the_next_stage_ahead(events):
    with pytest.raises(_Stop):
        _trainer(events, restore=(1, False)).train()
    assert events == ["open b epoch 0", "import deepspeed", "tracking", "build 1 resume=False early=True"]


def test_the_first_epoch_opens_once_and_only_for_a_stage_with_a_stream(events):
    t = _trainer(events, restore=(0, False), streams=("a",))
    t._open_first_epoch(0)
    t._open_first_epoch(0)
    t._open_first_epoch(1)  # stage b reads Ray Train's dataset shard: nothing to open
    t._open_first_epoch(2)  # past the last stage (a checkpoint taken at the run's end)
    assert events == ["open a epoch 0"] and list(t.early) == [0]
    assert next(t.early.pop(0))["sample_id"] == [0]
