"""vlforge.evaluation: how good and how fast trained models are, single-process on the driver.

    from vlforge.evaluation import load_eval_set, evaluate_retrieval, accuracy, latency_table, format_table

    ev = load_eval_set("data/corpus/scenes/test", data_cfg)          # one batch of tensors, file order
    evaluate_retrieval(teacher, ev, "teacher")                        # R@1/5/10 both ways + rmean (percent)
    evaluate_retrieval(student, ev, "student")
    accuracy(student, "nlvr2", load_eval_set("data/corpus/nlvr2/test", data_cfg))    # {"acc", "n"}
    rows = latency_table(teacher, student, ev["pixel_values"], ev["input_ids"], ev["attention_mask"])
    print(format_table(rows, ["n", "teacher_s", "student_s", "speedup"]))

Modules:

- ``data``: ``load_eval_set`` decodes a shard set (local or ``s3://``) without Ray and
  without augmentation, deterministically.
- ``retrieval``: score matrices [Ni, Nt] for the dual-encoder student (ITC dot
  products) and the fusion teacher (ITC shortlist re-ranked by ITM), positives for
  repeated captions, Recall@K.
- ``classification``: argmax accuracy on VQA (``answer_id``) and NLVR2 (``label``); VQA also by
  question type when the samples name theirs.
- ``latency``: time to score N texts against N images, teacher vs student (with and
  without cached image embeddings), and the growth exponent of time in N.
- ``report``: text tables, bar charts, latency plots, mean and std over seeds.

Models run in eval mode under ``torch.no_grad``; their training flag is restored after.
"""

from __future__ import annotations

from vlforge.evaluation.classification import accuracy, accuracy_columns, type_columns
from vlforge.evaluation.data import load_eval_set
from vlforge.evaluation.latency import growth, latency_table
from vlforge.evaluation.report import (
    CAPTION_METRIC_COLUMNS,
    HEADLINE_METRICS,
    INTERVAL_COUNTS,
    INTERVAL_NOTE,
    METRIC_COLUMNS,
    format_table,
    mean_std,
    plot_latency,
    plot_results,
    type_table,
    wilson_interval,
    with_intervals,
)
from vlforge.evaluation.retrieval import (
    RERANK_OFFSET,
    caption_positives,
    evaluate_retrieval,
    recall_at_k,
    student_scores,
    teacher_scores,
)

__all__ = [
    "RERANK_OFFSET",
    "accuracy",
    "accuracy_columns",
    "caption_positives",
    "evaluate_retrieval",
    "format_table",
    "growth",
    "latency_table",
    "load_eval_set",
    "mean_std",
    "plot_latency",
    "plot_results",
    "recall_at_k",
    "student_scores",
    "teacher_scores",
    "type_columns",
    "type_table",
    "CAPTION_METRIC_COLUMNS",
    "HEADLINE_METRICS",
    "INTERVAL_COUNTS",
    "INTERVAL_NOTE",
    "METRIC_COLUMNS",
    "wilson_interval",
    "with_intervals",
]
