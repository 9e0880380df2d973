"""Classification accuracy of a pair model on VQA or true/false reasoning (NLVR2-style).

    nlvr2 = load_eval_set("data/corpus/nlvr2/test", data)
    accuracy(student, "nlvr2", nlvr2)   # {"acc": 71.5, "n": 400}
    accuracy(teacher, "vqa", load_eval_set("data/corpus/vqa/test", data))

``model`` is anything with the pair models' call signature
``model(task, pixel_values, input_ids, attention_mask, pixel_values_2=None)``
returning an object with ``.logits`` [B, C]: a ``FusionTeacher`` or a
``DualEncoderStudent``. The prediction is the argmax class. NLVR2 compares it with
``label``; VQA with ``answer_id``, where -100 (an answer outside the vocabulary)
always counts as wrong. When the set carries ``answer_targets`` (VQAv2 shards with ten
answers per question) VQA uses the VQAv2 metric instead: a prediction scores
``min(1, humans who gave it / 3)``, averaged (the common form of the metric, without the
official average over the ten 9-of-10 annotator subsets), and ``metric`` says which was used.
When a VQA set carries ``vqa_type`` (see ``load_eval_set``), ``by_type`` also gives the accuracy and
count of each question type, the breakdown VQAv2 reports (yes/no, number, other): on the built-in
corpus it tells the questions a model answers (background colour, counting) from those it does not
yet (which object is where).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

from torch import nn

from vlforge.evaluation.inference import chunks, device_of, eval_mode
from vlforge.evaluation.report import TYPE_ACC_PREFIX, TYPE_N_PREFIX
from vlforge.models.distill import TARGET_KEYS

__all__ = ["accuracy", "accuracy_columns", "by_group", "type_columns"]


def accuracy(
    model: nn.Module, task: Literal["nlvr2", "vqa"], eval_set: dict[str, Any], batch_size: int = 64
) -> dict[str, Any]:
    """``{"acc": percent correct (or mean VQAv2 score), "n": samples, "metric": "exact" | "vqav2"}`` of
    ``model``'s argmax predictions on ``eval_set``, plus ``by_type`` (``{type: {"acc", "n"}}``) for a
    VQA set whose samples name their type."""
    if task not in TARGET_KEYS:
        raise ValueError(f"task must be one of {tuple(TARGET_KEYS)}, got {task!r}")
    target_key = TARGET_KEYS[task]
    missing = [k for k in ("pixel_values", "input_ids", "attention_mask", target_key) if k not in eval_set]
    if task == "nlvr2" and "pixel_values_2" not in eval_set:
        missing.append("pixel_values_2")
    if missing:
        raise KeyError(f"eval set for {task} lacks {missing}")
    targets = eval_set[target_key].long().cpu()  # [N]
    soft = eval_set.get("answer_targets") if task == "vqa" else None  # [N, A] VQAv2 scores
    n = len(targets)
    if n == 0:
        raise ValueError("empty eval set")
    dev = device_of(model)
    scores: list[float] = []
    with eval_mode(model):
        for s in chunks(n, batch_size):
            pv2 = eval_set["pixel_values_2"][s].to(dev) if task == "nlvr2" else None
            logits = model(
                task,
                eval_set["pixel_values"][s].to(dev),
                eval_set["input_ids"][s].to(dev),
                eval_set["attention_mask"][s].to(dev),
                pixel_values_2=pv2,
            ).logits  # [B, C]
            pred = logits.argmax(dim=-1).cpu()  # [B]
            if soft is not None:
                scores += soft[s].float().gather(1, pred[:, None]).squeeze(1).tolist()
            else:
                scores += (pred == targets[s]).float().tolist()
    out: dict[str, Any] = {"acc": 100.0 * sum(scores) / n, "n": n, "metric": "vqav2" if soft is not None else "exact"}
    types = eval_set.get("vqa_type") if task == "vqa" else None
    if types:
        out["by_type"] = by_group(scores, types)
    return out


def by_group(scores: list[float], groups: list[str]) -> dict[str, dict[str, Any]]:
    """``{group: {"acc": percent, "n": count}}`` of per-sample scores (1 right, 0 wrong, or a VQAv2
    score) by each sample's group, in sorted group order; samples with an empty group are left out."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} groups")
    total: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups, strict=True):
        if group:
            total[group].append(score)
    return {g: {"acc": 100.0 * sum(v) / len(v), "n": len(v)} for g, v in sorted(total.items())}


def type_columns(scored: dict[str, Any]) -> dict[str, Any]:
    """``accuracy``'s ``by_type`` as flat row keys: ``vqa_acc.<type>`` (percent) and ``vqa_n.<type>``."""
    out: dict[str, Any] = {}
    for kind, v in scored.get("by_type", {}).items():
        out[f"{TYPE_ACC_PREFIX}{kind}"] = v["acc"]
        out[f"{TYPE_N_PREFIX}{kind}"] = v["n"]
    return out


def accuracy_columns(task: str, scored: dict[str, Any]) -> dict[str, Any]:
    """A results row's keys for ``accuracy``'s output on ``task``: ``<task>_acc``, ``<task>_n``, the
    per-type keys, and ``vqa_metric: "vqav2"`` when the VQAv2 metric was used."""
    out = {f"{task}_acc": scored["acc"], f"{task}_n": scored["n"], **type_columns(scored)}
    if scored.get("metric") == "vqav2":
        out["vqa_metric"] = "vqav2"
    return out
