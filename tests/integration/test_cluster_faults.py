"""Faults a cluster has, injected into real runs; each test is bounded in time.

1. The smoke two-stage job on a multi-node Ray cluster on this machine (a head and two
   nodes, each its own ``ray start``), Train workers placed one per node. While the teacher's
   first stage trains, the node of one of its workers is SIGKILLed (raylet, object store,
   workers: a machine gone). The run restarts its workers on the nodes left, resumes from its
   last checkpoint with at most ``checkpoint_every`` steps lost, and the job finishes and
   registers its student.
2. The S3-compatible server holding the shards goes down as an epoch's reads start and comes
   back (same port, same objects) a few seconds later: reads retry, and the epoch has every
   sample exactly once.
3. The MLflow server is down for part of a training run: training goes on, and once the
   server is back the run's metric history has every step.
4. Bad configs (unknown key, impossible ZeRO settings, missing shards, unreachable storage)
   exit 2 with a clear error, and the cluster never sees the job connect.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _job_env(cluster) -> dict[str, str]:
    """A driver's environment for ``cluster``: the head's (venv on PATH, auth off) plus its address."""
    return {
        **cluster.head.env,
        "RAY_ADDRESS": cluster.address,
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def _two_stage_args(corpus: Path, out: Path, name: str, uri: str, model: str, *more: str) -> list[str]:
    sets = [
        f"data_root={corpus}",
        "corpus=null",
        f"storage_path={out}",
        f"name={name}",
        f"tracking.tracking_uri={uri}",
        f"tracking.buffer_dir={out / 'buffer'}",
        f"register.model_name={model}",
        *more,
    ]
    return [a for s in sets for a in ("--set", s)]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- 1. node killed mid-stage


def test_two_stage_job_across_nodes_survives_a_node_kill(ray_cluster, corpus, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from vlforge.train.checkpoint import read_state
    from vlforge.train.runner import latest_checkpoint

    name, model = f"mn-{uuid.uuid4().hex[:6]}", f"dual-{uuid.uuid4().hex[:6]}"
    experiment = f"multinode-{uuid.uuid4().hex[:6]}"
    every = 2
    args = _two_stage_args(
        corpus,
        tmp_path,
        name,
        mlflow_server.uri,
        model,
        f"tracking.experiment={experiment}",
        "max_steps=8",
        f"checkpoint_every={every}",
        "max_failures=3",
        "placement_strategy=STRICT_SPREAD",
        "worker_cpus=1",
        "progress_every=1",
        "eval.max_samples=24",
        "eval.latency=false",
        "eval.max_teacher_pairs=100",
        # The node is killed in the teacher's first stage (8 steps a stage; batch 32 there, so that the kill
        # lands well inside it); every stage after it trains batches of 8, and 2 steps after the teacher's.
        *(f"teacher.pretrain.{i}.data.batch_size=8" for i in (1, 2)),
        *(
            f"teacher.finetune.{i}.{k}={v}"
            for i in range(2)
            for k, v in (("steps", 2), ("schedule.warmup_steps", 1), ("data.batch_size", 8))
        ),
        *(
            f"student.stages.{i}.{k}={v}"
            for i in range(4)
            for k, v in (("steps", 2), ("schedule.warmup_steps", 1), ("data.batch_size", 8))
        ),
    )
    log_path = tmp_path / "job.log"
    job = subprocess.Popen(
        [sys.executable, "jobs/two_stage.py", "--no-ablation", *args],
        cwd=REPO,
        env=_job_env(ray_cluster),
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )
    teacher = tmp_path / f"{name}.teacher-pretrain"
    killed: dict = {}
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and job.poll() is None:
            step = _read_int(teacher / "progress_step")
            if step is not None and step > every:  # a checkpoint exists; the first stage (8 steps) is running
                workers = list_actors(
                    address=ray_cluster.head.address,
                    raise_on_missing_output=False,
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                )
                victims = [n for n in (ray_cluster.node_of(a.node_id) for a in workers) if n is not None]
                if victims:
                    victims[0].kill()
                    killed = {
                        "step": step,
                        "node": victims[0].index,
                        "t": time.monotonic(),
                        "worker_nodes": len({a.node_id for a in workers}),
                    }
                    break
            time.sleep(0.1)
        assert killed, f"never saw the teacher's workers past step {every}:\n{log_path.read_text()[-4000:]}"
        code = job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-6000:]
    finished_s = time.monotonic() - killed["t"]

    state = read_state(latest_checkpoint(teacher))
    [resume] = state["resumes"]
    print(
        f"\nnode {killed['node']} killed at teacher step {killed['step']} (workers on {killed['worker_nodes']} "
        f"nodes); resumed at stage {resume['stage']} step {resume['step']}, {resume['lost_steps']} steps lost; "
        f"the job finished {finished_s:.0f}s after the kill"
    )
    assert killed["worker_nodes"] == 2, "STRICT_SPREAD put both workers on one node"
    assert resume["stage"] == "vl_concepts" and resume["weights_match"] is True
    assert resume["step"] % every == 0 and resume["lost_steps"] is not None and resume["lost_steps"] <= every
    from vlforge.config import TwoStageConfig, load

    stages = load(TwoStageConfig, str(REPO / "jobs/configs/two_stage_smoke.yaml"), []).teacher.pretrain
    assert state["global_step"] == 8 * len(stages)  # every teacher stage, 8 steps each, none skipped
    assert f"{name}.teacher-pretrain] 2 workers on 2 node(s)" in log
    for text in ("Evaluation (percent", "student-distilled", f"registered {model}"):
        assert text in log, text

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([exp.experiment_id], f"tags.`vlforge.run_key` = '{name}.teacher-pretrain'")
    assert int(run.data.tags["vlforge.attempt"]) >= 2
    assert run.data.tags["vlforge.env.cluster_nodes"] == "2"
    history = client.get_metric_history(run.info.run_id, "vl_concepts/loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))


# ---------------------------------------------------------------------------- 2. S3 server restarts


def test_s3_restart_while_shards_are_read(ray_local, corpus, seeded_s3_server):
    from vlforge.config import DataConfig, ImageConfig, StorageConfig, TokenizerConfig
    from vlforge.data.pipeline import build_dataset, sample_id
    from vlforge.data.shards import iter_samples, list_shards

    local = corpus / "scenes" / "train"
    expected = sorted(sample_id(s["__key__"]) for sh in list_shards(str(local)) for s in iter_samples(sh))
    bucket = f"restart-{uuid.uuid4().hex[:6]}"
    server = seeded_s3_server(bucket, "scenes/train", local)
    cfg = DataConfig(
        shards=f"s3://{bucket}/scenes/train",
        storage=StorageConfig(s3_endpoint_url=server.endpoint),
        batch_size=16,
        decode_batch_size=32,
        image=ImageConfig(size=32),
        tokenizer=TokenizerConfig(max_length=24),
        decode_concurrency=1,
    )
    down_s = 4.0
    ds, counters = build_dataset(cfg, train=True)  # lists the shards and reads the manifest: server up
    server.kill()
    t_down = time.monotonic()
    restarted: dict = {}

    def restart() -> None:
        time.sleep(down_s)
        restarted["t0"] = time.monotonic()
        server.start()
        restarted["t1"] = time.monotonic()

    timer = threading.Thread(target=restart, daemon=True)
    timer.start()
    got, first_batch_t = [], None
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        first_batch_t = first_batch_t or time.monotonic()
        got.extend(int(i) for i in batch["sample_id"])
    timer.join(60)
    epoch_s = time.monotonic() - t_down
    logs = server.logs

    def shard_gets(log: Path) -> list[str]:  # werkzeug's access log, ANSI colours and all
        return [line for line in log.read_text(errors="replace").splitlines() if "GET /" in line and ".tar " in line]

    before, after = shard_gets(logs[0]), shard_gets(logs[1])
    n_shards = len(list_shards(str(local)))
    print(
        f"\nS3 down {restarted['t0'] - t_down:.1f}s (+{restarted['t1'] - restarted['t0']:.1f}s to seed and bind) "
        f"as the epoch's reads started; {len(after)} shard GETs answered by the restarted server; "
        f"first batch {first_batch_t - t_down:.1f}s after the kill; epoch done in {epoch_s:.1f}s; "
        f"{len(got)} samples, {len(set(got))} distinct, {len(expected)} expected"
    )
    assert sorted(got) == expected, f"{len(got)} arrived ({len(set(got))} distinct), {len(expected)} expected"
    assert not before and len(after) >= n_shards, "the shards were not read from the restarted server"
    assert first_batch_t > restarted["t0"], "a batch arrived while the server was down: nothing was retried"
    assert counters.snapshot()["ok"] == len(expected)


# ---------------------------------------------------------------------------- 3. MLflow down mid-run


def test_training_finishes_through_an_mlflow_outage(ray_local, corpus, own_mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from vlforge.config import TrainRunConfig, from_dict
    from vlforge.train.runner import run_training

    server = own_mlflow_server
    name, steps = f"outage-{uuid.uuid4().hex[:6]}", 300
    cfg = from_dict(
        TrainRunConfig,
        {
            "model": "vlmo_debug",
            "name": name,
            "storage_path": str(tmp_path / "ray"),
            "num_workers": 1,
            "progress_every": 50,
            "checkpoint_every": 100,
            "data": {
                "shards": str(corpus / "scenes" / "train"),
                "batch_size": 4,
                "image": {"size": 32},
                "tokenizer": {"max_length": 16},
            },
            "stages": [{"name": "itc", "objectives": {"itc": 1.0}, "steps": steps, "optimizer": {"lr": 1e-3}}],
            "tracking": {"tracking_uri": server.uri, "experiment": "outage", "buffer_dir": str(tmp_path / "buf")},
        },
    )
    progress = tmp_path / "ray" / name / "progress_step"
    seen: dict = {}

    def outage() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            step = _read_int(progress)
            if "down" not in seen and step is not None and step >= 3:
                seen["down"] = step
                server.stop()
                seen["down_done"] = _read_int(progress)
            if "down" in seen and step is not None and step >= (seen["down_done"] or 0) + 20:
                seen["up_at"] = step
                server.start()
                seen["back_at"] = _read_int(progress)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    try:
        result = run_training(cfg, init_ray=False)
        watcher.join(120)
        if "up_at" not in seen:
            server.start()
        client = MlflowClient(server.uri)
        [run] = client.search_runs(
            [client.get_experiment_by_name("outage").experiment_id], f"tags.`vlforge.run_key` = '{name}'"
        )
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "itc/loss"))
        print(
            f"\nMLflow stopped at step {seen.get('down')} (gone by step {seen.get('down_done')}), restarted "
            f"at step {seen.get('up_at')}, answering "
            f"again at step {seen.get('back_at')} of {steps}; "
            f"run {run.info.status}; itc/loss steps logged: {len(history)} of {steps}"
        )
    finally:
        watcher.join(5)
    assert "down" in seen and "up_at" in seen, f"the outage did not happen inside the run: {seen}"
    assert seen["up_at"] < steps, f"the server came back only after training: {seen}"
    assert result.state["global_step"] == steps
    assert history == list(range(1, steps + 1))
    assert run.info.status == "FINISHED"
    assert not list((tmp_path / "buf").glob("*.jsonl")), "records left undelivered in the buffer"
    from ray.util.state import list_actors

    # vlforge.runtime's local Ray runs Train without the preemption watcher's actor process. The state
    # API is pointed at this session's local Ray: left to itself it finds the `ray start` cluster of
    # this module's node-kill test, whose drivers keep Ray's default and so do start watchers.
    gcs = ray_local.get_runtime_context().gcs_address
    classes = {a.class_name for a in list_actors(address=gcs, limit=10_000, raise_on_missing_output=False)}
    assert "TrainController" in classes, f"the state API did not see this run's controller: {sorted(classes)}"
    assert "PreemptionWatcher" not in classes


# ---------------------------------------------------------------------------- 4. bad configs


@pytest.mark.parametrize(
    "sets, message",
    [
        (["teacher.pretrian=[]"], "unknown key teacher.pretrian"),
        (["deepspeed.zero_stage=4"], "zero_stage must be 0, 1, 2 or 3"),
        (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "offload_optimizer needs zero_stage >= 1"),
        (
            ["student.stages.1.data.shards=scenes/no-such-split"],
            "run student-distilled, stage retrieval: shard set not found",
        ),
        (["data_root={tmp}/no-such-corpus"], "no-such-corpus does not exist"),
        (["data_root=s3://vlforge-shards/corpus"], "S3 endpoint http://127.0.0.1:9 unreachable"),
    ],
    ids=[
        "unknown-key",
        "zero-stage-4",
        "offload-without-zero",
        "missing-shard-set",
        "missing-data-root",
        "unreachable-s3",
    ],
)
def test_bad_config_fails_before_the_cluster_is_touched(ray_cluster, corpus, tmp_path, sets, message):
    import os

    from ray.util.state import list_jobs, list_placement_groups

    env = _job_env(ray_cluster)
    env["VLFORGE_S3_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    sets = [f"data_root={corpus}", *sets]
    sets = [s.format(tmp=tmp_path) for s in sets]
    before_jobs = {j.job_id for j in list_jobs(address=ray_cluster.head.address)}
    before_pgs = len(list_placement_groups(address=ray_cluster.head.address, raise_on_missing_output=False))
    t0 = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "jobs/two_stage.py",
            "--set",
            "corpus=null",
            "--set",
            f"storage_path={tmp_path / 'out'}",
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = time.monotonic() - t0
    print(f"\n{sets}: exit {done.returncode} in {took:.1f}s: {done.stderr.strip().splitlines()[-1][:200]}")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert {j.job_id for j in list_jobs(address=ray_cluster.head.address)} == before_jobs, "the job joined the cluster"
    assert len(list_placement_groups(address=ray_cluster.head.address, raise_on_missing_output=False)) == before_pgs
    assert not os.path.exists(tmp_path / "out"), "the job wrote to its storage path"
