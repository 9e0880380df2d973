"""The learning-per-minute bench's bookkeeping: report steps, samples, time to a target, the ratio."""

from __future__ import annotations

import pytest

from vlforge.config import DataConfig, StageConfig, TrainRunConfig
from vlforge.workflows.learning_bench import CurvePoint, _samples, checkpoint_steps, summarise, time_to


def _run(every: int) -> TrainRunConfig:
    data = DataConfig(shards="x", batch_size=8)
    stages = [
        StageConfig(name="a", objectives={"itc": 1.0}, steps=20),
        StageConfig(name="b", objectives={"itc": 1.0}, steps=15),
    ]
    return TrainRunConfig(name="r", model="vlmo_debug", data=data, stages=stages, num_workers=2, checkpoint_every=every)


def test_checkpoint_steps_follow_the_loop():
    # the loop reports every `checkpoint_every` steps of a stage and at each stage end, once
    assert checkpoint_steps(_run(10)) == [10, 20, 30, 35]
    assert checkpoint_steps(_run(7)) == [7, 14, 20, 27, 34, 35]
    assert checkpoint_steps(_run(0)) == [20, 35]


def test_samples_count_the_global_batch():
    run = _run(10)
    assert _samples(run, 10) == 10 * 16
    assert _samples(run, 35) == 35 * 16


def _pts(system, rows):
    return [CurvePoint(system, i + 1, t, 0, r, r) for i, (t, r) in enumerate(rows)]


def test_time_to_interpolates_and_says_never():
    pts = _pts("x", [(10.0, 5.0), (20.0, 15.0), (30.0, 25.0)])
    assert time_to(pts, 10.0) == pytest.approx(15.0)
    assert time_to(pts, 4.0) == pytest.approx(10.0)  # reached at the first point
    assert time_to(pts, 30.0) is None


def test_summary_ratio_is_platform_over_torch():
    curves = {
        "platform": _pts("platform", [(60.0, 10.0), (120.0, 40.0)]),
        "torch": _pts("torch", [(10.0, 20.0), (20.0, 50.0)]),
    }
    s = summarise(curves)
    assert s["target_r1"] == pytest.approx(32.0)  # 0.8 x the lower final (40)
    assert s["platform_seconds_to_target"] == pytest.approx(60 + 22 / 30 * 60)
    assert s["torch_seconds_to_target"] == pytest.approx(10 + 12 / 30 * 10)
    assert s["time_ratio"] == pytest.approx(s["platform_seconds_to_target"] / s["torch_seconds_to_target"])
