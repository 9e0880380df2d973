"""The two-stage job's wiring without Ray: its config, the plan of runs, the fusion/distill methods,
loading a VLMo into the pair models, and model directories."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vlforge.config import ConfigError, TrainRunConfig, TwoStageConfig, from_dict, load

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "configs" / "two_stage_smoke.yaml"


def _smoke_raw() -> dict:
    raw = yaml.safe_load(SMOKE.read_text())
    return {k: v for k, v in raw.items() if not k.startswith("x-")}


def _cfg(corpus, *overrides: str) -> TwoStageConfig:
    return load(TwoStageConfig, SMOKE, [f"data_root={corpus}", "corpus=null", *overrides])


def test_smoke_config_loads_and_anchors_expand():
    cfg = load(TwoStageConfig, SMOKE)
    assert [s.task for s in cfg.student.stages] == ["itm", "itm", "nlvr2", "vqa"]
    assert cfg.student.stages[0].data.image.size == 128 and cfg.student.stages[0].data.batch_size == 32
    assert cfg.teacher.model == cfg.student.model == "vlmo_small_effnet"
    assert cfg.student.stages[2].init == "stage:retrieval" and cfg.student.stages[2].teacher == "nlvr2"
    assert {s.task for s in cfg.teacher.finetune} == {"nlvr2", "vqa"}
    assert cfg.ablations == []  # the ablations are opt-in: --set ablations=[soft_only,hard_only]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ablations": ["no_such"]}, "ablations: unknown"),
        ({"bogus": 1}, "unknown key bogus"),
        ({"max_steps": -1}, "max_steps"),
        ({"max_batch_size": -2}, "max_batch_size"),
        ({"name": "has space"}, "may hold only"),
    ],
)
def test_bad_two_stage_configs_fail_clearly(change, message):
    raw = _smoke_raw()
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        from_dict(TwoStageConfig, raw)


def test_student_teacher_must_name_a_teacher_model():
    raw = _smoke_raw()
    raw["student"]["stages"][2]["teacher"] = "nlvr3"
    with pytest.raises(ConfigError, match="neither 'pretrain' nor a teacher.finetune stage"):
        from_dict(TwoStageConfig, raw)
    raw = _smoke_raw()
    raw["student"]["stages"][3]["teacher"] = "pretrain"
    with pytest.raises(ConfigError, match="needs a fine-tuned teacher"):
        from_dict(TwoStageConfig, raw)


def test_variant_weights():
    from vlforge.workflows.two_stage import variant_weights

    w = {"itc": 1.0, "soft": 1.0, "attn": 2.0}
    assert variant_weights(w, "distilled") == w
    assert variant_weights(w, "soft_only") == {"itc": 1.0, "soft": 1.0}
    assert variant_weights(w, "hard_only") == {"itc": 1.0, "hard": 1.0}
    assert variant_weights({"soft": 1.0, "attn": 1.0}, "hard_only") == {"hard": 1.0}


def test_plan_builds_every_run(corpus, tmp_path):
    import json

    from vlforge.workflows.two_stage import plan

    cfg = _cfg(corpus, "name=job1", f"storage_path={tmp_path}", "max_steps=3", "ablations=[soft_only,hard_only]")
    p = plan(cfg)
    assert list(p.runs) == [
        "teacher-pretrain",
        "teacher-finetune",
        "student-distilled",
        "student-soft_only",
        "student-hard_only",
    ]
    assert p.num_answers == len(json.loads((corpus / "answers.json").read_text()))
    assert all(s.steps == 3 and s.schedule.warmup_steps < 3 for r in p.runs.values() for s in r.stages)
    assert all(Path(s.data.shards).is_relative_to(corpus) for r in p.runs.values() for s in r.stages)
    ft = p.runs["teacher-finetune"]
    assert ft.method == "fusion" and ft.stage_exports and ft.num_answers == p.num_answers
    assert all(s.init == str(tmp_path / "job1" / "teacher" / "pretrain") for s in ft.stages)
    distilled = p.runs["student-distilled"]
    assert distilled.method == "distill" and distilled.name == "job1.student-distilled"
    assert distilled.stages[2].teacher == str(tmp_path / "job1" / "teacher" / "nlvr2")
    assert distilled.stages[0].objectives == {"itc": 1.0, "soft": 1.0, "attn": 1.0}
    assert all("attn" not in s.objectives for s in p.runs["student-soft_only"].stages)
    hard = p.runs["student-hard_only"]
    assert all(s.teacher is None and set(s.objectives) <= {"itc", "hard"} for s in hard.stages)
    # every student variant starts from the pretrained teacher's weights (`init: teacher:pretrain`)
    assert all(
        r.stages[0].init == str(tmp_path / "job1" / "teacher" / "pretrain")
        for k, r in p.runs.items()
        if k.startswith("student-")
    )
    assert distilled.stages[1].init == "previous"
    assert p.student_model("distilled", "vqa") == tmp_path / "job1.student-distilled" / "stages" / "vqa"
    assert list(plan(cfg, ablations=False).runs)[-1] == "student-distilled"
    assert {s.data.batch_size for r in p.runs.values() for s in r.stages} == {32}  # the smoke config's


def test_max_batch_size_caps_every_stage(corpus, tmp_path):
    from vlforge.workflows.two_stage import plan

    p = plan(_cfg(corpus, f"storage_path={tmp_path}", "max_batch_size=8"))
    assert {s.data.batch_size for r in p.runs.values() for s in r.stages} == {8}
    p = plan(_cfg(corpus, f"storage_path={tmp_path}", "max_batch_size=64"))  # a cap, never an increase
    assert {s.data.batch_size for r in p.runs.values() for s in r.stages} == {32}


def test_plan_with_a_teacher_checkpoint_trains_only_students(corpus, tmp_path):
    from vlforge.workflows.two_stage import plan

    p = plan(_cfg(corpus, f"teacher.checkpoint={tmp_path / 'teacher'}"), ablations=False)
    assert list(p.runs) == ["student-distilled"]
    assert p.runs["student-distilled"].stages[3].teacher == str(tmp_path / "teacher" / "vqa")
    assert p.runs["student-distilled"].stages[0].init == str(tmp_path / "teacher" / "pretrain")


def test_missing_answers_are_a_config_error(corpus, tmp_path):
    import shutil

    from vlforge.workflows.two_stage import plan

    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    (root / "answers.json").unlink()
    with pytest.raises(ConfigError, match="answers.json"):
        plan(_cfg(root))


def _train_raw(method: str, **stage) -> dict:
    s = {"name": "a", "objectives": {"hard": 1.0}, "steps": 2, "task": "nlvr2", **stage}
    return {
        "method": method,
        "model": "vlmo_debug",
        "data": {"image": {"size": 32}, "tokenizer": {"max_length": 16}},
        "stages": [s],
    }


@pytest.mark.parametrize(
    "method, stage, extra, message",
    [
        ("distill", {"objectives": {"soft": 1.0}}, {}, "needs a teacher model directory"),
        ("fusion", {"task": "itm"}, {}, "fine-tunes vqa or nlvr2"),
        ("distill", {"task": None}, {}, "needs a task"),
        ("vlmo", {"objectives": {"itc": 1.0}, "task": "itm"}, {}, "methods 'fusion' and 'distill' only"),
        ("distill", {"task": "vqa"}, {}, "num_answers"),
        ("distill", {"init": "stage:b"}, {}, "names no earlier stage"),
        ("distill", {"objectives": {"itc": 1.0}}, {}, "only for task 'itm'"),
        ("distill", {"task": "xyz"}, {}, "task must be one of"),
    ],
)
def test_pair_method_stage_errors(method, stage, extra, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainRunConfig, {**_train_raw(method, **stage), **extra})


def test_validate_checks_the_teachers_kind(tmp_path):
    from vlforge.models.io import build_from_spec, save_model_dir
    from vlforge.train.runner import validate

    vlmo = build_from_spec({"model": "vlmo_debug"})
    save_model_dir(vlmo.state_dict(), {"model": "vlmo_debug", "method": "vlmo"}, tmp_path / "pre")
    raw = _train_raw("distill", objectives={"soft": 1.0}, teacher=str(tmp_path / "pre"))
    raw["model_overrides"] = {"vl_layers": 0}
    with pytest.raises(ConfigError, match="needs a fine-tuned fusion teacher"):
        validate(from_dict(TrainRunConfig, raw))
    validate(from_dict(TrainRunConfig, raw), check_paths=False)
    raw["stages"][0]["teacher"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a model directory"):
        validate(from_dict(TrainRunConfig, raw))


def test_model_directory_round_trip(tmp_path):
    from vlforge.models.io import build_from_spec, load_model_dir, save_model_dir

    spec = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}, "num_answers": 5}
    torch.manual_seed(0)
    model = build_from_spec(spec).eval()
    save_model_dir(model.state_dict(), spec, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert type(loaded).__name__ == "DualEncoderStudent" and "vqa" in loaded.heads
    pv, ids = torch.randn(2, 3, 32, 32), torch.randint(1000, 2000, (2, 16))
    am = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model("vqa", pv, ids, am).logits, loaded("vqa", pv, ids, am).logits)
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.pkl"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model_dir(tmp_path)


def test_vlmo_weights_load_into_the_pair_models(capsys):
    from vlforge.models.io import build_from_spec
    from vlforge.train.loop import load_init

    torch.manual_seed(0)
    vlmo = build_from_spec({"model": "vlmo_debug"})
    sd = vlmo.state_dict()
    teacher = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7})
    heads_before = copy.deepcopy(teacher.heads.state_dict())
    load_init(teacher, sd, what="t")
    for k, v in sd.items():
        assert torch.equal(teacher.encoder.state_dict()[k], v)
    assert all(torch.equal(v, teacher.heads.state_dict()[k]) for k, v in heads_before.items())
    assert "heads" in capsys.readouterr().out

    student = build_from_spec({"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}})
    load_init(student, sd, what="s")  # the teacher's VL experts have no place in the dual encoder
    own = student.encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items() if k in own)
    assert any(".experts.vl." in k for k in sd) and not any(".experts.vl." in k for k in own)

    again = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7})
    load_init(again, teacher.state_dict())  # a model's own weights load strictly
    assert all(torch.equal(again.state_dict()[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="no weight matches"):
        load_init(build_from_spec({"model": "vlmo_debug", "method": "fusion"}), {"x": torch.zeros(1)})


def _pair_batch(b: int = 4, answers: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (b, 16), generator=g)
    return {
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "pixel_values_2": torch.randn(b, 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "label": torch.tensor([0, 1] * (b // 2)),
        "answer_id": torch.tensor([1, 2, -100, 3][:b]),
        "sample_id": torch.arange(b),
    }


def test_fusion_finetune_task_trains_the_head_and_ignores_unknown_answers():
    from vlforge.models.io import build_from_spec
    from vlforge.tasks.distill import FusionFinetuneTask

    torch.manual_seed(0)
    model = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7})
    batch = _pair_batch()
    for task in ("vqa", "nlvr2"):
        t = FusionFinetuneTask(model, task)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        first = None
        for _ in range(15):
            out = t(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            first = first if first is not None else float(out["loss"])
        assert torch.isfinite(out["loss"]) and float(out["loss"]) < first
    with pytest.raises(ValueError, match="vqa or nlvr2"):
        FusionFinetuneTask(model, "itm")


def test_image_truth_term_trains_the_per_image_head_and_skips_unknown_truths():
    from vlforge.models.io import build_from_spec
    from vlforge.tasks.distill import FusionFinetuneTask

    torch.manual_seed(0)
    model = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7})
    batch = {**_pair_batch(), "image_truth": torch.tensor([[1, 0], [0, 0], [1, 1], [-100, -100]])}
    t = FusionFinetuneTask(model, "nlvr2", {"hard": 1.0, "image_truth": 2.0})
    out = t(batch)
    assert torch.allclose(out["loss"], out["hard"] + 2.0 * out["image_truth"])
    head = model.heads["nlvr2_image"][-1].weight
    out["loss"].backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    # the term is the cross-entropy of the known truths only
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["pixel_values_2"])
    per_image = model("nlvr2", *args).image_logits[:3]  # [3, 2, 2]; row 4 knows no truth
    known = torch.nn.functional.cross_entropy(per_image.reshape(-1, 2), batch["image_truth"][:3].reshape(-1))
    assert torch.allclose(t(batch)["image_truth"], known, atol=1e-6)

    model.zero_grad()
    unknown = t({**batch, "image_truth": torch.full((4, 2), -100)})
    assert float(unknown["image_truth"]) == 0.0 and unknown["loss"].requires_grad
    unknown["loss"].backward()  # a batch that knows no truth still runs backward, as every rank must
    with pytest.raises(ValueError, match="needs the batch's 'image_truth'"):
        t({k: v for k, v in batch.items() if k != "image_truth"})
    with pytest.raises(ValueError, match="is for nlvr2"):
        FusionFinetuneTask(model, "vqa", {"hard": 1.0, "image_truth": 1.0})
    with pytest.raises(ValueError, match="unknown loss weights"):
        FusionFinetuneTask(model, "nlvr2", {"soft": 1.0})


def test_student_per_image_terms_follow_the_teacher_and_the_truths():
    """DistillationTask's nlvr2 per-image terms: ``soft_image`` is the KL of the student's per-image head
    to the teacher's, ``image_truth`` the cross-entropy on the shards' truths; both train the student's
    ``nlvr2_image`` head and neither reaches the frozen teacher."""
    from vlforge.models.io import build_from_spec
    from vlforge.objectives.distillation import soft_label_kl
    from vlforge.tasks.distill import DistillationTask

    torch.manual_seed(0)
    teacher = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7})
    student = build_from_spec({"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}})
    batch = {**_pair_batch(), "image_truth": torch.tensor([[1, 0], [0, 0], [1, 1], [-100, -100]])}
    task = DistillationTask(student, teacher, "nlvr2", {"soft": 1.0, "soft_image": 0.5, "image_truth": 2.0})
    out = task(batch)
    assert set(out) == {"loss", "soft", "soft_image", "image_truth"}
    assert torch.allclose(out["loss"], out["soft"] + 0.5 * out["soft_image"] + 2.0 * out["image_truth"])
    args = ("nlvr2", batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["pixel_values_2"])
    s, t = student(*args), teacher(*args)
    assert s.image_logits.shape == t.image_logits.shape == (4, 2, 2)
    want = soft_label_kl(s.image_logits.reshape(-1, 2), t.image_logits.reshape(-1, 2))
    assert torch.allclose(out["soft_image"], want, atol=1e-6)
    known = torch.nn.functional.cross_entropy(s.image_logits[:3].reshape(-1, 2), batch["image_truth"][:3].reshape(-1))
    assert torch.allclose(out["image_truth"], known, atol=1e-6)
    out["loss"].backward()
    assert student.heads["nlvr2_image"][-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="only for task 'nlvr2'"):
        DistillationTask(student, teacher, "vqa", {"soft_image": 1.0})
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTask(student, None, "nlvr2", {"soft_image": 1.0})


def test_hard_label_distillation_needs_no_teacher():
    from vlforge.models.io import build_from_spec
    from vlforge.tasks.distill import DistillationTask

    student = build_from_spec({"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}})
    out = DistillationTask(student, None, "itm", {"itc": 1.0, "hard": 1.0}, gather=False)(_pair_batch())
    assert set(out) == {"loss", "itc", "hard"} and torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTask(student, None, "itm", {"soft": 1.0}, gather=False)


def test_job_rejects_bad_configs_before_starting_ray(capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import two_stage
    finally:
        sys.path.pop(0)
    assert two_stage.main(["--set", "ablations=[nope]"]) == 2
    assert "ablations: unknown" in capsys.readouterr().err
    assert two_stage.main(["--set", "student.stages.0.bogus=1"]) == 2
    assert "student.stages[0].bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        two_stage.main(["--help"])
    assert exc.value.code == 0
    assert "--no-ablation" in capsys.readouterr().out


def test_full_size_config_plans_gpu_zero3_runs_from_s3(monkeypatch):
    import vlforge.workflows.two_stage as ts

    cfg = load(TwoStageConfig, REPO / "jobs" / "configs" / "two_stage.yaml")
    monkeypatch.setattr(ts, "_num_answers", lambda cfg: 276)  # answers.json lives in the bucket
    p = ts.plan(cfg)
    assert list(p.runs) == [
        "teacher-pretrain",
        "teacher-finetune",
        "student-distilled",
        "student-soft_only",
        "student-hard_only",
    ]
    for run in p.runs.values():
        assert run.use_gpu and run.deepspeed.zero_stage == 3 and run.num_workers == 8
        assert run.model == "vlmo_base" and run.tracking.tracking_uri is None  # MLFLOW_TRACKING_URI decides
        assert all(s.data.shards.startswith("s3://vlforge-data/corpus/") for s in run.stages)
        assert all(s.data.image.size == 224 and s.data.tokenizer.max_length == 40 for s in run.stages)


def test_vqa_soft_labels_follow_the_teachers_training():
    from vlforge.models.io import build_from_spec
    from vlforge.objectives.distillation import soft_label_bce, soft_label_kl
    from vlforge.tasks.distill import DistillationTask

    torch.manual_seed(0)
    student = build_from_spec(
        {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}, "num_answers": 7}
    ).eval()
    teacher = build_from_spec({"model": "vlmo_debug", "method": "fusion", "num_answers": 7}).eval()
    batch = _pair_batch()
    args = ("vqa", batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        s_logits, t_logits = student(*args).logits, teacher(*args).logits
        single = DistillationTask(student, teacher, "vqa", {"soft": 1.0}, temperature=2.0)(batch)["soft"]
        multi = DistillationTask(student, teacher, "vqa", {"soft": 1.0}, multilabel_vqa=True)(batch)["soft"]
    assert torch.allclose(single, soft_label_kl(s_logits, t_logits, 2.0))
    assert torch.allclose(multi, soft_label_bce(s_logits, t_logits))


def test_seeds_table_averages_results(tmp_path, capsys):
    import json

    for i, acc in enumerate((50.0, 60.0)):
        (tmp_path / f"s{i}").mkdir()
        rows = [{"model": "teacher", "split": "test", "nlvr2_acc": acc, "rmean": 10.0}]
        (tmp_path / f"s{i}" / "results.json").write_text(json.dumps({"rows": rows, "latency": []}))
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import seeds_table
    finally:
        sys.path.pop(0)
    assert seeds_table.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--metrics", "nlvr2_acc", "rmean"]) == 0
    out = capsys.readouterr().out
    assert "55.0 ± 7.1 (2)" in out and "10.0 ± 0.0 (2)" in out
    assert seeds_table.main([str(tmp_path / "absent")]) == 2


def test_finished_runs_are_reused_and_the_teacher_directory_refilled(corpus, tmp_path):
    from vlforge.models.io import build_from_spec, save_model_dir
    from vlforge.workflows.two_stage import plan, train_all

    cfg = _cfg(corpus, "name=done", f"storage_path={tmp_path}")
    p = plan(cfg)
    vlmo = build_from_spec({"model": "vlmo_small"})
    save_model_dir(
        vlmo.state_dict(), {"model": "vlmo_small", "method": "vlmo"}, p.run_dir("teacher-pretrain") / "export"
    )
    fusion_spec = {"model": "vlmo_small", "method": "fusion", "num_answers": p.num_answers}
    for stage in ("nlvr2", "vqa"):
        save_model_dir(
            build_from_spec(fusion_spec).state_dict(), fusion_spec, p.run_dir("teacher-finetune") / "stages" / stage
        )
    for key in p.runs:
        p.run_dir(key).mkdir(parents=True, exist_ok=True)
        (p.run_dir(key) / "summary.json").write_text("{}")
    logged: list[str] = []
    assert train_all(cfg, p, logged.append) == {}  # nothing trained
    assert sum("finished earlier" in line for line in logged) == len(p.runs)
    assert {d.name for d in p.teacher_dir.iterdir()} == {"pretrain", "nlvr2", "vqa"}


def test_cache_features_points_runs_at_caches_and_keeps_pixels_where_it_must(corpus, tmp_path, monkeypatch):
    """Which runs and stages the job moves to feature caches (the builder itself is faked here; see
    tests/integration/test_feature_cache.py for the real one)."""
    from vlforge.workflows import two_stage as ts
    from vlforge.workflows.features import FeatureCache

    built: list[str] = []

    def fake_cache(shards, tokenizer, image, **kw):
        if shards.endswith("vqa/train"):
            raise ValueError("cannot cache this one")
        built.append(shards)
        return FeatureCache(f"{shards}.features/{tokenizer}-{image.size}", 10, 1.5, True, {})

    monkeypatch.setattr(ts, "ensure_feature_cache", fake_cache)
    cfg = _cfg(corpus, "name=job1", f"storage_path={tmp_path}", "ablations=[soft_only,hard_only]")
    p = ts.plan(cfg)
    lines: list[str] = []
    assert ts.cache_features(cfg, p, lines.append) == 1.5 * len(built)
    assert len(built) == len(set(built)) == 3  # concepts, scenes, nlvr2: each set once for all runs
    for key, run in p.runs.items():
        for s in run.stages:
            if s.data.shards.endswith("vqa/train"):  # its build failed: pixels, augmented as configured
                assert s.data.image.augment
            else:
                assert s.data.shards.endswith(".features/efficientnet_lite0-128"), (key, s.name)
                assert not s.data.image.augment
        assert run.data == run.stages[0].data
    assert any("vqa/train stays on pixels: cannot cache this one" in line for line in lines)

    # a teacher with another image tokenizer: no student variant is cached (the ablations stay alike)
    real = ts.model_tokenizer
    monkeypatch.setattr(
        ts, "model_tokenizer", lambda m, o=None: ("other", 128) if "itc_norm" in (o or {}) else real(m, o)
    )
    other = _cfg(corpus, "name=job2", f"storage_path={tmp_path}", "ablations=[hard_only]")
    p = ts.plan(other)
    ts.cache_features(other, p, lines.append)
    assert all(s.data.shards.endswith("other-128") for s in p.runs["teacher-pretrain"].stages)
    assert not any(".features/" in s.data.shards for k in p.runs if k.startswith("student-") for s in p.runs[k].stages)
    # switched off: nothing moves
    off = _cfg(corpus, "name=job3", f"storage_path={tmp_path}", "features.enabled=false")
    p = ts.plan(off)
    assert ts.cache_features(off, p, lines.append) is None
    assert not any(".features/" in s.data.shards for r in p.runs.values() for s in r.stages)


def test_cache_features_reads_a_reused_teachers_tokenizer_from_its_directory(corpus, tmp_path, monkeypatch):
    """With ``teacher.checkpoint`` the students are cached only when the checkpoint's own model
    (its ``pretrain/model.json``) has their tokenizer, whatever ``teacher.model`` says."""
    import json

    from vlforge.workflows import two_stage as ts
    from vlforge.workflows.features import FeatureCache

    monkeypatch.setattr(
        ts,
        "ensure_feature_cache",
        lambda shards, tokenizer, image, **kw: FeatureCache(
            f"{shards}.features/{tokenizer}-{image.size}", 1, 0.5, True, {}
        ),
    )
    for model, cached in (("vlmo_debug", False), ("vlmo_small_effnet", True)):
        teacher = tmp_path / model / "teacher"
        (teacher / "pretrain").mkdir(parents=True)
        (teacher / "pretrain" / "model.json").write_text(
            json.dumps({"method": "vlmo", "model": model, "overrides": {}})
        )
        cfg = _cfg(corpus, f"name={model}", f"storage_path={tmp_path}", f"teacher.checkpoint={teacher}")
        p = ts.plan(cfg, ablations=False)
        ts.cache_features(cfg, p, lambda line: None)
        stages = p.runs["student-distilled"].stages
        assert all((".features/" in s.data.shards) == cached for s in stages), model
