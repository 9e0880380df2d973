"""Typed configs: dataclasses loaded strictly from YAML, with ``--set`` overrides.

Every config in vlforge is a dataclass. ``load(cls, path, overrides)`` reads a
YAML file into it and refuses anything it does not declare: an unknown key or a
value of the wrong type is an error that names the full key path
(``data.loader.batch_size: expected int, got str 'abc'``). ``--set a.b.c=value``
overrides are applied to the raw mapping before validation, so they are checked
the same way; the value is parsed as YAML (``--set train.lr=3e-4``,
``--set data.shards=[a,b]``).

    cfg = load(CorpusConfig, "jobs/configs/corpus.yaml", ["n_scenes=500"])
    dump_yaml(cfg)        # resolved config, back to YAML
    flatten(cfg)          # {"n_scenes": 500, ...} for tracking params

The package: ``loader`` (overrides, conversion, ``load``, ``from_dict``, output) apart from the
dataclasses, one module per concern (``tasks``, ``data``, ``tracking``, ``train``, ``two_stage``, ``sweep``,
``promote``); everything is re-exported here, so ``from vlforge.config import DataConfig`` works.
"""

from __future__ import annotations

from vlforge.config.data import (
    S3_ENDPOINT_ENV,
    CorpusConfig,
    DataConfig,
    DataDemoConfig,
    ImageConfig,
    StorageConfig,
    TokenizerConfig,
)
from vlforge.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    flatten,
    from_dict,
    load,
    parse_override,
    to_dict,
)
from vlforge.config.promote import (
    PROMOTION_METRICS,
    PromoteConfig,
    PromotionEvalConfig,
)
from vlforge.config.sweep import (
    PARAM_TYPES,
    SEARCH_ALGORITHMS,
    SWEEP_METRICS,
    VALIDATION_METRICS,
    ParamSpace,
    SchedulerConfig,
    SearchConfig,
    SweepConfig,
    TrialResources,
    ValidationConfig,
)
from vlforge.config.tasks import (
    DATA_KINDS,
    FINETUNE_TASKS,
    TASK_KIND,
    TASKS,
)
from vlforge.config.tracking import (
    TrackingConfig,
)
from vlforge.config.train import (
    DebugConfig,
    DeepSpeedConfig,
    OptimizerConfig,
    PlacementStrategy,
    ScheduleConfig,
    StageConfig,
    TrainRunConfig,
)
from vlforge.config.two_stage import (
    ABLATIONS,
    EvalConfig,
    FeatureCacheConfig,
    RegisterConfig,
    StudentConfig,
    TeacherConfig,
    TwoStageConfig,
)

__all__ = [
    "ABLATIONS",
    "ConfigError",
    "CorpusConfig",
    "DATA_KINDS",
    "DataConfig",
    "DataDemoConfig",
    "DebugConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FINETUNE_TASKS",
    "FeatureCacheConfig",
    "ImageConfig",
    "OptimizerConfig",
    "PlacementStrategy",
    "PARAM_TYPES",
    "PROMOTION_METRICS",
    "ParamSpace",
    "PromoteConfig",
    "PromotionEvalConfig",
    "RegisterConfig",
    "S3_ENDPOINT_ENV",
    "SEARCH_ALGORITHMS",
    "SWEEP_METRICS",
    "ScheduleConfig",
    "SchedulerConfig",
    "SearchConfig",
    "StageConfig",
    "StorageConfig",
    "StudentConfig",
    "SweepConfig",
    "T",
    "TASK_KIND",
    "TASKS",
    "TeacherConfig",
    "TokenizerConfig",
    "TrackingConfig",
    "TrainRunConfig",
    "TrialResources",
    "TwoStageConfig",
    "VALIDATION_METRICS",
    "ValidationConfig",
    "apply_overrides",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load",
    "parse_override",
    "to_dict",
]
