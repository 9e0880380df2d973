"""vlforge.tracking against a local SQLite MLflow store: params, artifacts, secrets, resume,
rank handling, non-finite metrics, the loss curve and the outage buffer (failures injected)."""

from __future__ import annotations

import inspect
import json
import math
import socket
import time
import uuid
from dataclasses import dataclass, field

import pytest

from vlforge.config import DataDemoConfig, TrackingConfig
from vlforge.tracking import (
    REDACTED,
    RUN_KEY_TAG,
    ConfigChangedError,
    NullTracker,
    Tracker,
    TrackingError,
    is_secret_name,
    make_tracker,
    print0,
    resolve_tracking_uri,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); tests use their own experiment."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def cfg(store_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return TrackingConfig(
        tracking_uri=store_uri, experiment=f"unit-{uuid.uuid4().hex[:8]}", buffer_dir=str(tmp_path / "buffer")
    )


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri)


def _steps(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _all_artifacts(client, run_id, dst):
    path = client.download_artifacts(run_id, "", str(dst))
    from pathlib import Path

    return {p.relative_to(path).as_posix(): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://env:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://cfg:5000")) == "http://cfg:5000"


def test_secret_names():
    for name in (
        "secret_key",
        "storage.aws_secret_access_key",
        "db.password",
        "hf_token",
        "hfToken",
        "api_key",
        "apiKey",
        "credentials",
        "s3.access_key",
        "MLFLOW_TRACKING_TOKEN",
        "private-key",
    ):
        assert is_secret_name(name), name
    for name in (
        "tokenizer.name",
        "tokenizer.max_length",
        "max_tokens",
        "data.shards",
        "keyframes",
        "TOKENIZERS_PARALLELISM",
        "passes",
    ):
        assert not is_secret_name(name), name


def test_params_flattened_and_config_artifact(cfg, tmp_path):
    demo = DataDemoConfig()
    with Tracker(cfg) as tracker:
        run_id = tracker.start("params")
        logged = tracker.log_config(demo)
    run = _client(cfg).get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params == logged
    assert params["data.batch_size"] == str(demo.data.batch_size)
    assert params["data.image.mean.0"] == "0.5"
    assert params["data.tokenizer.name"] == "minilm"
    assert params["corpus.image_format"] == "jpg"
    assert params["data.decode_concurrency"] == "None"
    files = _all_artifacts(_client(cfg), run_id, tmp_path / "dl")
    import yaml

    from vlforge.config import from_dict

    assert from_dict(DataDemoConfig, yaml.safe_load(files["config.yaml"])) == demo
    assert run.data.tags[RUN_KEY_TAG] == "params"


def test_params_are_chunked_past_100(cfg):
    big = {f"k{i:03d}": i for i in range(250)}
    with Tracker(cfg) as tracker:
        run_id = tracker.start("chunks")
        tracker.log_config(big)
    assert len(_client(cfg).get_run(run_id).data.params) == 250


def test_long_param_values_are_cut_to_mlflow_limit(cfg):
    with Tracker(cfg) as tracker:
        run_id = tracker.start("long")
        tracker.log_config({"prompt": "x" * 7000})
    assert len(_client(cfg).get_run(run_id).data.params["prompt"]) == 6000


def test_secrets_never_reach_mlflow(cfg, tmp_path, monkeypatch, store_uri):
    env_secret = f"AKIAenv{uuid.uuid4().hex}"
    cfg_secret = f"cfgsecret{uuid.uuid4().hex}"
    url_secret = f"urlpw{uuid.uuid4().hex}"
    token_secret = f"hftok{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    config = {
        "storage": {
            "secret_key": cfg_secret,
            "endpoint": f"https://bob:{url_secret}@s3.example.com/x",
            "region": "eu-west-1",
        },
        "hf_token": token_secret,
        "note": f"copied by mistake: {env_secret}",
        "tokenizer": {"name": "minilm", "max_length": 40},
        "password": None,
    }
    with Tracker(cfg) as tracker:
        run_id = tracker.start("secrets", tags={"origin": f"s3://{env_secret}/bucket", "api_key": cfg_secret})
        params = tracker.log_config(config)
        tracker.log_environment({"endpoint": f"http://alice:{url_secret}@host:9000"})
        tracker.set_tags({"creds_hint": f"{env_secret}"})
        tracker.log_metrics({"loss": 1.0}, 0)
    client = _client(cfg)
    run = client.get_run(run_id)
    files = _all_artifacts(client, run_id, tmp_path / "dl")
    blobs = [
        json.dumps(run.data.params),
        json.dumps(run.data.tags),
        json.dumps(run.data.metrics),
        *(b.decode("utf-8", "replace") for b in files.values()),
    ]
    db = store_uri.removeprefix("sqlite:///")
    blobs.append(open(db, "rb").read().decode("latin-1"))
    for secret in (env_secret, cfg_secret, url_secret, token_secret):
        for blob in blobs:
            assert secret not in blob
    assert params["storage.secret_key"] == REDACTED
    assert params["hf_token"] == REDACTED
    assert params["password"] == "None"
    assert params["storage.endpoint"] == "https://bob:***@s3.example.com/x"
    assert params["note"] == "copied by mistake: ***"
    assert params["tokenizer.name"] == "minilm" and params["tokenizer.max_length"] == "40"
    assert run.data.tags["api_key"] == REDACTED
    assert "secret_key: <redacted>" in files["config.yaml"].decode()


def test_resume_by_run_key_continues_the_same_run(cfg):
    demo = DataDemoConfig()
    first = Tracker(cfg)
    run_id = first.start("ray-train-run-7", run_name="seven")
    first.log_config(demo)
    for step in range(3):
        first.log_metrics({"loss": 3.0 - step}, step)
    first.end("FAILED")

    second = Tracker(cfg)
    assert second.start("ray-train-run-7") == run_id
    assert second.resumed
    second.log_config(demo)
    for step in range(3, 5):
        second.log_metrics({"loss": 3.0 - step}, step)
    client = _client(cfg)
    assert client.get_run(run_id).info.status == "RUNNING"
    second.end()

    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "seven"
    assert run.data.tags["vlforge.attempt"] == "2"
    assert _steps(client, run_id, "loss") == [(s, 3.0 - s) for s in range(5)]

    third = Tracker(cfg)
    assert third.start("another-key") != run_id
    third.end()


def test_resume_with_changed_config_is_refused(cfg):
    first = Tracker(cfg)
    first.start("changed")
    first.log_config(DataDemoConfig())
    first.end("KILLED")
    second = Tracker(cfg)
    second.start("changed")
    with pytest.raises(ConfigChangedError, match=r"data\.batch_size: '64' -> '8'"):
        second.log_config(DataDemoConfig(data=DataDemoConfig().data.__class__(batch_size=8)))
    second.end("FAILED")


def test_deleted_run_is_not_resumed(cfg):
    first = Tracker(cfg)
    old = first.start("deleted")
    first.end()
    _client(cfg).delete_run(old)
    second = Tracker(cfg)
    assert second.start("deleted") != old
    second.end()


def test_deleted_experiment_is_restored(cfg):
    client = _client(cfg)
    client.delete_experiment(client.create_experiment(cfg.experiment))
    tracker = Tracker(cfg)
    run_id = tracker.start("restored")
    tracker.end()
    assert client.get_experiment_by_name(cfg.experiment).lifecycle_stage == "active"
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name(cfg.experiment).experiment_id


def test_nested_run_has_parent(cfg):
    parent = Tracker(cfg)
    parent_id = parent.start("sweep")
    child = Tracker(cfg)
    child_id = child.start("sweep/trial-0", parent_run_id=parent_id)
    child.end()
    parent.end()
    assert _client(cfg).get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id


def test_null_tracker_on_rank_1(cfg, tmp_path, monkeypatch):
    tracker = make_tracker(cfg, rank=1)
    assert isinstance(tracker, NullTracker)
    assert tracker.start("x") is None
    tracker.log_config(DataDemoConfig())
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.log_counters({"read": 3}, 0)
    tracker.log_environment({"a": 1})
    tracker.log_loss_curve({"loss": [(0, 1.0)]})
    tracker.set_tags({"a": "b"})
    tracker.log_artifact(__file__)
    assert tracker.end("FAILED").complete
    assert tracker.close().complete
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "buffer").exists()
    assert _client(cfg).get_experiment_by_name(cfg.experiment) is None
    assert isinstance(make_tracker(TrackingConfig(enabled=False), rank=0), NullTracker)
    assert isinstance(make_tracker(cfg, rank=0), Tracker)
    monkeypatch.setenv("RANK", "3")
    assert isinstance(make_tracker(cfg), NullTracker)


def test_null_tracker_mirrors_tracker_api():
    public = [n for n, v in vars(Tracker).items() if callable(v) and not n.startswith("_")]
    for name in public + ["__enter__", "__exit__"]:
        assert hasattr(NullTracker, name), name
        if name != "__exit__":
            assert list(inspect.signature(getattr(NullTracker, name)).parameters) == list(
                inspect.signature(getattr(Tracker, name)).parameters
            ), name


def test_print0(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    print0("hidden")
    monkeypatch.setenv("RANK", "0")
    print0("shown", 1)
    assert capsys.readouterr().out == "shown 1\n"


def test_non_finite_metrics_skipped_and_counted(cfg, caplog):
    tracker = Tracker(cfg)
    run_id = tracker.start("nan")
    with caplog.at_level("WARNING", logger="vlforge.tracking"):
        for step, value in enumerate([1.0, math.nan, 0.5, math.inf, -math.inf, 0.25]):
            tracker.log_metrics({"loss": value, "lr": 0.1}, step)
    report = tracker.end()
    assert report.nonfinite_skipped == {"loss": 3}
    assert "non-finite" in report.summary()
    assert any("non-finite" in r.message for r in caplog.records)
    client = _client(cfg)
    assert _steps(client, run_id, "loss") == [(0, 1.0), (2, 0.5), (5, 0.25)]
    assert len(_steps(client, run_id, "lr")) == 6


def test_log_every_and_counters(cfg):
    cfg.log_every = 3
    tracker = Tracker(cfg)
    run_id = tracker.start("every")
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.log_metrics({"loss": 99.0}, 10, force=True)
    tracker.log_counters({"read": 100, "ok": 95, "skipped.corrupt_image": 3, "skipped.bad_json": 2}, 10)
    tracker.end()
    client = _client(cfg)
    assert [s for s, _ in _steps(client, run_id, "loss")] == [0, 3, 6, 9, 10]
    metrics = client.get_run(run_id).data.metrics
    assert metrics["data/read"] == 100
    assert metrics["data/skipped/corrupt_image"] == 3
    assert metrics["data/skipped/bad_json"] == 2
    assert metrics["data/skipped"] == 5


def test_loss_curve_png_logged(cfg, tmp_path):
    tracker = Tracker(cfg)
    run_id = tracker.start("curve")
    history = {"loss": [(s, 2.0 / (s + 1)) for s in range(20)], "itc": [(s, 1.0 / (s + 1)) for s in range(0, 20, 2)]}
    tracker.log_loss_curve(history)
    tracker.log_environment()
    tracker.end()
    client = _client(cfg)
    files = _all_artifacts(client, run_id, tmp_path / "dl")
    png = files["loss_curve.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(png)).size[1] > Image.open(BytesIO(png)).size[0] / 2
    tags = client.get_run(run_id).data.tags
    for key in ("python", "torch", "ray", "deepspeed", "mlflow", "transformers", "vlforge", "git_commit", "hostname"):
        assert tags[f"vlforge.env.{key}"], key
    import ray

    assert ("vlforge.env.ray.nodes" in tags) == ray.is_initialized()


class _Flaky:
    """Wraps MlflowClient.log_batch / log_artifact: raises connection errors while ``down``."""

    def __init__(self, client):
        self.down = False
        self.calls = 0
        for name in ("log_batch", "log_artifact"):
            real = getattr(client, name)
            setattr(client, name, self._wrap(real))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.down:
                import requests

                raise requests.exceptions.ConnectionError("connection refused (injected)")
            return real(*args, **kwargs)

        return call


def test_outage_buffers_in_order_and_delivers_later(cfg, tmp_path):
    tracker = Tracker(cfg, backoff_s=0.2, max_backoff_s=0.4)
    run_id = tracker.start("outage")
    flaky = _Flaky(tracker.client)
    tracker.log_metrics({"loss": 0.0}, 0)
    flaky.down = True
    for step in range(1, 8):
        tracker.log_metrics({"loss": float(step)}, step)
        time.sleep(0.05)
    tracker.log_loss_curve({"loss": [(s, float(s)) for s in range(8)]})
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "retrieval.json").write_text('{"r@1": 0.5}')
    tracker.log_artifact(evals)
    (evals / "retrieval.json").unlink()
    buffer = tmp_path / "buffer" / f"{run_id}.jsonl"
    lines = [json.loads(x) for x in buffer.read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "metric"] == list(range(1, 8))
    assert tracker.pending == 9
    assert flaky.calls < 8
    flaky.down = False
    time.sleep(0.5)
    tracker.log_metrics({"loss": 8.0}, 8)
    assert tracker.pending == 0 and not buffer.exists()
    report = tracker.end()
    assert report.complete, report.summary()
    client = _client(cfg)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(9)]
    assert [m.timestamp for m in history] == sorted(m.timestamp for m in history)
    assert {f.path for f in client.list_artifacts(run_id)} == {"loss_curve.png", "evals"}
    assert [f.path for f in client.list_artifacts(run_id, "evals")] == ["evals/retrieval.json"]
    assert not (tmp_path / "buffer" / f"{run_id}.files").exists()


def test_undelivered_is_reported_and_delivered_on_resume(cfg, tmp_path):
    tracker = Tracker(cfg)
    run_id = tracker.start("lost")
    flaky = _Flaky(tracker.client)
    flaky.down = True
    for step in range(4):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.set_tags({"phase": "stage1"})
    report = tracker.end("FINISHED", flush_timeout_s=0.5)
    assert not report.complete
    assert report.undelivered == {"metric": 4, "tag": 1}
    assert report.buffer_path == str(tmp_path / "buffer" / f"{run_id}.jsonl")
    assert "NOT delivered" in report.summary() and report.buffer_path in report.summary()
    assert _client(cfg).get_metric_history(run_id, "loss") == []

    again = Tracker(cfg)
    assert again.start("lost") == run_id
    assert again.pending == 0
    again.end()
    client = _client(cfg)
    assert _steps(client, run_id, "loss") == [(s, float(s)) for s in range(4)]
    assert client.get_run(run_id).data.tags["phase"] == "stage1"


def test_rejected_records_are_dropped_not_retried(cfg):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    tracker = Tracker(cfg)
    tracker.start("rejected")
    real = tracker.client.log_batch

    def refuse(*args, **kwargs):
        raise MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)

    tracker.client.log_batch = refuse
    tracker.log_metrics({"loss": 1.0}, 0)
    assert tracker.pending == 0
    tracker.client.log_batch = real
    report = tracker.end()
    assert report.rejected == 1 and not report.complete


def test_unreachable_server_fails_start_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", buffer_dir=str(tmp_path / "b")))
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="tracking.enabled=false"):
        tracker.start("down")
    assert time.monotonic() - t0 < 10
    assert tracker.run_id is None


def test_methods_need_a_running_run(cfg):
    with pytest.raises(RuntimeError, match="start"):
        Tracker(cfg).log_metrics({"loss": 1.0}, 0)
    tracker = Tracker(cfg)
    tracker.start("ended")
    first = tracker.end("KILLED")
    assert tracker.end("FINISHED") is first
    assert _client(cfg).get_run(tracker.run_id).info.status == "KILLED"
    with pytest.raises(RuntimeError, match="already ended"):
        tracker.log_metrics({"loss": 1.0}, 0)
    with pytest.raises(ValueError):
        Tracker(cfg).start("it's")


@dataclass
class _Nested:
    names: list = field(default_factory=lambda: ["a", "b"])
    empty: dict = field(default_factory=dict)


def test_dataclass_lists_and_empty_dicts(cfg):
    tracker = Tracker(cfg)
    run_id = tracker.start("nested")
    tracker.log_config(_Nested())
    tracker.end()
    params = _client(cfg).get_run(run_id).data.params
    assert params == {"names.0": "a", "names.1": "b", "empty": "{}"}


def test_print0_bypasses_a_patched_print(monkeypatch):
    """Ray Train's workers patch ``print`` to print and log; print0 then writes to the real stdout once."""
    import builtins
    import io
    import sys

    from vlforge.tracking import logging as vlog

    calls = []

    def patched(*args, file=None, **kwargs):
        calls.append(file)

    patched.__module__ = "ray.train.v2._internal.logging.patch_print"
    real = io.StringIO()
    monkeypatch.setattr(builtins, "print", patched)
    monkeypatch.setattr(sys, "__stdout__", real)
    monkeypatch.setenv("RANK", "0")
    vlog.print0("once")
    assert calls == [real]


def test_one_experiment_helper_creates_finds_and_restores(cfg):
    from vlforge.tracking.store import experiment_id

    client = _client(cfg)
    first = experiment_id(client, "helper-exp")
    assert experiment_id(client, "helper-exp") == first
    client.delete_experiment(first)
    assert experiment_id(client, "helper-exp") == first
    assert client.get_experiment(first).lifecycle_stage == "active"
