"""The main job end to end: ``jobs/two_stage.py``'s smoke config (steps capped, a small corpus) against
a real ``mlflow server``, then the same job through ``ray job submit`` to a head started with
``ray start --head``, reusing the first run's teacher (one test for both: each is a run of the job)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _args(corpus: Path, out: Path, name: str, uri: str, model: str, *more: str) -> list[str]:
    sets = [
        f"data_root={corpus}",
        "corpus=null",
        "max_steps=2",
        "max_batch_size=8",
        "eval.max_samples=24",
        "eval.latency_ns=[8,16]",
        "eval.max_teacher_pairs=100",
        f"storage_path={out}",
        f"name={name}",
        f"tracking.tracking_uri={uri}",
        f"tracking.buffer_dir={out / 'buffer'}",
        f"register.model_name={model}",
        *more,
    ]
    return [a for s in sets for a in ("--set", s)]


def _pair(corpus: Path) -> tuple[bytes, str]:
    from vlforge.data.shards import iter_samples, list_shards

    sample = next(iter_samples(list_shards(str(corpus / "scenes" / "test"))[0]))
    image = next(v for k, v in sample.items() if k in ("jpg", "png", "webp"))
    return image, sample["txt"].decode()


@pytest.fixture(scope="module")
def smoke_job(ray_local, corpus, mlflow_server, tmp_path_factory, load_job):
    out = tmp_path_factory.mktemp("two_stage")
    name, model = f"ts-{uuid.uuid4().hex[:6]}", f"dual-{uuid.uuid4().hex[:6]}"
    job = load_job("two_stage")
    code = job.main(_args(corpus, out, name, mlflow_server.uri, model, "ablations=[soft_only]"))
    return {"code": code, "out": out, "name": name, "model": model, "root": out / name}


def test_smoke_job_trains_evaluates_and_registers(smoke_job, corpus, mlflow_server, capsys):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from vlforge.serving.registry import load_by_alias

    assert smoke_job["code"] == 0
    root = smoke_job["root"]
    table = (root / "results.txt").read_text()
    for label in ("teacher", "student-distilled", "student-soft_only", "Latency", "nlvr2_acc", "vqa_acc", "i2t_r1"):
        assert label in table
    for split in ("val", "test"):
        assert f"student-distilled  {split}" in table
    assert {"pretrain", "nlvr2", "vqa"} <= {p.name for p in (root / "teacher").iterdir()}
    # every training set's locked-tower features were cached beside it and the runs trained on them
    for kind in ("concepts", "scenes", "nlvr2", "vqa"):
        assert (corpus / kind / "train.features" / "efficientnet_lite0-128" / "manifest.json").is_file(), kind
    assert (root / "results.png").stat().st_size > 1000 and (root / "latency.png").stat().st_size > 1000

    client = MlflowClient(mlflow_server.uri)
    version = client.get_model_version_by_alias(smoke_job["model"], "challenger")
    assert version.version == "1" and version.status == "READY"
    tags = version.tags
    for key in ("eval.test.nlvr2_acc", "eval.test.vqa_acc", "eval.val.i2t_r1", "eval.test.t2i_r10", "vlforge.job"):
        assert key in tags, key
    assert 0.0 <= float(tags["eval.test.nlvr2_acc"]) <= 100.0

    parent = client.get_run(version.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == smoke_job["name"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(
        f"{smoke_job['name']}.{k}"
        for k in ("teacher-pretrain", "teacher-finetune", "student-distilled", "student-soft_only")
    )
    assert all(r.info.status == "FINISHED" for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/results.txt", "results/results.png", "results/latency.png"} <= artifacts
    assert any(k.startswith("student-distilled/test/") for k in parent.data.metrics)

    model = load_by_alias(smoke_job["model"], "challenger", tracking_uri=mlflow_server.uri)
    image, caption = _pair(corpus)
    scored = model.predict(pd.DataFrame({"image": [image, image], "text": [caption, "a banana"]}))
    assert list(scored.columns) >= ["score"] and len(scored) == 2
    assert scored["score"].between(-1.0001, 1.0001).all()
    assert scored["match_prob"].between(0, 1).all()


def test_teacher_reused_through_ray_job_submit_and_a_second_version_registered(
    smoke_job, ray_head, corpus, mlflow_server, tmp_path
):
    """The smoke job's teacher reused by a second run of the job, submitted with ``ray job submit`` to a
    ``ray start --head`` cluster: no teacher trains, the student registers as version 2 of the same model."""
    from mlflow.tracking import MlflowClient

    assert smoke_job["code"] == 0
    name = f"ts-{uuid.uuid4().hex[:6]}"
    args = _args(
        corpus,
        tmp_path,
        name,
        mlflow_server.uri,
        smoke_job["model"],
        f"teacher.checkpoint={smoke_job['root'] / 'teacher'}",
        "eval.latency_ns=[8]",
    )
    job = ray_head.submit([sys.executable, "jobs/two_stage.py", "--no-ablation", *args], REPO, timeout=900)
    logs = job.logs
    assert job.status == "SUCCEEDED", (job.submit_output + logs)[-4000:]
    for text in (
        "Evaluation (percent",
        "student-distilled",
        "Latency: score N texts",
        f"registered {smoke_job['model']}",
    ):
        assert text in logs, text
    assert f"{name}.teacher-pretrain" not in logs and f"{name}.student-distilled" in logs
    assert "student-soft_only" not in (tmp_path / name / "results.txt").read_text()
    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias(smoke_job["model"], "challenger").version == "2"
