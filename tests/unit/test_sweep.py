"""Sweep files and the sweep plan without Ray: strict loading, the search space, shared runs vs trial
runs, swept keys that would change a shared run, and the results (table, best config, plot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlforge.config import (
    VALIDATION_METRICS,
    ConfigError,
    SweepConfig,
    TrainRunConfig,
    TwoStageConfig,
    from_dict,
    load,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "sweeps"


def _sweep(tmp_path, corpus, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("CORPUS", str(corpus)).replace("OUT", str(tmp_path / "out")))
    return path


DISTILL = """
experiment: jobs/configs/two_stage_smoke.yaml
job: two_stage
set: [data_root=CORPUS, corpus=null]
trial_stages: [pretrain, retrieval]
space:
  student.stages.0.objectives.attn,student.stages.1.objectives.attn: {type: loguniform, low: 0.1, high: 10.0}
  student.stages.0.temperature: {type: choice, values: [1.0, 2.0]}
report_every: 10
storage_path: OUT
tracking: {tracking_uri: "sqlite:///OUT/mlflow.db"}
"""

STAGE3 = """
experiment: jobs/configs/vlmo_stagewise_smoke.yaml
job: train
set: [corpus=null, data.shards=CORPUS/scenes/train, stages.0.data.shards=CORPUS/concepts/train]
trial_stages: [vl]
space:
  stages.2.optimizer.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
  stages.2.optimizer.weight_decay: {type: grid, values: [0.0, 0.1]}
report_every: 10
validation: {shards: CORPUS/scenes/val}
storage_path: OUT
tracking: {tracking_uri: "sqlite:///OUT/mlflow.db"}
"""


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_has_a_smoke_twin(path):
    from vlforge.tune import load_sweep

    sweep = load_sweep(path)
    assert sweep.name == path.stem and Path(sweep.experiment).is_file()
    assert sweep.space and sweep.metric in VALIDATION_METRICS[sweep.validation.kind]
    if not path.stem.endswith("_smoke"):
        twin = load_sweep(SWEEPS / f"{path.stem}_smoke.yaml")
        assert twin.job == sweep.job and set(twin.space) <= set(sweep.space) | set(twin.space)
        assert (twin.metric, twin.validation.kind) == (sweep.metric, sweep.validation.kind)
        assert Path(twin.experiment).name == Path(sweep.experiment).name.replace(".yaml", "_smoke.yaml")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown key colour"),
        ({"space": {}}, "at least one config key"),
        ({"metric": "accuracy"}, "known metrics"),
        ({"space": {"a": {"type": "uniform", "low": 2, "high": 1}}}, "low 2.0 must be < high"),
        ({"space": {"a": {"type": "loguniform", "low": 0, "high": 1}}}, "low must be > 0"),
        ({"space": {"a": {"type": "choice"}}}, "non-empty values"),
        ({"space": {"a": {"type": "normal", "low": 0, "high": 1}}}, "type"),
        ({"search": {"algorithm": "optuna"}, "space": {"a": {"type": "grid", "values": [1, 2]}}}, "choice, not grid"),
        ({"search": {"algorithm": "grid"}}, "key of type grid"),
        ({"search": {"algorithm": "hyperband"}}, "algorithm"),
        ({"scheduler": {"kind": "asha", "reduction_factor": 1}}, "reduction_factor > 1"),
        ({"resources": {"num_workers": 0}}, "num_workers >= 1"),
        ({"report_every": 0}, "report_every"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_key(change, message):
    raw = {"experiment": "x.yaml", "space": {"a": {"type": "uniform", "low": 0.0, "high": 1.0}}}
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        from_dict(SweepConfig, raw)


def test_distill_plan_trains_the_teacher_once_and_cuts_the_student(tmp_path, corpus):
    from vlforge.tune import load_sweep, make_plan

    plan = make_plan(load_sweep(_sweep(tmp_path, corpus, DISTILL)))
    # The trial stages are taught by the pretrained teacher only: no fine-tuned teacher is trained.
    assert [r.name for r in plan.shared] == ["s.teacher-pretrain"]
    run = plan.trial_run(
        {
            "student.stages.0.objectives.attn,student.stages.1.objectives.attn": 0.25,
            "student.stages.0.temperature": 2.0,
        },
        "abc_00001",
    )
    assert isinstance(run, TrainRunConfig) and run.method == "distill" and run.name == "s.abc_00001"
    assert [s.name for s in run.stages] == ["pretrain", "retrieval"]
    assert [s.objectives["attn"] for s in run.stages] == [0.25, 0.25]
    assert run.stages[0].temperature == 2.0 and run.stages[1].temperature == 1.0
    assert run.stages[0].teacher == str(plan.runs_dir / "s" / "teacher" / "pretrain")
    assert run.checkpoint_every == 10 and run.num_workers == 1 and run.worker_cpus == 0.5
    assert (
        run.tracking.tags["vlforge.trial_id"] == "abc_00001"
        and run.tracking.experiment == plan.sweep.tracking.experiment
    )
    assert plan.max_reports == 2 + 5  # the smoke config's 20 and 50 steps, a report every 10
    assert plan.validation_shards == str(corpus / "scenes" / "val")


def test_a_swept_key_that_changes_the_shared_teacher_is_refused(tmp_path, corpus):
    from vlforge.tune import load_sweep, make_plan

    text = DISTILL.replace("student.stages.0.temperature:", "teacher.pretrain.0.optimizer.lr:")
    with pytest.raises(ConfigError, match="teacher.pretrain.0.optimizer.lr changes a shared run"):
        make_plan(load_sweep(_sweep(tmp_path, corpus, text)))
    with pytest.raises(ConfigError, match="no_such_key"):
        make_plan(
            load_sweep(
                _sweep(tmp_path, corpus, DISTILL.replace("student.stages.0.temperature:", "student.no_such_key:"))
            )
        )


def test_stage3_plan_shares_stages_1_2_and_starts_stage_3_from_them(tmp_path, corpus):
    from vlforge.tune import load_sweep, make_plan
    from vlforge.tune.trainable import search_space

    sweep = load_sweep(
        _sweep(tmp_path, corpus, STAGE3.replace("type: grid, values: [0.0, 0.1]", "type: choice, values: [0.0, 0.1]"))
    )
    plan = make_plan(sweep)
    assert [r.name for r in plan.shared] == ["s.base"]
    assert [s.name for s in plan.shared[0].stages] == ["image_mim", "text_mlm"] and plan.shared[0].stage_exports
    run = plan.trial_run({"stages.2.optimizer.lr": 1e-3, "stages.2.optimizer.weight_decay": 0.1}, "t_00000")
    assert [s.name for s in run.stages] == ["vl"]
    assert run.stages[0].init == str(plan.runs_dir / "s.base" / "stages" / "text_mlm")
    assert run.stages[0].optimizer.lr == 1e-3 and run.stages[0].optimizer.weight_decay == 0.1
    space = search_space(sweep)
    assert set(space) == set(sweep.space)
    with pytest.raises(ConfigError, match="changes a shared run"):
        make_plan(
            load_sweep(_sweep(tmp_path, corpus, STAGE3.replace("stages.2.optimizer.lr", "stages.0.optimizer.lr")))
        )


def test_trial_stages_must_exist_and_be_consecutive(tmp_path, corpus):
    from vlforge.tune import load_sweep, make_plan

    for stages, message in (("[vl, nope]", "no such stage"), ("[image_mim, vl]", "consecutive")):
        with pytest.raises(ConfigError, match=message):
            make_plan(load_sweep(_sweep(tmp_path, corpus, STAGE3.replace("[vl]", stages))))


def test_a_missing_experiment_file_is_named(tmp_path):
    from vlforge.tune import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("experiment: nowhere.yaml\nspace: {a: {type: choice, values: [1]}}\n")
    with pytest.raises(ConfigError, match="experiment nowhere.yaml not found"):
        load_sweep(path)


def test_results_table_best_config_and_plot(tmp_path, corpus):
    from vlforge.tune import load_sweep, make_plan
    from vlforge.tune.results import _table, plot_metric_vs_params, write_best_config
    from vlforge.tune.trainable import FINISHED, STOPPED

    sweep = load_sweep(_sweep(tmp_path, corpus, DISTILL))
    plan = make_plan(sweep)
    k1, k2 = list(sweep.space)
    rows = [
        {"trial_id": "a_00000", k1: 0.3, k2: 1.0, "metric": 20.0, "best_seen": 21.0, "reports": 9, "status": FINISHED},
        {"trial_id": "a_00001", k1: 4.0, k2: 2.0, "metric": 12.5, "best_seen": 12.5, "reports": 1, "status": STOPPED},
    ]
    table = _table(rows, [k1, k2], "val_rmean")
    assert "attn" in table and "stopped_early" in table and "20.0" in table
    plan.root.mkdir(parents=True)
    best = write_best_config(plan, {k1: 0.3, k2: 1.0}, {**rows[0], "metric_name": "val_rmean"})
    cfg = load(TwoStageConfig, best)  # the experiment's own job script reads it
    assert [s.objectives["attn"] for s in cfg.student.stages[:2]] == [0.3, 0.3]
    assert cfg.student.stages[0].temperature == 1.0 and len(cfg.student.stages) == 4
    assert yaml.safe_load(best.read_text())["data_root"] == str(corpus)
    png = plot_metric_vs_params(rows, sweep, plan.root / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_cli_help_and_bad_file(tmp_path, capsys):
    from vlforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0 and "search space" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: jobs/configs/two_stage_smoke.yaml\nspaces: {}\n")
    assert main(["sweep", str(bad)]) == 2
    assert "unknown key spaces" in capsys.readouterr().err


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id, self.config = trial_id, {}


def test_asha_stops_a_trailing_trial_but_never_at_its_final_report():
    from vlforge.tune.trainable import FinishingASHA

    asha = FinishingASHA(
        time_attr="training_iteration", metric="loss", mode="min", grace_period=1, reduction_factor=2, max_t=2
    )
    a, b, c = _Trial("a"), _Trial("b"), _Trial("c")
    for t in (a, b, c):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, a, {"training_iteration": 1, "loss": 1.0}) == "CONTINUE"
    assert asha.on_trial_result(None, b, {"training_iteration": 1, "loss": 5.0}) == "STOP"  # trails a at rung 1
    # At max_t plain ASHA answers STOP even for the best trial, which would kill it while it exports.
    assert asha.on_trial_result(None, a, {"training_iteration": 2, "loss": 1.0}) == "STOP"
    assert asha.on_trial_result(None, a, {"training_iteration": 2, "loss": 1.0, "final_report": True}) == "CONTINUE"
    assert asha.on_trial_result(None, c, {"training_iteration": 1, "loss": 9.0, "final_report": True}) == "CONTINUE"


def test_searchers_limit_concurrency_themselves():
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from vlforge.tune.trainable import search_algorithm

    raw = {"experiment": "x.yaml", "space": {"a": {"type": "uniform", "low": 0.0, "high": 1.0}}}
    gen = search_algorithm(from_dict(SweepConfig, raw), 3)
    assert isinstance(gen, BasicVariantGenerator) and gen.max_concurrent == 3
    tpe = search_algorithm(from_dict(SweepConfig, {**raw, "search": {"algorithm": "optuna"}}), 2)
    assert isinstance(tpe, ConcurrencyLimiter) and tpe.max_concurrent == 2


def test_a_sweep_started_again_with_another_file_is_refused_and_no_secret_is_written(tmp_path, corpus, monkeypatch):
    from vlforge.tune import load_sweep, make_plan
    from vlforge.tune.run import _check_same_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    text = DISTILL.replace(
        'tracking: {tracking_uri: "sqlite:///OUT/mlflow.db"}',
        'tracking: {tracking_uri: "https://me:hunter2-secret@mlflow.example"}',
    )
    plan = make_plan(load_sweep(_sweep(tmp_path, corpus, text)))
    _check_same_sweep(plan)
    _check_same_sweep(plan)  # the same sweep again: a resume
    saved = (plan.root / "sweep.yaml").read_text()
    assert "hunter2" not in saved and "mlflow.example" in saved
    changed = make_plan(load_sweep(_sweep(tmp_path, corpus, text.replace("report_every: 10", "report_every: 5"))))
    with pytest.raises(ConfigError, match="started with another configuration"):
        _check_same_sweep(changed)
