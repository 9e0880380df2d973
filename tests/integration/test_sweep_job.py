"""Sweeps end to end on a real local Ray, real DeepSpeed and a real ``mlflow server``.

1. A 4-trial distillation-loss-weight sweep (the two-stage experiment, steps and batch capped) with
   ASHA. The scheduling metric is the weighted training loss and the swept weight is the ITC term's
   (near log(batch) = 2.1 at batch 8 and these steps), 0.1 or 10: the loss of a weight-10 trial is
   larger by some 18 (18.8 against 0.29 at the rung in one run), far beyond batch noise, so which
   trials trail is known before they run and the test can demand that ASHA stops one. Whichever of
   the first two trials reports first, a weight-10 trial meets a weight-0.1 trial's loss at the rung,
   so at least one of them is stopped. (An attention-KL weight would not do: that term is small here
   and the other terms' noise decides. The figure a real sweep ranks by, ``val_rmean``, is
   reported and tracked as well.)
2. A VLMo stage-3 sweep run by ``jobs/sweep.py`` in a subprocess against a ``ray start --head``
   cluster, interrupted with Ctrl-C (SIGINT) while its second trial trains, then started again:
   the finished trial is not run again, the interrupted one resumes and continues its MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _children(uri: str, experiment: str) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100) if exp else []


@pytest.fixture(scope="module")
def asha_sweep(ray_local, corpus, mlflow_server, tmp_path_factory):
    from vlforge.tune import load_sweep, run_sweep

    out = tmp_path_factory.mktemp("sweep_asha")
    name, experiment = f"asha-{uuid.uuid4().hex[:6]}", f"sweeps-{uuid.uuid4().hex[:6]}"
    path = out / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": str(REPO / "jobs" / "configs" / "two_stage_smoke.yaml"),
                "job": "two_stage",
                "set": [
                    f"data_root={corpus}",
                    "corpus=null",
                    "max_steps=6",
                    "max_batch_size=8",
                    # the shared teacher the trials distil from trains 2 steps a stage
                    *(
                        f"teacher.pretrain.{i}.{k}={v}"
                        for i in range(3)
                        for k, v in (("steps", 2), ("schedule.warmup_steps", 1))
                    ),
                ],
                "trial_stages": ["pretrain"],
                "space": {"student.stages.0.objectives.itc": {"type": "grid", "values": [0.1, 10.0]}},
                "search": {"algorithm": "grid", "num_samples": 2, "max_concurrent": 2},
                # One rung that decides (1 report); the other is at max_t = 3, the final report, which
                # FinishingASHA lets through. With reduction_factor 2 a second rung at 2 reports would
                # pit the two weight-0.1 trials against each other and stop one of them by batch noise.
                "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3},
                "metric": "loss",
                "mode": "min",
                "report_every": 2,
                "resources": {"num_workers": 1, "worker_cpus": 0.5, "trial_cpus": 0.01},
                "validation": {"shards": "scenes/val", "max_samples": 24},
                "storage_path": str(out),
                "tracking": {
                    "tracking_uri": mlflow_server.uri,
                    "experiment": experiment,
                    "buffer_dir": str(out / "buffer"),
                },
            }
        )
    )
    t0 = time.perf_counter()
    result = run_sweep(load_sweep(path), init_ray=False)
    print(result.summary())
    print(f"asha sweep wall time {time.perf_counter() - t0:.0f}s")
    return {"result": result, "name": name, "experiment": experiment, "root": out / name, "uri": mlflow_server.uri}


def test_asha_stops_a_trailing_trial_and_the_rest_finish(asha_sweep):
    rows = asha_sweep["result"].rows
    weight = "student.stages.0.objectives.itc"
    assert len(rows) == 4 and sorted(r[weight] for r in rows) == [0.1, 0.1, 10.0, 10.0]
    stopped = [r for r in rows if r["status"] == "stopped_early"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert stopped and all(r[weight] == 10.0 for r in stopped), rows
    assert len(stopped) + len(finished) == 4
    assert all(r["reports"] == 3 for r in finished) and all(r["reports"] < 3 for r in stopped)
    assert not asha_sweep["result"].interrupted
    # Every trial is a Ray Train run named after its trial id; only finished ones wrote their summary.
    runs = asha_sweep["root"] / "runs"
    for r in rows:
        assert (runs / f"{asha_sweep['name']}.{r['trial_id']}").is_dir()
        assert (runs / f"{asha_sweep['name']}.{r['trial_id']}" / "summary.json").exists() == (r["status"] == "finished")


def test_stopped_trials_leave_nothing_running(asha_sweep, ray_local):
    """Tune ended the stopped trials' actors and with them their Train runs: every CPU is free again."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + 180  # Ray removes a stopped trial's placement group asynchronously; slow under load
    while time.monotonic() < deadline:
        free, total = ray_local.available_resources().get("CPU", 0), ray_local.cluster_resources()["CPU"]
        live = [p for p in placement_group_table().values() if p["state"] != "REMOVED"]
        if free == total and not live:
            break
        time.sleep(2)
    assert free == total and not live, (free, total, live)


def test_mlflow_has_the_parent_and_one_child_per_trial(asha_sweep):
    client, runs = _children(asha_sweep["uri"], asha_sweep["experiment"])
    parent = [r for r in runs if r.data.tags.get("vlforge.sweep.role") == "parent"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].info.run_id
    trials = [r for r in runs if r.data.tags.get("vlforge.sweep.role") == "trial"]
    assert sorted(r.data.tags["vlforge.trial_id"] for r in trials) == sorted(
        r["trial_id"] for r in asha_sweep["result"].rows
    )
    status = {r["trial_id"]: r["status"] for r in asha_sweep["result"].rows}
    for run in trials:
        tid = run.data.tags["vlforge.trial_id"]
        assert run.data.tags["mlflow.parentRunId"] == pid
        assert run.data.tags["vlforge.trial_status"] == status[tid]
        assert run.info.status == ("FINISHED" if status[tid] == "finished" else "KILLED")
        assert "val_rmean" in run.data.metrics and "pretrain/loss" in run.data.metrics
        assert run.data.params["stages.0.objectives.itc"] in ("0.1", "10.0")
    shared = [r for r in runs if r.data.tags.get("vlforge.sweep.role") == "shared"]
    assert [r.info.run_name for r in shared] == [f"{asha_sweep['name']}.teacher-pretrain"]
    assert shared[0].data.tags["mlflow.parentRunId"] == pid
    artifacts = {a.path for a in client.list_artifacts(pid, "sweep")}
    assert {"sweep/best_config.yaml", "sweep/metric_vs_params.png", "sweep/results.txt"} <= artifacts
    assert parent[0].data.tags["vlforge.best_trial_id"] == asha_sweep["result"].best["trial_id"]


def test_best_config_runs_with_the_two_stage_job(asha_sweep):
    from vlforge.config import TwoStageConfig, load

    best = asha_sweep["result"].best
    assert best["student.stages.0.objectives.itc"] == 0.1 and best["status"] == "finished"
    cfg = load(TwoStageConfig, asha_sweep["root"] / "best_config.yaml")
    assert cfg.student.stages[0].objectives["itc"] == 0.1 and len(cfg.student.stages) == 4
    assert (asha_sweep["root"] / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((asha_sweep["root"] / "results.json").read_text())
    assert saved["best"]["trial_id"] == best["trial_id"] and len(saved["rows"]) == 4


STAGE3 = {
    "experiment": str(REPO / "jobs" / "configs" / "vlmo_stagewise_smoke.yaml"),
    "job": "train",
    "trial_stages": ["vl"],
    "space": {
        "stages.2.optimizer.lr": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3},
        "stages.2.optimizer.weight_decay": {"type": "choice", "values": [0.0, 0.01]},
    },
    "search": {"algorithm": "random", "num_samples": 3, "max_concurrent": 1, "seed": 3},
    "scheduler": {"kind": "fifo"},
    "metric": "val_rmean",
    "mode": "max",
    "report_every": 2,
    "resources": {"num_workers": 1, "worker_cpus": 0.5, "trial_cpus": 0.01},
}


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float, seen: list[str]) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matching {pattern!r} in {timeout}s; output:\n{''.join(seen[-60:])}")


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(
    ray_local, ray_head, corpus, mlflow_server, tmp_path, load_job
):
    name, experiment = f"resume-{uuid.uuid4().hex[:6]}", f"sweeps-{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **STAGE3,
                "set": [
                    "corpus=null",
                    f"data.shards={corpus}/scenes/train",
                    f"stages.0.data.shards={corpus}/concepts/train",
                    "num_workers=1",
                    "stages.0.steps=2",
                    "stages.1.steps=2",
                    "stages.2.steps=4",
                    "stages.0.schedule.warmup_steps=1",
                    "stages.1.schedule.warmup_steps=1",
                    "stages.2.schedule.warmup_steps=1",
                ],
                "validation": {"shards": f"{corpus}/scenes/val", "max_samples": 24},
                "storage_path": str(tmp_path / "out"),
                "tracking": {
                    "tracking_uri": mlflow_server.uri,
                    "experiment": experiment,
                    "buffer_dir": str(tmp_path / "buffer"),
                },
            }
        )
    )
    env = {**ray_head.env, "RAY_ADDRESS": f"127.0.0.1:{ray_head.gcs_port}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "sweep.py"), str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        first = _read_until(proc, r"trial (\w+): finished after", 400, seen).group(1)
        second = _read_until(proc, r"trial (\w+): \{.*\} -> Train run", 120, seen).group(1)
        client, _ = _children(mlflow_server.uri, experiment)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the second trial's Train run has started its MLflow run
            _, runs = _children(mlflow_server.uri, experiment)
            if any(r.data.tags.get("vlforge.trial_id") == second for r in runs):
                break
            time.sleep(2)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=240)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen)
    assert proc.returncode == 130, output[-4000:]
    assert "INTERRUPTED" in output and "run the same command again" in output
    root = tmp_path / "out" / name
    first_summary = root / "runs" / f"{name}.{first}" / "summary.json"
    first_mtime = first_summary.stat().st_mtime
    assert not (root / "trials" / f"{second}.json").exists()

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = load_job("sweep").main([str(path)])
    finally:
        os.chdir(cwd)
    assert code == 0
    result = json.loads((root / "results.json").read_text())
    ids = [r["trial_id"] for r in result["rows"]]
    assert len(ids) == 3 and first in ids and second in ids
    assert all(r["status"] == "finished" for r in result["rows"])
    assert first_summary.stat().st_mtime == first_mtime  # the finished trial did not train again

    _, runs = _children(mlflow_server.uri, experiment)
    trials = [r for r in runs if r.data.tags.get("vlforge.sweep.role") == "trial"]
    assert sorted(r.data.tags["vlforge.trial_id"] for r in trials) == sorted(ids)  # one child run per trial
    attempts = {r.data.tags["vlforge.trial_id"]: r.data.tags["vlforge.attempt"] for r in trials}
    assert attempts[first] == "1" and int(attempts[second]) >= 2  # the restarted trial continued its run
    assert all(r.info.status == "FINISHED" for r in trials)
    parents = [r for r in runs if r.data.tags.get("vlforge.sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
