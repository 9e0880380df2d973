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
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from vlforge.evaluation.inference import chunks, device_of, eval_mode
from vlforge.models.distill import TARGET_KEYS

__all__ = ["accuracy"]


def accuracy(
    model: nn.Module, task: Literal["nlvr2", "vqa"], eval_set: dict[str, Tensor], batch_size: int = 64
) -> dict[str, float]:
    """``{"acc": percent correct (or mean VQAv2 score), "n": samples, "metric": "exact" | "vqav2"}`` of
    ``model``'s argmax predictions on ``eval_set``."""
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
    correct = 0
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
                correct += float(soft[s].float().gather(1, pred[:, None]).sum())
            else:
                correct += int((pred == targets[s]).sum())
    return {"acc": 100.0 * correct / n, "n": n, "metric": "vqav2" if soft is not None else "exact"}
