"""Score one model directory on one shard set for the task its data kind serves.

    vlforge eval out/ray_results/my-run/export data/corpus/scenes/test --max-samples 1000
    row = score_model_dir("out/ray_results/my-run/export", "data/corpus/nlvr2/test")   # {"nlvr2_acc", "nlvr2_n", ...}

The set's data kind comes from its manifest: ``captions`` -> retrieval R@1/5/10 both ways, or for a
captioning model (``frozen``, ``vcgpt``, ``vlkd``) its captions' BLEU-4 / ROUGE-L / CIDEr / METEOR and
the share naming the scene's objects (greedy, or a ``beams``-wide beam search); ``nlvr2`` -> true/false
accuracy; ``vqa`` -> VQA accuracy. Image size and text length come from the model's own config, so no
data settings are needed.
Retrieval scores a bare VLMo or a student with ITC embeddings; a VLMo or a fine-tuned fusion model
(``method: vlmo`` / ``fusion``) re-ranks its ITC top ``rerank_k`` with its ITM head (0 = ITC only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlforge.config import DataConfig, ImageConfig, StorageConfig, TokenizerConfig
from vlforge.data.pipeline import detect_kind
from vlforge.evaluation.classification import accuracy, accuracy_columns
from vlforge.evaluation.data import load_eval_set
from vlforge.evaluation.generation import score_captioner, score_few_shot_vqa, sibling_train
from vlforge.evaluation.inference import encoder_of
from vlforge.evaluation.retrieval import evaluate_retrieval
from vlforge.models.io import input_image_size, load_model_dir, read_spec


def _data_for(model, storage: StorageConfig | None) -> DataConfig:
    enc = encoder_of(model)
    return DataConfig(
        image=ImageConfig(size=enc.config.img_size, augment=False),
        tokenizer=TokenizerConfig(max_length=enc.config.max_text_len),
        storage=storage or StorageConfig(),
    )


def score_model_dir(
    model_dir: str,
    shards: str,
    *,
    max_samples: int | None = None,
    rerank_k: int = 0,
    batch_size: int = 64,
    storage: StorageConfig | None = None,
    data: DataConfig | None = None,
    branch: str | None = None,
    shots: int = 0,
    pool: str | None = None,
    blind: bool = False,
    max_new_tokens: int = 20,
    beams: int = 1,
    examples: int = 0,
) -> dict[str, Any]:
    """One row of figures (percent, with sample counts) for ``model_dir`` on ``shards``; ``data`` (image
    and tokenizer settings) defaults to the model's own sizes with the default tokenizer. ``examples``:
    a captioning model's row also holds that many examples (image, caption, references)."""
    spec = read_spec(model_dir)
    method = spec.get("method")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if method in ("frozen", "vcgpt", "vlkd"):
        if branch is not None and method != "vcgpt":
            raise ValueError(f"branch {branch!r} is VC-GPT's (its self-ensemble ablation); {model_dir} is {method!r}")
        if detect_kind(shards, storage) == "vqa":
            return _score_few_shot(model_dir, shards, max_samples, storage, data, shots, pool, blind)
        return _score_captioner(
            model_dir,
            shards,
            max_samples,
            batch_size,
            storage,
            data,
            {**({"branch": branch} if branch else {}), **({"beams": beams} if beams > 1 else {})} or None,
            max_new_tokens,
            examples,
        )
    if method not in ("vlmo", "fusion", "distill"):
        raise ValueError(
            f"{model_dir}: vlforge eval scores methods vlmo, fusion and distill (retrieval, true/false, "
            f"VQA) and frozen / vcgpt (captioning), not {method!r}"
        )
    model = load_model_dir(model_dir)
    kind = detect_kind(shards, storage)
    data = dataclasses.replace(data or _data_for(model, storage), shards=shards)
    ev = load_eval_set(shards, data, kind=kind, max_samples=max_samples)
    row: dict[str, Any] = {"model": str(model_dir), "shards": shards, "task": kind}
    if kind == "captions":
        side = "teacher" if spec.get("method") in ("fusion", "vlmo") and rerank_k > 0 else "student"
        row.update(evaluate_retrieval(model, ev, side, rerank_k=rerank_k, batch_size=batch_size))
    else:
        task = kind  # vqa and nlvr2: the classification task has its data kind's name
        if spec.get("method") not in ("fusion", "distill"):
            raise ValueError(
                f"{model_dir}: a {spec.get('method')!r} model has no {task} head; "
                f"score a fine-tuned (fusion) or distilled model on {kind} shards"
            )
        scored = accuracy(model, task, ev, batch_size=batch_size)
        row.update(accuracy_columns(task, scored))
    return row


def _score_few_shot(
    model_dir: str,
    shards: str,
    max_samples: int | None,
    storage: StorageConfig | None,
    data: DataConfig | None,
    shots: int,
    pool: str | None,
    blind: bool,
) -> dict[str, Any]:
    """Open-ended few-shot VQA of an interleaved-prompt model (Frozen); shots from ``pool``, by default
    the set's sibling ``train`` split."""
    model = load_model_dir(model_dir)
    if not callable(getattr(model, "generate_from_prompt", None)):
        raise ValueError(
            f"{model_dir}: {type(model).__name__} takes no interleaved prompts; few-shot VQA needs a Frozen model"
        )
    pool = pool or sibling_train(shards)
    data = data or DataConfig(
        image=ImageConfig(size=input_image_size(model), augment=False), storage=storage or StorageConfig()
    )
    row: dict[str, Any] = {"model": str(model_dir), "shards": shards, "task": "few-shot vqa", "pool": pool}
    scored = score_few_shot_vqa(model, shards, pool, data, shots=shots, blind=blind, max_samples=max_samples)
    row.update(
        {
            "vqa_acc": scored["acc"],
            "vqa_n": scored["n"],
            "vqa_metric": scored["metric"],
            "shots": shots,
            "blind": blind,
            "examples": scored["examples"],
        }
    )
    return row


def _score_captioner(
    model_dir: str,
    shards: str,
    max_samples: int | None,
    batch_size: int,
    storage: StorageConfig | None,
    data: DataConfig | None,
    generate_kwargs: dict[str, Any] | None,
    max_new_tokens: int = 20,
    examples: int = 0,
) -> dict[str, Any]:
    kind = detect_kind(shards, storage)
    if kind != "captions":
        raise ValueError(f"{model_dir} is a captioning model; score it on a captions shard set, not {kind}")
    model = load_model_dir(model_dir)
    data = data or DataConfig(
        image=ImageConfig(size=input_image_size(model), augment=False), storage=storage or StorageConfig()
    )
    data = dataclasses.replace(data, shards=shards)
    row: dict[str, Any] = {"model": str(model_dir), "shards": shards, "task": "captioning"}
    if generate_kwargs:
        row.update(generate_kwargs)
    row.update(
        score_captioner(
            model,
            shards,
            data,
            max_samples=max_samples,
            batch_size=batch_size,
            generate_kwargs=generate_kwargs,
            max_new_tokens=max_new_tokens,
            examples=examples,
        )
    )
    return row
