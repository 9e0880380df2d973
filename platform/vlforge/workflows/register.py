"""Register any exported model directory in the MLflow registry, with its evaluation as tags.

    vlforge register out/ray_results/my-vlmo/export --name my-vlmo \
        --eval data/mine/test --eval vqa=data/mine/vqa/test --max-samples 1000
    row = register_model_dir("out/ray_results/my-vlmo/export", "my-vlmo", evals=["data/mine/test"])

The directory is what a training run exports (``export/``: ``model.safetensors``, ``model.json``
and the run's ``config.yaml``) or a stage's model directory (``stages/<stage>/``). Methods
``distill``, ``vlmo`` and ``fusion`` register as the dual-encoder pyfunc (embeddings, image-text
score and match probability), ``frozen``, ``vcgpt`` and ``vlkd`` as the caption pyfunc
(``vlforge.serving.registry``). Image and tokenizer settings come from the directory's
``config.yaml`` (the last stage's data settings, else the run's) when there is one, else from the
model itself (its image size and text length, the default tokenizer), and the summary says which.

Each ``--eval`` shard set is scored first (``vlforge.evaluation.score``, with those same settings)
and every figure becomes a version tag ``eval.<name>.<metric>`` (``name``: given as ``NAME=SHARDS``,
else the set's last two path parts), so ``vlforge promote`` and a reader of the registry see what
the model was measured at. A new version gets ``alias`` (``challenger`` by default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.config import DataConfig, ImageConfig, StorageConfig, TokenizerConfig, TrainRunConfig, load
from vlforge.evaluation.score import score_model_dir
from vlforge.models.io import build_from_spec, input_image_size, read_spec, resolve_spec


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    model_uri: str
    run_id: str
    data_source: str  # where the image / tokenizer settings came from
    scores: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"registered {self.name} version {self.version} as @{self.alias} ({self.model_uri}), run {self.run_id}",
            f"preprocessing from {self.data_source}",
        ]
        lines += [f"  {k} = {v}" for k, v in sorted(self.tags.items()) if k.startswith("eval.")]
        return "\n".join(lines)


def serving_data(model_dir: str | Path, storage: StorageConfig | None = None) -> tuple[DataConfig, str]:
    """The image and tokenizer settings to serve ``model_dir`` with, and where they came from."""
    import torch

    # lazy: pulls in mlflow
    from vlforge.serving.pyfunc_model import CAPTION_METHODS

    config = Path(model_dir) / "config.yaml"
    if config.is_file():
        cfg = load(TrainRunConfig, str(config))
        data = cfg.stages[-1].data or cfg.data
        image = dataclasses.replace(data.image, augment=False)
        return DataConfig(image=image, tokenizer=data.tokenizer, storage=storage or StorageConfig()), str(config)
    spec = resolve_spec(read_spec(model_dir), model_dir)
    with torch.device("meta"):
        model = build_from_spec(spec)
    if spec.get("method") in CAPTION_METHODS:
        return DataConfig(
            image=ImageConfig(size=input_image_size(model), augment=False), storage=storage or StorageConfig()
        ), "the model (image size)"
    enc = getattr(model, "encoder", model).config
    return (
        DataConfig(
            image=ImageConfig(size=int(enc.img_size), augment=False),
            tokenizer=TokenizerConfig(max_length=int(enc.max_text_len)),
            storage=storage or StorageConfig(),
        ),
        "the model (image size, text length; the default tokenizer)",
    )


def eval_name(spec: str) -> tuple[str, str]:
    """``NAME=SHARDS`` or ``SHARDS`` -> (name, shards); the default name is the set's last two path parts."""
    name, sep, shards = spec.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, shards
    parts = [p for p in spec.rstrip("/").split("/") if p]
    return "/".join(parts[-2:]) or spec, spec


def eval_tags(name: str, row: dict[str, Any]) -> dict[str, str]:
    """A scored row's figures as ``eval.<name>.<metric>`` tags (percentages to 2 places, counts as ints)."""
    tags = {}
    for k, v in row.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, float):
            tags[f"eval.{name}.{k}"] = f"{v:.2f}"
        elif isinstance(v, int):
            tags[f"eval.{name}.{k}"] = str(v)
        elif k == "vqa_metric":
            tags[f"eval.{name}.{k}"] = str(v)
    return tags


def register_model_dir(
    model_dir: str | Path,
    name: str,
    *,
    alias: str = "challenger",
    evals: list[str] = (),
    max_samples: int | None = None,
    rerank_k: int = 0,
    tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
    experiment: str = "vlforge",
    storage: StorageConfig | None = None,
    log=print,
) -> Registration:
    """Score ``model_dir`` on each of ``evals``, then log and register it; see the module docstring."""
    # lazy: pulls in mlflow
    from vlforge.serving.registry import log_and_register

    spec = read_spec(model_dir)  # fails early on a directory that is not a model directory
    data, source = serving_data(model_dir, storage)
    all_tags = {
        "vlforge.source_dir": str(Path(model_dir).resolve()),
        "vlforge.method": str(spec.get("method")),
        "vlforge.model": str(spec.get("model")),
        **(tags or {}),
    }
    scores = []
    for entry in evals:
        set_name, shards = eval_name(entry)
        log(f"scoring {model_dir} on {shards} ...")
        row = score_model_dir(
            str(model_dir), shards, max_samples=max_samples, rerank_k=rerank_k, data=data, storage=storage
        )
        scores.append({"name": set_name, **row})
        all_tags.update(eval_tags(set_name, row))
    log(f"registering {model_dir} as {name} ...")
    version = log_and_register(
        model_dir, data, model_name=name, tags=all_tags, alias=alias, tracking_uri=tracking_uri, experiment=experiment
    )
    return Registration(
        version.name, version.version, version.alias, version.model_uri, version.run_id, source, scores, all_tags
    )
