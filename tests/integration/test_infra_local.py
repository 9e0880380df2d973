"""infra/local/up.sh and down.sh for real: moto's S3 server and an MLflow tracking server on
127.0.0.1 (free ports, a temporary state dir), a run logged through the tracking URI whose
artifact lands in the S3 server's mlflow-artifacts bucket, idempotent up and down.

    .venv/bin/python -m pytest -q tests/integration/test_infra_local.py -p no:cacheprovider
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UP, DOWN = REPO / "infra" / "local" / "up.sh", REPO / "infra" / "local" / "down.sh"
BUCKETS = {"vlforge-data", "vlforge-runs", "mlflow-artifacts"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (a server and, for MLflow, its workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


class LocalInfra:
    def __init__(self, tmp: Path):
        self.dir = tmp / "state"
        self.s3_port, self.mlflow_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "VLFORGE_LOCAL_DIR": str(self.dir),
            "VLFORGE_S3_PORT": str(self.s3_port),
            "VLFORGE_MLFLOW_PORT": str(self.mlflow_port),
            "PYTHON": sys.executable,
            "VLFORGE_LOCAL_TIMEOUT": "90",
        }

    def run(self, script: Path) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(script)], env=self.env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, f"{script.name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def pids(self) -> dict[str, int]:
        return {name: int((self.dir / f"{name}.pid").read_text()) for name in ("s3", "mlflow")}

    def settings(self) -> dict[str, str]:
        out = {}
        for line in (self.dir / "env").read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                out[key] = value
        return out


@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    local = LocalInfra(tmp_path_factory.mktemp("local_infra"))
    try:
        local.run(UP)
        local.first_pids = local.pids()
        yield local
    finally:
        subprocess.run(["bash", str(DOWN)], env=local.env, capture_output=True, timeout=60)


def test_env_file_points_at_the_local_servers(infra):
    s = infra.settings()
    s3 = f"http://127.0.0.1:{infra.s3_port}"
    assert s["VLFORGE_S3_ENDPOINT"] == s["AWS_ENDPOINT_URL_S3"] == s["MLFLOW_S3_ENDPOINT_URL"] == s3
    assert s["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{infra.mlflow_port}"
    assert "DUMMY" in (infra.dir / "env").read_text()


def test_s3_server_has_the_buckets(infra):
    import boto3

    s = infra.settings()
    s3 = boto3.client(
        "s3",
        endpoint_url=s["VLFORGE_S3_ENDPOINT"],
        aws_access_key_id=s["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    assert BUCKETS <= {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_run_artifact_lands_in_the_s3_bucket(infra):
    uri = infra.settings()["MLFLOW_TRACKING_URI"]
    with urllib.request.urlopen(f"{uri}/health", timeout=5) as resp:
        assert resp.status == 200
    # In a child shell that sources the env file, as a user would; the test process's MLflow state stays untouched.
    code = (
        "import mlflow\n"
        "mlflow.set_experiment('infra-local')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('loss', 0.5)\n"
        "    mlflow.log_text('hello', 'notes/hello.txt')\n"
        "print(run.info.run_id)\n"
    )
    done = subprocess.run(
        ["bash", "-c", f'source "{infra.dir}/env" && exec "{sys.executable}" -c "$0"', code],
        env={k: v for k, v in infra.env.items() if not k.startswith(("MLFLOW_", "AWS_"))},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=infra.dir,
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip().splitlines()[-1]

    import boto3
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.metrics["loss"] == 0.5
    s = infra.settings()
    s3 = boto3.client(
        "s3",
        endpoint_url=s["VLFORGE_S3_ENDPOINT"],
        aws_access_key_id=s["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    hits = [k for k in keys if run_id in k and k.endswith("notes/hello.txt")]
    assert hits, keys
    assert s3.get_object(Bucket="mlflow-artifacts", Key=hits[0])["Body"].read() == b"hello"


def test_up_again_keeps_the_running_servers(infra):
    done = infra.run(UP)
    assert "already running" in done.stdout
    assert infra.pids() == infra.first_pids
    assert all(alive(pid) for pid in infra.first_pids.values())


def test_up_refuses_a_port_taken_by_something_else(infra, tmp_path):
    env = {**infra.env, "VLFORGE_LOCAL_DIR": str(tmp_path / "other")}
    done = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"127.0.0.1:{infra.s3_port} is taken" in done.stderr
    assert not (tmp_path / "other" / "s3.pid").exists()


def test_down_stops_both_and_is_idempotent(infra):
    pids = infra.pids()
    assert len(group_members(pids["mlflow"])) >= 2  # the server and its worker
    infra.run(DOWN)
    assert not listening(infra.s3_port) and not listening(infra.mlflow_port)
    assert not any(alive(pid) or group_members(pid) for pid in pids.values())
    assert not (infra.dir / "env").exists()
    assert not (infra.dir / "s3.pid").exists() and not (infra.dir / "mlflow.pid").exists()
    again = infra.run(DOWN)
    assert "not running" in again.stdout
