"""The VLKD loss-weight sweep without Ray: the captioning validation kind and its metrics, the
``CaptionValidator`` on a tiny VLKD with a dual-encoder teacher, and the plan of
``sweeps/vlkd_weights_smoke.yaml`` (trial stage, swept keys, the validator a trial gets)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from helpers import dual_encoder_dir, scene_set
from vlforge.config import VALIDATION_METRICS, ConfigError, DataConfig, ImageConfig, SweepConfig, from_dict

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "sweeps" / "vlkd_weights_smoke.yaml"
WEIGHTS = ("stages.0.objectives.ttd", "stages.0.objectives.itc", "stages.0.objectives.icti")
CAPTION_METRICS = {"val_cider", "val_bleu4", "val_rouge_l", "val_objects_named"}


def _raw(**change):
    return {"experiment": "x.yaml", "space": {"a": {"type": "uniform", "low": 0.0, "high": 1.0}}, **change}


@pytest.mark.parametrize(
    "metric, kind, message",
    [
        ("val_cider", "retrieval", "val_cider is a captioning metric, but validation.kind is retrieval"),
        ("val_objects_named", None, "set validation.kind: captioning"),
        ("val_rmean", "captioning", "val_rmean is a retrieval metric, but validation.kind is captioning"),
    ],
)
def test_a_metric_of_another_validation_kind_is_refused(metric, kind, message):
    validation = {"kind": kind} if kind else {}
    with pytest.raises(ConfigError, match=message):
        from_dict(SweepConfig, _raw(metric=metric, validation=validation))


def test_captioning_metrics_and_kinds():
    assert set(VALIDATION_METRICS["captioning"]) == CAPTION_METRICS
    for kind, metrics in VALIDATION_METRICS.items():
        for metric in (*metrics, "loss"):
            from_dict(
                SweepConfig, _raw(metric=metric, mode="min" if metric == "loss" else "max", validation={"kind": kind})
            )
    with pytest.raises(ConfigError, match="kind"):
        from_dict(SweepConfig, _raw(validation={"kind": "bleu"}))
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        from_dict(SweepConfig, _raw(validation={"kind": "captioning", "max_new_tokens": 0}))


# ----------------------------------------------------------------------------- the validator


SCENES = [
    ("a llama left of a taxi", ["llama", "taxi"]),
    ("a cat above a dog", ["cat", "dog"]),
    ("a taxi below a cat", ["taxi", "cat"]),
    ("a dog right of a llama", ["dog", "llama"]),
]


def _shard_set(out: Path, kind: str = "captions") -> Path:
    return scene_set(out, SCENES, samples_per_shard=3, kind=kind, colour_step=60)


def test_caption_validator_scores_a_tiny_vlkd_and_pickles_without_its_state(tmp_path):
    from vlforge.evaluation.validation import CaptionValidator
    from vlforge.models import create_model

    torch.manual_seed(0)
    model = create_model("vlkd_debug", teacher=str(dual_encoder_dir(tmp_path / "teacher")))
    model.train()
    shards = _shard_set(tmp_path / "scenes" / "val")
    data = DataConfig(image=ImageConfig(size=model.teacher.img_size, augment=False))
    v = CaptionValidator(str(shards), data, max_samples=4, batch_size=3, max_new_tokens=8)
    out = v(model)
    assert set(out) == CAPTION_METRICS
    assert all(isinstance(x, float) and 0.0 <= x <= 100.0 for x in out.values()), out
    assert model.training and v._checked  # the training flag is restored; the set was checked once

    copy = pickle.loads(pickle.dumps(v))
    assert not copy._checked  # the recipe travels, not what this process found
    assert (copy.shards, copy.data, copy.max_samples, copy.max_new_tokens) == (str(shards), data, 4, 8)
    assert copy(model) == out  # greedy captions of an unchanged model: the same figures


def test_caption_validator_refuses_a_set_without_captions_and_bad_sizes(tmp_path):
    from vlforge.evaluation.validation import CaptionValidator

    data = DataConfig(image=ImageConfig(size=32, augment=False))
    vqa = _shard_set(tmp_path / "vqa" / "val", kind="vqa")
    with pytest.raises(ValueError, match="is a vqa shard set"):
        CaptionValidator(str(vqa), data)(torch.nn.Identity())
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        CaptionValidator(str(vqa), data, max_new_tokens=0)


# ----------------------------------------------------------------------------- the smoke sweep's plan


def _smoke_sweep(tmp_path, *overrides: str):
    from vlforge.tune import load_sweep

    return load_sweep(
        SMOKE,
        [f"storage_path={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides],
    )


def test_the_vlkd_smoke_sweep_plans_its_trials(tmp_path):
    """The trial trains the one distillation stage with its three weights (nothing is shared), and its
    validator captions at the experiment's image size (the teacher's, which the run validates)."""
    from vlforge.config import TrainRunConfig, load
    from vlforge.evaluation.validation import CaptionValidator
    from vlforge.models.vlkd import VLKDConfig
    from vlforge.tune import make_plan

    sweep = _smoke_sweep(tmp_path)
    assert set(sweep.space) == set(WEIGHTS) and sweep.metric == "val_cider"
    assert sweep.validation.kind == "captioning" and sweep.validation.shards == "data/corpus/scenes/val"
    assert sweep.validation.max_new_tokens >= VLKDConfig().max_caption_len  # a whole vlkd_debug caption
    plan = make_plan(sweep)
    assert plan.shared == [] and plan.max_reports == 4  # 120 steps, a report every 30
    run = plan.trial_run(dict(zip(WEIGHTS, (0.2, 3.0, 7.5))), "v_00001")
    assert run.method == "vlkd" and run.name == "vlkd_weights_smoke.v_00001"
    assert [s.name for s in run.stages] == ["distill"] and run.stages[0].steps == 120
    assert run.stages[0].objectives == {"ttd": 0.2, "itc": 3.0, "icti": 7.5}
    assert run.checkpoint_every == 30 and run.num_workers == 1 and run.worker_cpus == 0.5
    assert Path(run.model_overrides["teacher"]).is_absolute()

    v = plan.validator(run)
    experiment = load(TrainRunConfig, REPO / "jobs" / "configs" / "vlkd_smoke.yaml")
    assert isinstance(v, CaptionValidator)
    assert v.data.image.size == experiment.data.image.size == 128 and not v.data.image.augment
    assert (v.max_samples, v.max_new_tokens) == (sweep.validation.max_samples, sweep.validation.max_new_tokens)
    assert v.shards == plan.validation_shards and Path(v.shards).is_absolute()
    pickle.loads(pickle.dumps(v))  # it travels to the trial's rank 0


def test_a_vlkd_sweep_key_that_is_no_objective_of_vlkd_is_refused(tmp_path):
    from vlforge.tune import make_plan

    sweep = _smoke_sweep(tmp_path, "space={stages.0.objectives.soft: {type: loguniform, low: 0.1, high: 10.0}}")
    with pytest.raises(ConfigError, match="unknown objectives \\['soft'\\] for method 'vlkd'"):
        make_plan(sweep)


def test_a_retrieval_sweep_still_gets_a_retrieval_validator(tmp_path):
    from vlforge.evaluation.validation import RetrievalValidator
    from vlforge.tune import load_sweep, make_plan

    sweep = load_sweep(
        REPO / "sweeps" / "vlmo_stage3_lr_wd_smoke.yaml",
        [f"storage_path={tmp_path / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    )
    plan = make_plan(sweep)
    assert sweep.validation.kind == "retrieval"
    assert isinstance(plan.validator(plan.trial_run({})), RetrievalValidator)
