"""Training tasks: a model and its objectives (and, for distillation, a frozen teacher in eval mode) as
one module whose ``forward(batch)`` returns ``{"loss", <term>...}``; that module is what DeepSpeed wraps.

    from vlforge.tasks import build_task, check_stages
    check_stages(cfg)                      # unknown objective names -> ConfigError, before Ray
    task = build_task(cfg, stage)          # TrainTask(module, model, prefix)

One module per family: ``vlmo`` (``VLMoPretrainTask``), ``distill`` (``DistillationTask``,
``FusionFinetuneTask``, ``as_teacher``), ``caption`` (``CaptionTask``: Frozen, VC-GPT), ``vlkd``
(``VLKDTask``); ``factory`` maps a method to its task (``build_task``), builds the method ->
objectives table from the tasks' ``OBJECTIVES`` and holds the model spec and sizes of a run.
Above ``vlforge.models`` / ``vlforge.data`` / ``vlforge.objectives``; ``vlforge.train`` uses it.
"""

from vlforge.tasks.factory import (
    CAPTION_METHODS,
    OBJECTIVES_BY_METHOD,
    TASK_BY_METHOD,
    TrainTask,
    build_task,
    check_stages,
    create,
    load_teacher,
    model_sizes,
    model_spec,
    task_prefix,
)

__all__ = [
    "CAPTION_METHODS",
    "OBJECTIVES_BY_METHOD",
    "TASK_BY_METHOD",
    "TrainTask",
    "build_task",
    "check_stages",
    "create",
    "load_teacher",
    "model_sizes",
    "model_spec",
    "task_prefix",
]
