"""The model registry: register a trained model as a pyfunc version, point aliases at it, and find
and load a version by ``NAME@ALIAS`` (a dual-encoder student or a generative captioning model).

    from vlforge.serving.registry import log_and_register, load_by_alias

    version = log_and_register("out/student", cfg.data, model_name="vlforge-student",
                               tags={"stage": "distill", "data": cfg.data.shards})
    print(version.name, version.version, version.alias)        # vlforge-student 3 challenger
    model = load_by_alias("vlforge-student", "challenger")
    model.predict(pd.DataFrame({"image": [png_bytes], "text": ["a llama"]}))   # score, match_prob

    log_and_register("out/frozen", cfg.data, model_name="vlforge-captioner", tags={"stage": "frozen"})
    load_by_alias("vlforge-captioner", "challenger").predict(
        pd.DataFrame({"image": [png_bytes]}), params={"max_new_tokens": 20})   # caption

    student = load_torch_by_alias("vlforge-student", "champion")   # the torch module, eval mode
    serving = download_serving_dir("vlforge-student", "champion")  # model.json, model.safetensors,
                                                                   # tokenizer.json, preprocess.json

``log_and_register`` packs the model directory (``vlforge.serving.directory.prepare_serving_dir``),
logs it as a pyfunc (``vlforge.serving.logged_model.log_pyfunc``), registers a new version, tags
it, points an alias at it and waits until it is READY. Stages are deprecated in MLflow 3:
promotion (``vlforge.serving.promotion``) moves aliases (``challenger`` -> ``champion``) and sets tags.

``load_torch_by_alias`` / ``download_serving_dir`` skip the pyfunc: they download the
version's artifacts and read the serving directory with ``vlforge.models.io`` (safetensors
weights, never a pickle), for batch jobs that batch and place the model themselves
(``vlforge.workflows.embed``). ``resolve_alias`` pins an alias to its current version.

Tracking URI: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the local
``sqlite:///<cwd>/mlflow.db`` (``vlforge.tracking.resolve_tracking_uri``). Credentials
(``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``) come only from the environment;
tag values are masked with the tracker's redaction helpers before they are sent.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlforge.config import DataConfig, TrackingConfig
from vlforge.models.io import SPEC_FILE, WEIGHTS_FILE, load_model_dir
from vlforge.serving.directory import prepare_serving_dir, serving_kind
from vlforge.serving.logged_model import log_pyfunc, pretrained_parts
from vlforge.serving.pyfunc_model import ARTIFACT_KEY, DUAL_ENCODER, PREPROCESS_FILE, TOKENIZER_FILE
from vlforge.tracking.redact import redact
from vlforge.tracking.store import experiment_id, resolve_tracking_uri, use_tracking_uri

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("vlforge.serving")

READY_TIMEOUT_S = 300.0

__all__ = [
    "RegisteredVersion",
    "download_serving_dir",
    "load_by_alias",
    "load_torch_by_alias",
    "log_and_register",
    "resolve_alias",
]


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version: ``model_uri`` is ``models:/<name>/<version>``."""

    name: str
    version: str
    alias: str
    model_uri: str
    run_id: str
    source: str = ""  # the logged model the version points at (``models:/m-...``)


# ----------------------------------------------------------------------------- registering


def log_and_register(
    model_dir: str | os.PathLike,
    data: DataConfig,
    *,
    model_name: str,
    tags: Mapping[str, Any],
    alias: str = "challenger",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "vlforge",
    artifact_location: str | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> RegisteredVersion:
    """Log ``model_dir`` as a pyfunc into ``run_id`` (or a new run in ``experiment``), register a
    new version of ``model_name``, tag it, point ``alias`` at it and wait until it is READY.

    ``model_dir`` is a dual encoder (method ``distill``) or a caption model (``frozen``,
    ``vcgpt``, ``vlkd``); ``data`` gives its image settings (``data.image.size`` must be the model's) and,
    for a dual encoder, its tokenizer. The signature and requirements follow the model's kind.

    A run created here is ended FINISHED (FAILED when logging fails); a given run is left as it
    is. ``artifact_location`` applies only when the experiment does not exist yet.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri, experiment=experiment))
    # The fluent API (Model.log) and, with a database store, the registry itself resolve logged
    # models through the global tracking URI, so all of it runs with the URI pointed at ``uri``.
    with use_tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri)
        run, own_run = _registration_run(client, run_id, model_name, experiment, artifact_location)
        info = _log_model(client, run, own_run, model_dir, data)
        mv = _register_version(client, model_name, info, run.info.run_id, model_dir, tags, ready_timeout_s)
        client.set_registered_model_alias(model_name, alias, mv.version)
    log.info("registered %s version %s (alias %s) from run %s", model_name, mv.version, alias, run.info.run_id)
    return RegisteredVersion(
        name=model_name,
        version=str(mv.version),
        alias=alias,
        model_uri=f"models:/{model_name}/{mv.version}",
        run_id=run.info.run_id,
        source=info.model_uri,
    )


def _registration_run(client, run_id: str | None, model_name: str, experiment: str, artifact_location: str | None):
    """(the run to log into, whether it was created here): ``run_id``'s run (an unknown one fails
    here, before any work), else a new run in ``experiment``."""
    if run_id is not None:
        return client.get_run(run_id), False
    exp_id = experiment_id(client, experiment, artifact_location)
    run = client.create_run(exp_id, run_name=f"register-{model_name}", tags={"vlforge.kind": "model-registration"})
    return run, True


def _log_model(client, run, own_run: bool, model_dir: str | os.PathLike, data: DataConfig):
    """Pack ``model_dir`` into a temporary serving directory and log it into ``run`` as the pyfunc;
    a run created here is ended FINISHED, or FAILED when this fails."""
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="vlforge-serving-") as tmp:
            serving = prepare_serving_dir(model_dir, data, Path(tmp) / ARTIFACT_KEY)
            info = log_pyfunc(client, run, serving, data.image.size)
    except BaseException:
        if own_run:
            client.set_terminated(run_id, "FAILED")
        raise
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return info


def _register_version(
    client, model_name: str, info, run_id: str, model_dir, tags: Mapping[str, Any], ready_timeout_s: float
):
    """A new READY version of ``model_name`` pointing at logged model ``info``, tagged (masked) and
    described with the pretrained parts inside it."""
    _ensure_registered_model(client, model_name)
    parts = pretrained_parts(model_dir)
    description = ("Pretrained parts: " + "; ".join(parts) + ".") if parts else "Trained from scratch."
    mv = client.create_model_version(
        model_name,
        source=info.model_uri,
        run_id=run_id,
        tags=_version_tags({**tags, "vlforge.pretrained": "; ".join(parts) or "none"}),
        model_id=info.model_id,
        description=description,
        await_creation_for=0,
    )
    return _wait_ready(client, model_name, str(mv.version), ready_timeout_s)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _wait_ready(client, name: str, version: str, timeout_s: float):
    from mlflow.entities.model_registry.model_version_status import ModelVersionStatus

    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        mv = client.get_model_version(name, version)
        status = ModelVersionStatus.from_string(mv.status) if isinstance(mv.status, str) else mv.status
        if status == ModelVersionStatus.READY:
            return mv
        if status == ModelVersionStatus.FAILED_REGISTRATION:
            raise RuntimeError(f"model version {name}/{version} failed to register: {mv.status_message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} not READY after {timeout_s:.0f}s (status {mv.status})")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _version_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v for k, v in redact({str(k): str(v) for k, v in tags.items()}).items()}


# ----------------------------------------------------------------------------- lookup


def load_by_alias(model_name: str, alias: str, tracking_uri: str | None = None):
    """The pyfunc of ``models:/<model_name>@<alias>`` (``vlforge`` must be importable)."""
    import mlflow

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    with use_tracking_uri(uri):
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")


def resolve_alias(model_name: str, alias: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """The version ``alias`` points at now; LookupError naming the model and alias when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    with use_tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri)
        try:
            mv = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as exc:
            # Stores differ in the error code of a missing alias; ask about the model instead.
            try:
                aliases = sorted(client.get_registered_model(model_name).aliases)
            except MlflowException as inner:
                if inner.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise exc from None
                raise LookupError(f"no registered model {model_name!r} at {uri}") from exc
            if alias in aliases:
                raise
            raise LookupError(
                f"registered model {model_name!r} has no alias {alias!r} (its aliases: {aliases or 'none'}) at {uri}"
            ) from exc
    return RegisteredVersion(
        name=model_name,
        version=str(mv.version),
        alias=alias,
        model_uri=f"models:/{model_name}/{mv.version}",
        run_id=mv.run_id or "",
        source=mv.source or "",
    )


def _serving_subdir(root: Path) -> Path:
    """The serving directory inside a downloaded pyfunc: the artifact ``ARTIFACT_KEY`` of its MLmodel."""
    import yaml

    rel = f"artifacts/{ARTIFACT_KEY}"
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        rel = ((flavor.get("artifacts") or {}).get(ARTIFACT_KEY) or {}).get("path", rel)
    serving = root / rel
    needed = [SPEC_FILE, WEIGHTS_FILE, PREPROCESS_FILE]
    if (serving / PREPROCESS_FILE).is_file() and serving_kind(serving) == DUAL_ENCODER:
        needed.append(TOKENIZER_FILE)
    missing = [n for n in needed if not (serving / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: not a vlforge serving model: {serving} lacks {missing} "
            "(was it registered with vlforge.serving.registry.log_and_register?)"
        )
    return serving


def download_serving_dir(
    model_name: str,
    alias: str,
    tracking_uri: str | None = None,
    dst: str | os.PathLike | None = None,
    *,
    version: str | None = None,
) -> Path:
    """Download ``models:/<model_name>@<alias>`` into ``dst`` (a new temporary directory when None,
    left for the caller) and return its serving directory: ``model.json``, ``model.safetensors``,
    ``preprocess.json`` and, for a dual encoder, ``tokenizer.json``.

    ``version`` downloads that version number instead of following the alias (a batch job
    resolves the alias once with ``resolve_alias``, so every worker loads the same version).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    if version is None:
        version = resolve_alias(model_name, alias, uri).version
    model_uri = f"models:/{model_name}/{version}"
    if dst is None:
        target = Path(tempfile.mkdtemp(prefix="vlforge-model-"))
    else:
        target = Path(dst)
        target.mkdir(parents=True, exist_ok=True)
    with use_tracking_uri(uri):
        try:
            root = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target), tracking_uri=uri)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LookupError(f"{model_uri} (alias {alias!r}) not found at {uri}: {exc.message}") from exc
    return _serving_subdir(Path(root))


def load_torch_by_alias(
    model_name: str, alias: str, tracking_uri: str | None = None, dst: str | os.PathLike | None = None
) -> nn.Module:
    """The torch module of ``models:/<model_name>@<alias>`` on the CPU, in eval mode (safetensors only).

    The artifacts go to ``dst`` (a temporary directory, removed after loading, when None).
    """
    if dst is not None:
        return load_model_dir(download_serving_dir(model_name, alias, tracking_uri, dst)).eval()
    with tempfile.TemporaryDirectory(prefix="vlforge-model-") as tmp:
        return load_model_dir(download_serving_dir(model_name, alias, tracking_uri, tmp)).eval()
