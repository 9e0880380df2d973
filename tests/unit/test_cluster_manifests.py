"""Offline checks of the cluster configs in cluster/: schemas, credentials, and agreement with the repo.

    .venv/bin/python -m pytest -q tests/unit/test_cluster_manifests.py

The Ray launcher config is validated against the schema that ships with the installed Ray
(``ray/autoscaler/ray-schema.json``) and Ray's own ``validate_config``; the KubeRay RayCluster and
RayJob against ``cluster/kuberay/schema.json`` (ours, ``additionalProperties: false``), and every pod
template inside them against Kubernetes' ``PodTemplateSpec`` (kubernetes-validate, strict); the
runtime environments by building ``ray.runtime_env.RuntimeEnv``. Each check is also shown to fail
on a broken copy. Nothing is applied to a cluster and nothing touches the network.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
K8S_VERSION = "1.37.0"
IMAGE_WORKDIR = "/app"  # infra/docker/Dockerfile: WORKDIR /app holds the repository
MLFLOW_URI = "http://mlflow.vlforge.svc:5000"
S3_ENDPOINT = "http://minio.vlforge.svc:9000"
S3_SECRET = "vlforge-s3"
SHARED_PVC = "vlforge-shared"  # infra/k8s/shared-pvc.yaml
NAMESPACE = "vlforge"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|API_KEY", re.I)
SECRET_ASSIGNMENT = re.compile(r"\b\w*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*\s*[=:]\s*[\"']?[A-Za-z0-9/+]{8,}", re.I)


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def launcher() -> dict:
    return load_yaml(CLUSTER / "ray-cluster.yaml")[0]


def kuberay_docs() -> dict[str, dict]:
    """kind -> document, over cluster/kuberay/ray*.yaml."""
    docs = {}
    for path in sorted(KUBERAY.glob("ray*.yaml")):
        for d in load_yaml(path):
            docs[d["kind"]] = d
    return docs


def cluster_specs() -> list[dict]:
    docs = kuberay_docs()
    return [docs["RayCluster"]["spec"], docs["RayJob"]["spec"]["rayClusterSpec"]]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    out = []
    if doc["kind"] == "RayJob":
        if "submitterPodTemplate" in spec:
            out.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
        spec = spec.get("rayClusterSpec") or {}
    if "headGroupSpec" in spec:
        out.append(("head", spec["headGroupSpec"]["template"]))
    for g in spec.get("workerGroupSpecs", []):
        out.append((g["groupName"], g["template"]))
    return out


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("#")[0].strip().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def literal_secrets(obj, path: str = "") -> list[str]:
    """Places in a parsed manifest where a credential-like name carries a literal value."""
    hits = []
    if isinstance(obj, dict):
        name = obj.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in obj:
            hits.append(f"{path}: {name} has a literal value")
        for k, v in obj.items():
            if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, (str, int, float)):
                hits.append(f"{path}.{k}: literal value")
            hits += literal_secrets(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hits += literal_secrets(v, f"{path}[{i}]")
    elif isinstance(obj, str):
        if SECRET_ASSIGNMENT.search(obj):
            hits.append(f"{path}: assignment in a string")
        if re.search(r"\bAKIA[0-9A-Z]{16}\b", obj):
            hits.append(f"{path}: an AWS access key id")
        if "\n" in obj or obj.lstrip().startswith("{"):
            try:
                inner = yaml.safe_load(obj)
            except yaml.YAMLError:
                inner = None
            if isinstance(inner, (dict, list)):
                hits += literal_secrets(inner, f"{path}<yaml>")
    return hits


# ---- every file


def test_cluster_dir_has_the_expected_files():
    for name in (
        "ray-cluster.yaml",
        "runtime_env.yaml",
        "runtime_env.aws.yaml",
        "README.md",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/schema.json",
    ):
        assert (CLUSTER / name).is_file(), name


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses_and_starts_with_a_header_comment(path):
    docs = load_yaml(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    assert path.read_text().startswith("# "), "each file opens with a comment saying what it is and how to use it"


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_credentials(path):
    assert literal_secrets(load_yaml(path)) == []
    text = path.read_text()
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text)


@pytest.mark.parametrize(
    "planted",
    [
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]},
        {"env_vars": {"MLFLOW_TRACKING_PASSWORD": "hunter2"}},
        {"env": [{"name": "HF_TOKEN", "value": "x"}]},
        {"setup_commands": ["export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCY"]},
        {"runtimeEnvYAML": "env_vars:\n  MLFLOW_TRACKING_TOKEN: abcdef\n"},
        {"setup_commands": ["aws configure set aws_access_key_id AKIAABCDEFGHIJKLMNOP"]},
    ],
)
def test_credential_scan_catches_planted_literals(planted):
    assert literal_secrets(planted)


def test_credential_scan_accepts_secret_references():
    ok = {
        "env": [
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "AWS_SECRET_ACCESS_KEY"}},
            }
        ]
    }
    assert literal_secrets(ok) == []


# ---- the Ray cluster launcher config


def ray_schema() -> dict:
    import ray

    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        return json.load(f)


def check_launcher(config: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    jsonschema.validate(config, ray_schema())
    validate_config(config)


def test_launcher_validates_against_rays_schema():
    check_launcher(launcher())


def _unknown_top_key(c):
    c["max_worker"] = 3


def _string_resource(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "4"


def _unknown_node_key(c):
    c["available_node_types"]["data_worker"]["min_worker"] = 1


def _bad_head_type(c):
    c["head_node_type"] = "nope"


def _commands_not_a_list(c):
    c["setup_commands"] = "bash scripts/install.sh"


@pytest.mark.parametrize(
    "breakage", [_unknown_top_key, _string_resource, _unknown_node_key, _bad_head_type, _commands_not_a_list]
)
def test_broken_launcher_config_is_rejected(breakage):
    config = copy.deepcopy(launcher())
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        check_launcher(config)


def test_launcher_node_types_fit_the_main_job():
    from vlforge.config import TwoStageConfig, load

    cfg = load(TwoStageConfig, REPO / "jobs/configs/two_stage.yaml")
    types = launcher()["available_node_types"]
    head = types[launcher()["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "nothing but the driver runs on the head"
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu_only = [t for n, t in types.items() if not t["resources"].get("GPU") and t is not head]
    assert len(gpu) == 1 and cpu_only, "one GPU worker type and a CPU-only data worker type"
    g = gpu[0]
    assert g["resources"]["GPU"] * g["max_workers"] >= cfg.num_workers
    # The Train workers fill the GPU nodes' CPUs, so decode tasks go to the data nodes.
    assert g["resources"]["CPU"] == g["resources"]["GPU"] * cfg.worker_cpus
    assert all(t["resources"]["CPU"] >= cfg.student.stages[0].data.decode_cpus for t in cpu_only)


def test_launcher_installs_with_the_repo_script_and_mounts_shared_storage():
    from vlforge.config import TwoStageConfig, load

    config = launcher()
    commands = " ".join(config["setup_commands"])
    assert "bash scripts/install.sh" in commands and (REPO / "scripts/install.sh").is_file()
    assert list(config["file_mounts"].values()) == ["."]
    for excluded in (".venv", "data", "out", "mlruns"):
        assert excluded in config["rsync_exclude"]
    storage_path = load(TwoStageConfig, REPO / "jobs/configs/two_stage.yaml").storage_path
    assert storage_path.startswith("/mnt/shared/")
    assert " /mnt/shared" in " ".join(config["initialization_commands"])


# ---- runtime environments


@pytest.mark.parametrize("name", ["runtime_env.yaml", "runtime_env.aws.yaml"])
def test_runtime_env_builds(name):
    from ray.runtime_env import RuntimeEnv

    data = load_yaml(CLUSTER / name)[0]
    assert set(data) <= RuntimeEnv.known_fields
    env = RuntimeEnv(**data)
    assert env["working_dir"] == "."
    for excluded in (".venv/", "data/", "out/", "mlruns/", ".git/"):
        assert excluded in data["excludes"]
    assert not [k for k in data.get("env_vars", {}) if SECRET_NAME.search(k)]


def test_broken_runtime_env_is_rejected():
    from ray.runtime_env import RuntimeEnv

    data = load_yaml(CLUSTER / "runtime_env.yaml")[0]
    with pytest.raises(TypeError):
        RuntimeEnv(**{**data, "env_vars": {"VLFORGE_S3_ENDPOINT": 9000}})
    with pytest.raises(TypeError):
        RuntimeEnv(**{**data, "working_dir": ["."]})


def test_runtime_env_points_at_the_in_cluster_services():
    env_vars = load_yaml(CLUSTER / "runtime_env.yaml")[0]["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    assert env_vars["VLFORGE_S3_ENDPOINT"] == S3_ENDPOINT


# ---- KubeRay manifests


def kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((KUBERAY / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def check_pod_template(template: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
        K8S_VERSION,
        strict=True,
    )


def test_both_kinds_are_present():
    assert set(kuberay_docs()) == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_matches_schema(kind):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in kuberay_validator().iter_errors(kuberay_docs()[kind])]
    assert errors == []


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_pod_templates_match_kubernetes_schema(kind):
    templates = pod_templates(kuberay_docs()[kind])
    assert len(templates) >= 3
    for _, template in templates:
        check_pod_template(template)


def _typo_in_spec(d):
    spec = d["spec"].get("rayClusterSpec", d["spec"])
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")


def _int_start_param(d):
    spec = d["spec"].get("rayClusterSpec", d["spec"])
    spec["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 4


def _typo_in_group(d):
    spec = d["spec"].get("rayClusterSpec", d["spec"])
    spec["workerGroupSpecs"][1]["maxReplica"] = 3


def _wrong_api_version(d):
    d["apiVersion"] = "ray.io/v1alpha1"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
@pytest.mark.parametrize("breakage", [_typo_in_spec, _int_start_param, _typo_in_group, _wrong_api_version])
def test_broken_kuberay_manifest_is_rejected(kind, breakage):
    doc = copy.deepcopy(kuberay_docs()[kind])
    breakage(doc)
    assert list(kuberay_validator().iter_errors(doc))


@pytest.mark.parametrize(
    "field, value",
    [
        ("shutdownAfterJobFinish", True),
        ("ttlSecondsAfterFinished", "600"),
        ("submissionMode", "K8sMode"),
        ("clusterSelector", {"a": "b"}),
        ("activeDeadlineSeconds", 0),
    ],
)
def test_broken_rayjob_fields_are_rejected(field, value):
    doc = copy.deepcopy(kuberay_docs()["RayJob"])
    doc["spec"][field] = value
    assert list(kuberay_validator().iter_errors(doc))


@pytest.mark.parametrize(
    "breakage",
    [
        lambda t: containers(t)[0].update(env={"VLFORGE_S3_ENDPOINT": S3_ENDPOINT}),
        lambda t: containers(t)[0].update(volumeMount=[]),
        lambda t: containers(t)[0]["resources"].update(request={"cpu": "1"}),
        lambda t: t["spec"].update(volumes={"name": "shared"}),
    ],
)
def test_broken_pod_template_is_rejected(breakage):
    import kubernetes_validate

    template = copy.deepcopy(pod_templates(kuberay_docs()["RayJob"])[1][1])
    breakage(template)
    with pytest.raises(kubernetes_validate.ValidationError):
        check_pod_template(template)


def test_every_pod_mounts_the_shared_volume_where_the_config_stores_runs():
    from vlforge.config import TwoStageConfig, load

    assert load(TwoStageConfig, REPO / "jobs/configs/two_stage.yaml").storage_path.startswith("/mnt/shared/")
    for doc in kuberay_docs().values():
        for group, template in pod_templates(doc):
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in template["spec"].get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m["name"] for c in containers(template) for m in c.get("volumeMounts", [])}
            assert claims.get(mounts.get("/mnt/shared")) == SHARED_PVC, (doc["kind"], group)


def test_shared_volume_is_the_one_infra_creates():
    import kubernetes_validate

    path = REPO / "infra/k8s/shared-pvc.yaml"
    if not path.is_file():
        pytest.skip("infra/k8s/shared-pvc.yaml is not in this checkout")
    pvc = load_yaml(path)[0]
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    assert pvc["metadata"]["name"] == SHARED_PVC and pvc["metadata"]["namespace"] == NAMESPACE
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in kuberay_docs().values())


def test_ray_containers_get_credentials_from_the_secret_and_endpoints_from_services():
    for doc in kuberay_docs().values():
        for group, template in pod_templates(doc):
            env = {e["name"]: e for e in containers(template)[0].get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": S3_SECRET, "key": key}, (group, key)
            assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI
            assert env["VLFORGE_S3_ENDPOINT"]["value"] == S3_ENDPOINT


def test_images_are_one_tag_of_this_version():
    version = project_version()
    images = {c["image"] for doc in kuberay_docs().values() for _, t in pod_templates(doc) for c in containers(t)}
    assert len(images) == 1, images
    name, tag = images.pop().rsplit("/", 1)[-1].split(":")
    assert name == "vlforge" and (tag == version or tag.startswith(f"{version}-")), tag


def test_ray_version_matches_the_pin():
    import ray

    for spec in cluster_specs():
        assert spec["rayVersion"] == pinned("ray") == ray.__version__


def test_worker_groups_are_sized_for_the_main_job():
    from vlforge.config import TwoStageConfig, load

    cfg = load(TwoStageConfig, REPO / "jobs/configs/two_stage.yaml")
    for spec in cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu", "data"}
        for g in groups.values():
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        gpu = groups["gpu"]
        limits = containers(gpu["template"])[0]["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        assert gpus * gpu["maxReplicas"] >= cfg.num_workers
        assert float(gpu["rayStartParams"]["num-cpus"]) == gpus * cfg.worker_cpus
        assert "nvidia.com/gpu" not in containers(groups["data"]["template"])[0]["resources"]["limits"]


def test_rayjob_runs_the_main_job_with_accepted_overrides():
    from vlforge.config import TwoStageConfig, load

    spec = kuberay_docs()["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    steps = [shlex.split(part) for part in spec["entrypoint"].split("&&")]
    assert steps[0] == ["cd", IMAGE_WORKDIR]
    argv = steps[-1]
    assert argv[:2] == ["python", "jobs/two_stage.py"] and (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert overrides
    cfg = load(TwoStageConfig, REPO / config, overrides)
    assert cfg.name, "a fixed name lets a retried or resubmitted job resume"
    assert cfg.storage_path.startswith("/mnt/shared/")
    gpu = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    assert (
        int(containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"]) * gpu["replicas"]
        == cfg.num_workers
    )


def test_rayjob_runtime_env_builds_and_matches_the_pods():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load(kuberay_docs()["RayJob"]["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**data)
    assert data["env_vars"]["MLFLOW_TRACKING_URI"] == MLFLOW_URI
    assert data["env_vars"]["VLFORGE_S3_ENDPOINT"] == S3_ENDPOINT


def test_rayjob_override_typo_would_be_refused():
    from vlforge.config import ConfigError, TwoStageConfig, load

    with pytest.raises(ConfigError):
        load(TwoStageConfig, REPO / "jobs/configs/two_stage.yaml", ["max_failure=3"])
