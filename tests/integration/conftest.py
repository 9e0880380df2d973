"""Integration fixtures: a real MLflow tracking server and real Ray clusters on 127.0.0.1.

``mlflow_server`` (session) runs ``mlflow server`` with a SQLite backend and served
artifacts in a temporary directory, with job execution off (otherwise it starts about
ten extra processes). Tests may ``stop()`` and ``restart()`` it: it comes back on the same
port with the same backend, the way a restarted tracking server would.

``ray_head`` is a one-node cluster from ``ray start --head``; ``ray_cluster`` (module) is a
multi-node one on this machine: a head and two more nodes, each a ``ray start`` of its own
(its own raylet, object store and workers) that a test can kill like a failed machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlforge.runtime import PREEMPTION_WATCHER_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(
        self, tmp: Path, port: int | None = None, artifacts: str | None = None, env: dict[str, str] | None = None
    ):
        self.tmp = tmp
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{tmp / 'mlflow.db'}"
        self.artifacts = artifacts or tmp / "artifacts"  # a local directory or s3://bucket/prefix
        self.env = env or {}
        self.log_path = tmp / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 90.0) -> MlflowServer:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server not healthy after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Terminate the server and its worker processes (its own process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None
        deadline = time.monotonic() + 15
        while self._healthy() and time.monotonic() < deadline:
            time.sleep(0.1)

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel but never answered (a hung server)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def load_job():
    """``load_job("sweep")``: the script ``jobs/sweep.py`` as a module, to call its ``main([...])``."""
    jobs = str(Path(__file__).resolve().parents[2] / "jobs")

    def load(name: str):
        sys.path.insert(0, jobs)
        try:
            return __import__(name)
        finally:
            sys.path.pop(0)

    return load


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()


@pytest.fixture
def own_mlflow_server(tmp_path):
    """A tracking server of the test's own, for tests that stop it (an outage) while others may log."""
    (tmp_path / "own_mlflow").mkdir()
    server = MlflowServer(tmp_path / "own_mlflow").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_s3_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` whose artifacts live in a bucket of the S3-compatible test server
    (served through the tracking server: clients need no S3 settings)."""
    bucket = s3_server.new_bucket()
    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow_s3_server"),
        artifacts=f"s3://{bucket}/mlartifacts",
        env={"MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint},
    ).start()
    server.bucket = bucket
    yield server
    server.stop()


class RayHead:
    """``ray start --head --block`` in its own process group, dashboard (job server) on 127.0.0.1.

    Stopped by killing that process group, never with ``ray stop`` (which would also stop
    the test session's own local Ray)."""

    def __init__(self, tmp: Path, num_cpus: int = 4, system_env: dict[str, str] | None = None):
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus
        self.log_path = tmp / "ray_head.log"
        self.proc: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        # The session's local Ray turned Ray Train's preemption watcher off (vlforge.runtime); a
        # cluster's drivers run with Ray's default, as on a real cluster.
        self.env.pop(PREEMPTION_WATCHER_ENV, None)
        self.system_env = system_env or {}

    def start(self, timeout: float = 120.0) -> RayHead:
        ray_cli = Path(sys.executable).parent / "ray"
        self.proc = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--num-cpus={self.num_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--disable-usage-stats",
                # Agents default to fixed ports that the session's own local Ray already holds.
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--resources={json.dumps({'vlforge_head': 1})}",
            ],
            env={**self.env, **self.system_env},
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2):
                    self._forget_current_cluster()
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"Ray head's job server not up in {timeout}s:\n{self.log_tail()}")

    def submit(self, entrypoint: list[str], working_dir: Path, timeout: float) -> SubmittedJob:
        """``ray job submit --no-wait --working-dir ... -- <entrypoint>``, then waits for the job to end.

        The job's status and logs are read through the job server's REST API, not by following the
        log stream: ``ray job submit`` without ``--no-wait`` exits 1 when that WebSocket drops while the
        job still runs (close code 1006; Ray issues #57002, #60665), which was seen here under load."""
        from ray.job_submission import JobSubmissionClient

        ray_cli = Path(sys.executable).parent / "ray"
        job_id = f"vlforge-test-{uuid.uuid4().hex[:8]}"
        cmd = [
            str(ray_cli),
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            job_id,
            "--no-wait",
            "--working-dir",
            str(working_dir),
            "--",
            *entrypoint,
        ]
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
            # The job server answers before the node's job agent is up; the job was not accepted then.
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        submitted = done.stdout + done.stderr
        if done.returncode != 0:
            return SubmittedJob(job_id, "NOT_SUBMITTED", submitted, "")
        client = JobSubmissionClient(self.address)
        deadline = time.monotonic() + timeout
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        if not status.is_terminal():
            client.stop_job(job_id)
        return SubmittedJob(job_id, str(status.value), submitted, client.get_job_logs(job_id))

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what the head left running in its group
        except ProcessLookupError:
            pass
        self.proc = None
        self._forget_current_cluster()

    def _forget_current_cluster(self) -> None:
        # `ray start` records its address here, and a later plain `ray.init()` would try to join it.
        current = Path("/tmp/ray/ray_current_cluster")
        try:
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()
        except OSError:
            pass

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class SubmittedJob:
    """A job submitted by ``RayHead.submit``: its final status (``SUCCEEDED``, ``FAILED``, ...), the
    output of ``ray job submit`` and the job's own logs."""

    job_id: str
    status: str
    submit_output: str
    logs: str


class RayNode:
    """One more node of a ``RayHead``'s cluster: ``ray start --address=<head> --block`` in its own
    process group, tagged with the custom resource ``vlforge_node_<i>`` so tests can tell nodes apart.
    ``kill()`` SIGKILLs the group (raylet, object store, workers): a machine that died."""

    def __init__(self, head: RayHead, index: int, num_cpus: int):
        self.head, self.index, self.num_cpus = head, index, num_cpus
        self.resource = f"vlforge_node_{index}"
        self.log_path = head.log_path.with_name(f"ray_node_{index}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> RayNode:
        ray_cli = Path(sys.executable).parent / "ray"
        self.proc = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                f"--address={self.head.gcs_address}",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.num_cpus}",
                "--disable-usage-stats",
                f"--resources={json.dumps({self.resource: 1})}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ],
            env={**self.head.env, **self.head.system_env},
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start (node {self.index}) exited {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            if self.node_id() is not None:
                return self
            time.sleep(1)
        raise RuntimeError(f"node {self.index} did not join the cluster in {timeout}s")

    def node_id(self) -> str | None:
        """This node's id while the head lists it alive."""
        from ray.util.state import list_nodes

        for n in list_nodes(
            address=self.head.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        ):
            if self.resource in (n.resources_total or {}):
                return n.node_id
        return None

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.proc = None


class RayCluster:
    """A multi-node Ray cluster on this machine: a ``RayHead`` and ``RayNode``s. The head notices a
    dead node within a few seconds (health checks every 0.5 s, 3 misses) instead of Ray's default ~30 s."""

    HEALTH = {
        "RAY_health_check_initial_delay_ms": "1000",
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }

    def __init__(self, tmp: Path, head_cpus: int, node_cpus: list[int]):
        self.head = RayHead(tmp, num_cpus=head_cpus, system_env=self.HEALTH)
        self.nodes = [RayNode(self.head, i + 1, c) for i, c in enumerate(node_cpus)]

    def start(self) -> RayCluster:
        self.head.start()
        try:
            for n in self.nodes:
                n.start()
        except Exception:
            self.stop()
            raise
        return self

    @property
    def address(self) -> str:
        return self.head.gcs_address

    def node_of(self, node_id: str) -> RayNode | None:
        return next((n for n in self.nodes if n.proc is not None and n.node_id() == node_id), None)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()
        self.head.stop()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head (2 CPUs) + two nodes (1 CPU each), all on 127.0.0.1."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray_cluster"), head_cpus=2, node_cpus=[1, 1]).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def ray_head(tmp_path):
    head = RayHead(tmp_path).start()
    yield head
    head.stop()
