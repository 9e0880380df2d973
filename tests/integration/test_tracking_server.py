"""vlforge.tracking against a real ``mlflow server`` on 127.0.0.1: a run with params,
stepped metrics and served artifacts; resume by run key; and a server outage in the
middle of training (stop the server, keep logging, restart it, check every step arrived
exactly once and in order)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from vlforge.config import DataDemoConfig, TrackingConfig
from vlforge.tracking import RUN_KEY_TAG, Tracker

pytestmark = pytest.mark.integration


def _cfg(server, tmp_path, **kw) -> TrackingConfig:
    return TrackingConfig(
        tracking_uri=server.uri, experiment=f"it-{uuid.uuid4().hex[:8]}", buffer_dir=str(tmp_path / "buffer"), **kw
    )


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def test_run_on_server_with_params_metrics_artifacts(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(mlflow_server, tmp_path, tags={"team": "vl"})
    demo = DataDemoConfig()
    tracker = Tracker(cfg)
    run_id = tracker.start("server-run")
    tracker.log_config(demo)
    tracker.log_environment()
    for step in range(6):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-3}, step)
    tracker.log_counters({"read": 120, "ok": 118, "skipped.bad_json": 2}, 5)
    tracker.log_loss_curve({"loss": [(s, 1.0 / (s + 1)) for s in range(6)]})
    report = tracker.end()
    assert report.complete, report.summary()

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert run.data.params["data.batch_size"] == str(demo.data.batch_size)
    assert run.data.tags[RUN_KEY_TAG] == "server-run" and run.data.tags["team"] == "vl"
    assert run.data.tags["vlforge.env.mlflow"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (s, 1.0 / (s + 1)) for s in range(6)
    ]
    assert run.data.metrics["data/skipped/bad_json"] == 2
    assert {f.path for f in client.list_artifacts(run_id)} >= {"config.yaml", "loss_curve.png"}
    assert list(mlflow_server.artifacts.rglob("config.yaml"))

    again = Tracker(cfg)
    assert again.start("server-run") == run_id
    again.log_config(demo)
    again.end()
    exp = client.get_experiment_by_name(cfg.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_server_outage_loses_nothing(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(mlflow_server, tmp_path)
    tracker = Tracker(cfg, backoff_s=0.5, max_backoff_s=2.0)
    run_id = tracker.start("outage")
    tracker.log_config(DataDemoConfig())
    timings: dict[str, list[float]] = {"up": [], "down": []}

    def step(n: int, phase: str) -> None:
        t0 = time.monotonic()
        tracker.log_metrics({"loss": 10.0 - 0.1 * n, "step_sq": float(n * n)}, n)
        timings[phase].append(time.monotonic() - t0)

    for n in range(0, 10):
        step(n, "up")
    mlflow_server.stop()
    try:
        for n in range(10, 40):
            step(n, "down")
            time.sleep(0.1)
        attempts_steps = tracker.failed_attempts
        t0 = time.monotonic()
        tracker.log_loss_curve({"loss": [(s, 10.0 - 0.1 * s) for s in range(40)]})
        tracker.set_tags({"phase": "during-outage"})
        other_s = time.monotonic() - t0
        buffer = tmp_path / "buffer" / f"{run_id}.jsonl"
        buffered = [json.loads(line) for line in buffer.read_text().splitlines()]
        assert [r["step"] for r in buffered if r["kind"] == "metric" and r["key"] == "loss"] == list(range(10, 40))
        assert tracker.pending == len(buffered)
    finally:
        t_restart = time.monotonic()
        mlflow_server.start()
        restart_s = time.monotonic() - t_restart
    pending_before = tracker.pending
    step(40, "up")
    pending_after_step = tracker.pending
    t0 = time.monotonic()
    report = tracker.close()
    close_s = time.monotonic() - t0
    assert report.complete, report.summary()
    assert not buffer.exists()

    client = _client(mlflow_server)
    for key, fn in (("loss", lambda n: 10.0 - 0.1 * n), ("step_sq", lambda n: float(n * n))):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == list(range(41)), key
        assert [m.value for m in history] == [fn(n) for n in range(41)], key
        assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["phase"] == "during-outage"
    assert "loss_curve.png" in {f.path for f in client.list_artifacts(run_id)}

    down = timings["down"]
    print(
        f"\noutage: {len(down)} logging calls while the server was down: max {max(down):.3f} s, "
        f"mean {sum(down) / len(down):.4f} s, {attempts_steps} delivery attempts failed (backoff); "
        f"log_loss_curve + set_tags while down {other_s:.2f} s; "
        f"calls while up: max {max(timings['up']):.3f} s; server restart {restart_s:.1f} s; "
        f"{pending_before} records pending after the restart, {pending_after_step} after the next "
        f"log_metrics, close() took {close_s:.2f} s"
    )
    assert max(down) < 2.0 and other_s < 5.0
    assert 1 <= attempts_steps < len(down)


def test_hung_server_costs_one_timeout_per_backoff(mlflow_server, tmp_path, monkeypatch):
    """A server that accepts connections but never answers: each delivery attempt ends at the
    tracker's HTTP timeout (not MLflow's default 120 s x 7 retries), later calls wait for the
    backoff, and a request the server finishes after it wakes up is not stored twice."""
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(_cfg(mlflow_server, tmp_path), http_timeout_s=1, backoff_s=30.0)
    run_id = tracker.start("hung")
    tracker.log_metrics({"loss": 0.0}, 0)
    mlflow_server.pause()
    try:
        durations = []
        for n in range(1, 11):
            t0 = time.monotonic()
            tracker.log_metrics({"loss": float(n)}, n)
            durations.append(time.monotonic() - t0)
    finally:
        mlflow_server.resume()
    report = tracker.close()
    assert report.complete, report.summary()
    print(f"\nhung server: first call {durations[0]:.2f} s, others max {max(durations[1:]):.3f} s")
    assert 0.9 < durations[0] < 4.0
    assert max(durations[1:]) < 0.5
    history = _client(mlflow_server).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(n, float(n)) for n in range(11)]
