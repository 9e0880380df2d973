"""Training configs: strict loading, early validation, DeepSpeed config building, schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlforge.config import ConfigError, DeepSpeedConfig, TrainRunConfig, from_dict, load

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _raw(**extra):
    raw = {
        "model": "vlmo_debug",
        "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
        "stages": [{"name": "a", "objectives": {"mim": 1.0}, "steps": 4}],
    }
    raw.update(extra)
    return raw


@pytest.mark.parametrize(
    "name",
    [
        "vlmo_stagewise",
        "vlmo_stagewise_smoke",
        "frozen_lm",
        "frozen_lm_smoke",
        "vcgpt",
        "vcgpt_smoke",
        "vlkd",
        "vlkd_smoke",
    ],
)
def test_job_configs_load_strictly(name):
    cfg = load(TrainRunConfig, REPO / "jobs" / "configs" / f"{name}.yaml")
    assert cfg.stages
    assert load(TrainRunConfig, REPO / "jobs" / "configs" / f"{name}.yaml", ["num_workers=4"]).num_workers == 4


def test_vlmo_smoke_stages_follow_the_paper():
    cfg = load(TrainRunConfig, REPO / "jobs" / "configs" / "vlmo_stagewise_smoke.yaml")
    assert [set(s.objectives) for s in cfg.stages] == [{"mim"}, {"mlm_text"}, {"itc", "itm", "mlm"}]
    assert cfg.stages[2].objectives["mlm"] == 0.25
    assert "blocks.*.experts.l.*" in cfg.stages[1].trainable and "*" not in cfg.stages[1].trainable


@pytest.mark.parametrize(
    "change, message",
    [
        ({"deepspeed": {"zero_stage": 4}}, "zero_stage must be 0, 1, 2 or 3"),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "offload_optimizer needs zero_stage >= 1"),
        ({"stages": []}, "at least one stage"),
        ({"stages": [{"name": "a", "objectives": {"mim": 0.0}}]}, "non-zero weight"),
        ({"stages": [{"name": "a", "objectives": {"mim": 1}}, {"name": "a", "objectives": {"mim": 1}}]}, "unique"),
        (
            {"stages": [{"name": "a", "objectives": {"mim": 1}, "steps": 3, "schedule": {"warmup_steps": 3}}]},
            "warmup_steps",
        ),
        ({"stages": [{"name": "a", "objectives": {"mim": 1}, "stepz": 3}]}, "unknown key stages"),
        ({"deepspeed": {"zero_stage": "two"}}, "expected int"),
    ],
)
def test_impossible_settings_fail_at_load(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainRunConfig, _raw(**change))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"stages": [{"name": "a", "objectives": {"mim": 1.0}, "trainable": ["blocks.*.experts.typo.*"]}]},
            "match no parameter",
        ),
        ({"data": {"image": {"size": 64}, "tokenizer": {"max_length": 16}}}, "image.size 64 != vlmo_debug img_size 32"),
        ({"data": {"image": {"size": 32}, "tokenizer": {"max_length": 32}}}, "max_text_len 16"),
        ({"stages": [{"name": "a", "objectives": {"mim": 1.0}, "init": "/no/such/checkpoint"}]}, "does not exist"),
        ({"model": "vlmo_nope"}, "unknown model"),
        ({"stages": [{"name": "a", "objectives": {"nope": 1.0}}]}, "unknown objectives"),
    ],
)
def test_validate_before_ray(change, message):
    from vlforge.train.runner import validate

    with pytest.raises(ConfigError, match=message):
        validate(from_dict(TrainRunConfig, _raw(**change)))


def test_unknown_objectives_name_the_method_and_the_known_ones():
    """The objective names are the method's task's declarations (``vlforge.tasks``, above the config layer):
    loading does not know them, ``check_stages`` refuses a name the task does not declare."""
    from vlforge.tasks import check_stages

    cfg = from_dict(TrainRunConfig, _raw(stages=[{"name": "a", "objectives": {"nope": 1.0, "mim": 1.0}}]))
    known = r"\['mim', 'mlm_text', 'itc', 'itm', 'itm_swap', 'mlm'\]"
    with pytest.raises(ConfigError, match=rf"stage a: unknown objectives \['nope'\] for method 'vlmo'; known: {known}"):
        check_stages(cfg)
    check_stages(from_dict(TrainRunConfig, _raw()))


def test_every_method_has_a_task_that_declares_its_objectives():
    from typing import get_args, get_type_hints

    from vlforge.tasks import OBJECTIVES_BY_METHOD, TASK_BY_METHOD
    from vlforge.tasks.caption import CaptionTask
    from vlforge.tasks.distill import DistillationTask, FusionFinetuneTask
    from vlforge.tasks.vlkd import VLKDTask
    from vlforge.tasks.vlmo import VLMoPretrainTask

    methods = set(get_args(get_type_hints(TrainRunConfig)["method"]))
    assert set(TASK_BY_METHOD) == set(OBJECTIVES_BY_METHOD) == methods
    assert OBJECTIVES_BY_METHOD == {
        "vlmo": VLMoPretrainTask.OBJECTIVES,
        "frozen": CaptionTask.OBJECTIVES,
        "vcgpt": CaptionTask.OBJECTIVES,
        "vlkd": VLKDTask.OBJECTIVES,
        "fusion": FusionFinetuneTask.OBJECTIVES,
        "distill": DistillationTask.OBJECTIVES,
    }
    assert OBJECTIVES_BY_METHOD["vlkd"] == ("ttd", "itc", "icti")
    assert OBJECTIVES_BY_METHOD["fusion"] == ("hard", "image_truth")


def test_deepspeed_config_overrides_merged_last():
    from vlforge.train.engine import deepspeed_config

    cfg = DeepSpeedConfig(
        zero_stage=3,
        grad_accum=2,
        clip_grad=0.5,
        offload_optimizer=True,
        overrides={
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
            "gradient_clipping": 2.0,
            "bf16": {"enabled": True},
        },
    )
    ds = deepspeed_config(cfg, micro_batch=4, world_size=2, on_gpu=False)
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2  # the override wins
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # untouched keys stay
    assert ds["gradient_clipping"] == 2.0 and ds["bf16"]["enabled"] is True
    assert "optimizer" not in ds  # a torch optimizer object is passed instead (no fused_adam compile)
    plain = deepspeed_config(DeepSpeedConfig(zero_stage=0, clip_grad=0), micro_batch=8, world_size=1, on_gpu=False)
    assert plain["bf16"]["enabled"] is False and "gradient_clipping" not in plain
    assert deepspeed_config(DeepSpeedConfig(), micro_batch=8, world_size=1, on_gpu=True)["bf16"]["enabled"] is True


def test_schedule_warmup_then_cosine():
    from vlforge.config import ScheduleConfig
    from vlforge.train.engine import make_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_schedule(opt, ScheduleConfig(kind="cosine", warmup_steps=2, min_lr_ratio=0.1), steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] >= 0.1


def test_optimizer_gets_trainable_params_only():
    from vlforge.config import OptimizerConfig
    from vlforge.models import create_model
    from vlforge.models.trainable import param_groups, set_trainable
    from vlforge.train.engine import make_optimizer

    model = create_model("vlmo_debug")
    names = set_trainable(model, ["text_embed.*", "heads.mlm.*"])
    opt = make_optimizer(param_groups(model, 0.01), OptimizerConfig(), offload=False)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert {by_id[i] for i in in_opt} == set(names)


@pytest.mark.parametrize(
    "name", ["vlmo_stagewise", "vlmo_stagewise_smoke", "frozen_lm", "frozen_lm_smoke", "vcgpt", "vcgpt_smoke"]
)
def test_job_configs_pass_validation(name):
    from vlforge.train.runner import validate

    validate(load(TrainRunConfig, REPO / "jobs" / "configs" / f"{name}.yaml"))


def test_every_smoke_config_builds_the_same_corpus():
    """data/corpus is rebuilt when a job asks for other corpus parameters: the smoke configs that
    build it must agree, or running one job after another rebuilds it (and shrinks the eval sets)."""
    import yaml

    from vlforge.config import CorpusConfig, TwoStageConfig, load

    want = load(TwoStageConfig, REPO / "jobs" / "configs" / "two_stage_smoke.yaml").corpus
    for path in sorted((REPO / "jobs" / "configs").glob("*_smoke.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw.get("corpus"), dict) and "two_stage" not in path.name:
            got = load(CorpusConfig, None, [f"{k}={v}" for k, v in raw["corpus"].items() if k != "out"])
            assert (got.n_scenes, got.n_vqa, got.n_nlvr2, got.n_concepts, got.seed) == (
                want.n_scenes,
                want.n_vqa,
                want.n_nlvr2,
                want.n_concepts,
                want.seed,
            ), path.name


def test_vlkd_smoke_validates_against_its_teacher(tmp_path):
    """vlkd_smoke names the main job's distilled student; with one there (here a tiny one of the same
    image size) the config validates, and without one the error names the missing directory."""
    from vlforge.models.io import build_from_spec, save_model_dir
    from vlforge.train.runner import validate

    path = REPO / "jobs" / "configs" / "vlkd_smoke.yaml"
    with pytest.raises(FileNotFoundError, match="VLKD teacher: no model directory at .*nowhere"):
        validate(load(TrainRunConfig, path, [f"model_overrides.teacher={tmp_path / 'nowhere'}"]))
    spec = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0, "img_size": 128}}
    teacher = save_model_dir(build_from_spec(spec).state_dict(), spec, tmp_path / "teacher")
    validate(load(TrainRunConfig, path, [f"model_overrides.teacher={teacher}"]))


def test_resolve_makes_the_vlkd_teacher_path_absolute(tmp_path, monkeypatch):
    """Train workers run in other directories: a relative teacher directory is resolved on the driver."""
    from vlforge.train.runner import resolve

    monkeypatch.chdir(tmp_path)
    cfg = load(TrainRunConfig, REPO / "jobs" / "configs" / "vlkd_smoke.yaml", ["tracking.enabled=false"])
    out = resolve(cfg)
    assert out.model_overrides["teacher"] == str(
        tmp_path / "out/two_stage/vlkd-teacher.student-distilled/stages/retrieval"
    )
    assert cfg.model_overrides["teacher"].startswith("out/")  # the loaded config is left as it was
