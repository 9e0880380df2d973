"""Two-stage distillation, end to end: the body of ``jobs/two_stage.py``.

    from vlforge.config import TwoStageConfig, load
    result = run_two_stage(load(TwoStageConfig, "jobs/configs/two_stage_smoke.yaml"))
    print(result.table)

Steps, each a Ray Train run on the same Ray cluster (``vlforge.train.runner``):

1. ``<name>.teacher-pretrain``: the VLMo fusion teacher's pretraining stages (skipped when
   ``teacher.checkpoint`` names the teacher directory of an earlier job).
2. ``<name>.teacher-finetune``: one fine-tuning stage per downstream task (``vqa``, ``nlvr2``),
   each starting from the pretrained teacher; each stage's weights are kept.
3. ``<name>.student-<variant>``: the dual-encoder student's stages: pretraining distillation
   (``itm`` on image-text pairs: ITC, soft ITM labels, cross-modal attention), then fine-tuning
   distillation per task. ``distilled`` uses the configured weights; the ablations are the same
   stages with ``attn`` off (``soft_only``) or with ground-truth labels only (``hard_only``).
4. Evaluation on the driver (``vlforge.evaluation``): retrieval R@1/5/10 both ways, true/false
   reasoning and VQA accuracy per model and split (``test`` = held-out concept combinations),
   and latency of scoring N texts against N images.
5. Registration of the distilled student (``vlforge.serving.registry``) with the figures as tags.

Everything lands under ``<storage_path>/<name>/``: ``teacher/`` (model directories ``pretrain``
and one per fine-tuning stage; reusable as ``teacher.checkpoint``), ``results.json``,
``results.txt``, ``results.png``, ``latency.png``. Started again with the same ``name``, finished
runs are reused and an interrupted one resumes from its last checkpoint. One MLflow parent run
(``<name>``) holds the results; every training run is its child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlforge.config import (
    ConfigError,
    DataConfig,
    StageConfig,
    TrainRunConfig,
    TwoStageConfig,
    dump_yaml,
)
from vlforge.data.corpus import corpus_current, ensure_corpus
from vlforge.data.pipeline import find_answers
from vlforge.data.storage import StorageUnreachable, absolute, check_reachable, is_uri
from vlforge.evaluation import (
    HEADLINE_METRICS,
    INTERVAL_COUNTS,
    INTERVAL_NOTE,
    METRIC_COLUMNS,
    accuracy,
    accuracy_columns,
    evaluate_retrieval,
    format_table,
    growth,
    latency_table,
    load_eval_set,
    plot_latency,
    plot_results,
    type_table,
    with_intervals,
)
from vlforge.models.io import load_model_dir, read_spec
from vlforge.runtime import init_ray as start_ray
from vlforge.tasks.distill import as_teacher
from vlforge.tracking import ConfigChangedError, make_tracker, resolve_tracking_uri
from vlforge.tracking.store import PARENT_TAG
from vlforge.train.runner import check_data, is_finished, prepare_local_mlflow, run_training, validate
from vlforge.workflows.features import ensure_feature_cache, model_tokenizer

TASK_SETS = {"itm": "scenes", "nlvr2": "nlvr2", "vqa": "vqa"}  # the corpus set each task is evaluated on


@dataclass
class Plan:
    """The Ray Train runs of a job, in order, and where their models land."""

    name: str
    root: Path
    teacher_dir: Path
    runs: dict[str, TrainRunConfig]  # key: "teacher-pretrain", "teacher-finetune", "student-<variant>"
    variants: list[str]
    num_answers: int

    def run_dir(self, key: str) -> Path:
        cfg = self.runs[key]
        return Path(cfg.storage_path) / cfg.name

    def student_model(self, variant: str, task: str) -> Path | None:
        """The model directory of the student's last stage for ``task`` (None when no stage has it)."""
        stages = [s.name for s in self.runs[f"student-{variant}"].stages if s.task == task]
        return self.run_dir(f"student-{variant}") / "stages" / stages[-1] if stages else None

    def student_run(self, variant: str = "distilled") -> TrainRunConfig:
        """The student's run of ``variant`` (``distilled``, or an ablation the plan was made with)."""
        return self.runs[f"student-{variant}"]

    def teacher_runs(self, *, finetune: bool = True) -> list[TrainRunConfig]:
        """The teacher's runs, in order: pretraining, then fine-tuning when planned and ``finetune``
        (none when the job starts from a teacher checkpoint)."""
        keys = ["teacher-pretrain", *(["teacher-finetune"] if finetune else [])]
        return [self.runs[k] for k in keys if k in self.runs]


@dataclass
class TwoStageResult:
    name: str
    root: str
    rows: list[dict[str, Any]]
    latency: list[dict[str, Any]]
    table: str
    seconds: dict[str, float]
    registered: dict[str, Any] | None = None
    parent_run_id: str | None = None
    artifacts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [self.table, "", f"job {self.name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())]
        if self.registered:
            r = self.registered
            lines.append(f"registered {r['name']} version {r['version']} as @{r['alias']} ({r['model_uri']})")
        lines.append(f"results: {self.root}")
        return "\n".join(lines)


def variant_weights(objectives: dict[str, float], variant: str) -> dict[str, float]:
    """A student stage's loss weights for an ablation variant."""
    w = dict(objectives)
    if variant == "soft_only":
        w.pop("attn", None)
        if not w.get("soft") and not w.get("hard"):
            w["soft"] = 1.0
    elif variant == "hard_only":
        w.pop("attn", None)
        w.pop("soft", None)
        w.pop("soft_image", None)
        w["hard"] = w.get("hard") or 1.0
    return {k: v for k, v in w.items() if v}


def _shards(cfg: TwoStageConfig, shards: str) -> str:
    if is_uri(shards) or os.path.isabs(shards):
        return shards
    return absolute(f"{cfg.data_root.rstrip('/')}/{shards}")


def eval_set_uri(cfg: TwoStageConfig, task: str, split: str) -> str:
    """The shard set ``task`` is evaluated on for ``split``: ``eval.sets["<task>/<split>"]``, else the corpus's."""
    return _shards(cfg, cfg.eval.sets.get(f"{task}/{split}") or f"{TASK_SETS[task]}/{split}")


def resolve_stages(cfg: TwoStageConfig, stages: list[StageConfig]) -> list[StageConfig]:
    """Stages with data under ``data_root`` and ``max_steps`` and ``max_batch_size`` applied."""
    out = []
    for s in stages:
        if s.data is None:
            raise ConfigError(f"stage {s.name}: give its data (shards, image, tokenizer, batch size)")
        batch = min(s.data.batch_size, cfg.max_batch_size) if cfg.max_batch_size else s.data.batch_size
        s = dataclasses.replace(
            s, data=dataclasses.replace(s.data, shards=_shards(cfg, s.data.shards), batch_size=batch)
        )
        if cfg.max_steps and s.steps > cfg.max_steps:
            warm = min(s.schedule.warmup_steps, cfg.max_steps - 1)
            s = dataclasses.replace(s, steps=cfg.max_steps, schedule=dataclasses.replace(s.schedule, warmup_steps=warm))
        out.append(s)
    return out


def resolved(cfg: TwoStageConfig) -> TwoStageConfig:
    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(
            cfg.teacher,
            pretrain=resolve_stages(cfg, cfg.teacher.pretrain),
            finetune=resolve_stages(cfg, cfg.teacher.finetune),
        ),
        student=dataclasses.replace(cfg.student, stages=resolve_stages(cfg, cfg.student.stages)),
    )


def _check_data_root(cfg: TwoStageConfig) -> None:
    """``data_root`` exists (or is the corpus the job builds) and its storage answers: ``ConfigError``
    in a few seconds instead of a long retry or a traceback later."""
    if is_uri(cfg.data_root):
        try:
            check_reachable(cfg.data_root)
        except StorageUnreachable as exc:
            raise ConfigError(f"data_root: {exc}") from None
    elif cfg.corpus is None and not os.path.isdir(cfg.data_root):
        raise ConfigError(
            f"data_root {absolute(cfg.data_root)} does not exist (corpus is null, so the job does not build it there)"
        )


def _corpus_pending(cfg: TwoStageConfig) -> bool:
    """The job will build the built-in corpus at ``data_root`` (local, and absent or built with other
    parameters: ``ensure_corpus`` rebuilds it, e.g. one written before a set folder was renamed)."""
    return (
        cfg.corpus is not None
        and not is_uri(cfg.data_root)
        and not corpus_current(dataclasses.replace(cfg.corpus, out=absolute(cfg.data_root)))
    )


def _num_answers(cfg: TwoStageConfig) -> int:
    for s in [*cfg.teacher.finetune, *cfg.student.stages]:  # resolved: every stage has its data
        if s.task == "vqa":
            answers = find_answers(s.data.shards, s.data.storage)
            if not answers and _corpus_pending(cfg):
                return 1  # placeholder for checking configs; the job plans again once the corpus is built
            if not answers:
                raise ConfigError(f"stage {s.name}: no answers.json beside {s.data.shards}")
            return len(answers)
    return 0


def _student_init(init: str, teacher_dir: Path) -> str:
    """``teacher:<model>`` (``teacher:pretrain``: the pretrained teacher's weights, whose image and
    text paths are the student's whole encoder) -> that teacher model's directory; else unchanged."""
    return str(teacher_dir / init.removeprefix("teacher:")) if init.startswith("teacher:") else init


def plan(cfg: TwoStageConfig, *, ablations: bool = True) -> Plan:
    """The runs of the job; every run's config is checked (paths made by earlier runs excepted)."""
    cfg = resolved(cfg)

    name = cfg.name or f"two-stage-{uuid.uuid4().hex[:8]}"
    storage = absolute(cfg.storage_path)
    root = Path(storage) / name
    teacher_dir = Path(absolute(cfg.teacher.checkpoint)) if cfg.teacher.checkpoint else root / "teacher"
    num_answers = _num_answers(cfg)
    common = dict(
        deepspeed=cfg.deepspeed,
        storage_path=storage,
        num_workers=cfg.num_workers,
        worker_cpus=cfg.worker_cpus,
        use_gpu=cfg.use_gpu,
        placement_strategy=cfg.placement_strategy,
        checkpoint_every=cfg.checkpoint_every,
        max_failures=cfg.max_failures,
        progress_every=cfg.progress_every,
        seed=cfg.seed,
        corpus=None,
    )

    def make(key: str, **kw) -> TrainRunConfig:
        tracking = dataclasses.replace(cfg.tracking, run_name=f"{name}.{key}")
        run = TrainRunConfig(name=f"{name}.{key}", tracking=tracking, data=kw["stages"][0].data, **common, **kw)
        validate(run, check_paths=False)
        return run

    runs: dict[str, TrainRunConfig] = {}
    if not cfg.teacher.checkpoint:
        runs["teacher-pretrain"] = make(
            "teacher-pretrain",
            method="vlmo",
            model=cfg.teacher.model,
            model_overrides=cfg.teacher.model_overrides,
            stages=list(cfg.teacher.pretrain),
            export=True,
        )
        if cfg.teacher.finetune:
            stages = [dataclasses.replace(s, init=str(teacher_dir / "pretrain")) for s in cfg.teacher.finetune]
            runs["teacher-finetune"] = make(
                "teacher-finetune",
                method="fusion",
                model=cfg.teacher.model,
                model_overrides=cfg.teacher.model_overrides,
                stages=stages,
                export=False,
                stage_exports=True,
                num_answers=num_answers,
            )
    variants = ["distilled", *(cfg.ablations if ablations else [])]
    for v in variants:
        stages = [
            dataclasses.replace(
                s,
                objectives=variant_weights(s.objectives, v),
                teacher=str(teacher_dir / s.teacher) if s.teacher and v != "hard_only" else None,
                init=_student_init(s.init, teacher_dir),
            )
            for s in cfg.student.stages
        ]
        runs[f"student-{v}"] = make(
            f"student-{v}",
            method="distill",
            model=cfg.student.model,
            model_overrides=cfg.student.model_overrides,
            stages=stages,
            export=False,
            stage_exports=True,
            num_answers=num_answers,
        )
    return Plan(name, root, teacher_dir, runs, variants, num_answers)


def preflight(cfg: TwoStageConfig, *, ablations: bool = True) -> Plan:
    """The job's plan, after every check that needs storage but no Ray, so a bad job fails before
    it takes cluster resources: ``data_root`` exists or answers, every shard set of every run is
    there and complete (skipped while the built-in corpus is still to be built), a teacher to
    reuse is complete, and an ``s3://`` storage path's bucket exists. ``ConfigError`` otherwise."""
    _check_data_root(cfg)
    p = plan(cfg, ablations=ablations)
    if cfg.teacher.checkpoint:
        _check_teacher_dir(p, cfg)
    _check_storage(cfg, p)
    return p


def _check_storage(cfg: TwoStageConfig, p: Plan) -> None:
    if not _corpus_pending(cfg):
        check_data(
            [(f"run {key}, stage {s.name}", s.data or run.data) for key, run in p.runs.items() for s in run.stages]
        )
    for key in cfg.eval.sets:
        uri = eval_set_uri(cfg, *key.split("/", 1))
        if not is_uri(uri) and not os.path.exists(uri):
            raise ConfigError(f"eval.sets.{key}: shard set not found: {uri}")
    if cfg.storage_path.startswith("s3://"):
        try:
            check_reachable(cfg.storage_path)
        except StorageUnreachable as exc:
            raise ConfigError(f"storage_path: {exc}") from None


def _finished(run_dir: Path) -> bool:
    return is_finished(run_dir)


def _teacher_models(p: Plan, cfg: TwoStageConfig) -> dict[str, Path]:
    """task -> the teacher's model directory evaluated on it."""
    models = {"itm": p.teacher_dir / "pretrain"}
    for s in cfg.teacher.finetune:
        models[s.task] = p.teacher_dir / s.name
    return models


def _check_teacher_dir(p: Plan, cfg: TwoStageConfig) -> None:
    needed = {"pretrain"} | {s.teacher for s in cfg.student.stages if s.teacher}
    missing = [n for n in sorted(needed) if not (p.teacher_dir / n / "model.json").exists()]
    if missing:
        raise ConfigError(
            f"teacher.checkpoint {p.teacher_dir}: missing model directories {missing} "
            f"(a teacher directory holds pretrain/ and one directory per fine-tuning stage)"
        )


def train_or_reuse(run: TrainRunConfig, log: Callable[[str], None] = print) -> float | None:
    """Run ``run`` unless it finished earlier (its ``summary.json``; an unfinished one resumes from
    its checkpoint); the seconds it trained, None when it was reused."""
    run_dir = Path(run.storage_path) / run.name
    if _finished(run_dir):
        log(f"== {run.name}: finished earlier, reusing {run_dir}")
        return None
    log(
        f"== {run.name}: {run.method} {run.model}, stages "
        + ", ".join(f"{s.name}({s.task or ''} {s.steps} steps {s.objectives})" for s in run.stages)
    )
    t0 = time.perf_counter()
    result = run_training(run, init_ray=False)
    for line in result.summary().splitlines()[1:]:
        log(line)
    return time.perf_counter() - t0


def fill_teacher_dir(key: str, run: TrainRunConfig, teacher_dir: Path) -> None:
    """Copy the model directories of a teacher run (``key`` ``teacher-pretrain`` / ``teacher-finetune``)
    into the teacher directory; other keys are left alone. Done again on reuse, for a job that
    stopped before copying."""
    run_dir = Path(run.storage_path) / run.name
    if key == "teacher-pretrain":
        if not (run_dir / "export" / "model.json").exists():
            raise RuntimeError(f"{run.name}: no export was written under {run_dir / 'export'}")
        shutil.copytree(run_dir / "export", teacher_dir / "pretrain", dirs_exist_ok=True)
    elif key == "teacher-finetune":
        for s in run.stages:
            shutil.copytree(run_dir / "stages" / s.name, teacher_dir / s.name, dirs_exist_ok=True)


def train_all(cfg: TwoStageConfig, p: Plan, log: Callable[[str], None] = print) -> dict[str, float]:
    """Run (or reuse, or resume) every training run of the plan; seconds per run."""
    seconds: dict[str, float] = {}
    for key, run in p.runs.items():
        took = train_or_reuse(run, log)
        if took is not None:
            seconds[key] = took
        fill_teacher_dir(key, run, p.teacher_dir)
        if key == "teacher-finetune" or (key == "teacher-pretrain" and "teacher-finetune" not in p.runs):
            _check_teacher_dir(p, cfg)
    return seconds


def cache_features(cfg: TwoStageConfig, p: Plan, log: Callable[[str], None] = print) -> float | None:
    """Point the runs whose model has a locked image tokenizer at feature caches of their stages'
    shard sets (``vlforge.workflows.features``), building those that are absent or stale; seconds
    spent building, or None when nothing was built. Student runs are cached only when the teacher
    has the same tokenizer (all variants alike, so the ablations compare like with like); runs that
    finished earlier are left as they are. A set that cannot be cached (no manifest, keys the cache
    cannot hold, storage that refuses the write) stays on pixels, with the reason logged."""
    if not cfg.features.enabled:
        return None
    teacher_tok = _teacher_tokenizer(cfg, p)
    caches: dict[tuple, str | None] = {}
    built = 0.0
    for key, run in p.runs.items():
        tok = model_tokenizer(run.model, run.model_overrides)
        if tok is None or _finished(p.run_dir(key)) or (key.startswith("student-") and teacher_tok != tok):
            continue
        stages = []
        for s in run.stages:
            d = s.data
            k = (d.shards, *tok, d.image.background, tuple(d.image.mean), tuple(d.image.std))
            if d.image.size != tok[1]:
                caches[k] = None
            if k not in caches:
                try:
                    c = ensure_feature_cache(
                        d.shards,
                        tok[0],
                        d.image,
                        storage=d.storage,
                        actors=cfg.features.actors,
                        batch_size=cfg.features.batch_size,
                        verify_sha256=d.verify_sha256,
                        log=log,
                    )
                    caches[k], built = c.uri, built + c.seconds
                except (ValueError, OSError) as exc:
                    log(f"features: {d.shards} stays on pixels: {exc}")
                    caches[k] = None
            if caches[k] is None:
                stages.append(s)
            else:  # features of the unaugmented image: the stage trains without augmentation
                image = dataclasses.replace(d.image, augment=False)
                stages.append(dataclasses.replace(s, data=dataclasses.replace(d, shards=caches[k], image=image)))
        p.runs[key] = dataclasses.replace(run, stages=stages, data=stages[0].data)
    return built or None


def _teacher_tokenizer(cfg: TwoStageConfig, p: Plan) -> tuple[str, int] | None:
    """The teacher's locked image tokenizer: a reused teacher's (``teacher.checkpoint``) is read from
    its own ``pretrain/model.json``, which ``teacher.model`` need not describe."""
    if cfg.teacher.checkpoint:
        spec = read_spec(p.teacher_dir / "pretrain")
        return model_tokenizer(spec["model"], spec.get("overrides"))
    return model_tokenizer(cfg.teacher.model, cfg.teacher.model_overrides)


def eval_data(cfg: TwoStageConfig) -> DataConfig:
    """The student's first stage's data settings without augmentation: how every model is scored."""
    first = cfg.student.stages[0].data
    return dataclasses.replace(first, image=dataclasses.replace(first.image, augment=False))


def evaluate_all(cfg: TwoStageConfig, p: Plan, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per model and split: retrieval recalls, nlvr2 and vqa accuracy."""
    import torch

    data = eval_data(cfg)
    tasks = sorted({s.task for s in cfg.student.stages})
    models: dict[str, dict[str, Path]] = {"teacher": _teacher_models(p, cfg)}
    for v in p.variants:
        models[f"student-{v}"] = {t: d for t in tasks if (d := p.student_model(v, t)) is not None}
    rows = []
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for split in cfg.eval.splits:
        sets = {}
        for t in tasks:
            uri = eval_set_uri(cfg, t, split)
            sets[t] = load_eval_set(uri, dataclasses.replace(data, shards=uri), max_samples=cfg.eval.max_samples)
        # One model in memory at a time (full-size sets and models would not all fit); loading a
        # model directory costs little next to evaluating it.
        for label, dirs in models.items():
            row: dict[str, Any] = {"model": label, "split": split}
            for t in tasks:
                if t not in dirs:
                    continue
                model = load_model_dir(dirs[t])
                if t == "itm":
                    kind = "teacher" if label == "teacher" else "student"
                    row.update(
                        evaluate_retrieval(
                            model, sets[t], kind, rerank_k=cfg.eval.rerank_k, batch_size=cfg.eval.batch_size
                        )
                    )
                else:
                    scored = accuracy(model, t, sets[t], batch_size=cfg.eval.batch_size)
                    row.update(accuracy_columns(t, scored))
            rows.append(row)
            log(
                f"   eval {label} {split}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float))
            )
    return rows


def measure_latency(cfg: TwoStageConfig, p: Plan) -> list[dict[str, Any]]:
    student_dir = p.student_model("distilled", "itm")
    if student_dir is None:
        return []
    uri = eval_set_uri(cfg, "itm", cfg.eval.splits[-1])
    data = dataclasses.replace(eval_data(cfg), shards=uri)
    s = load_eval_set(uri, data, max_samples=max(cfg.eval.latency_ns))
    teacher = as_teacher(load_model_dir(p.teacher_dir / "pretrain"))
    student = load_model_dir(student_dir)
    return latency_table(
        teacher,
        student,
        s["pixel_values"],
        s["input_ids"],
        s["attention_mask"],
        ns=tuple(cfg.eval.latency_ns),
        max_teacher_pairs=cfg.eval.max_teacher_pairs,
        batch_size=cfg.eval.batch_size,
    )


RESULT_COLUMNS = ["model", "split", *METRIC_COLUMNS]
LATENCY_COLUMNS = [
    "n",
    "teacher_s",
    "teacher_extrapolated",
    "student_s",
    "student_cached_s",
    "speedup",
    "speedup_cached",
]


def report(rows: list[dict[str, Any]], latency: list[dict[str, Any]]) -> str:
    present = [c for c in RESULT_COLUMNS if any(c in r for r in rows)]
    text = format_table(
        with_intervals(rows, INTERVAL_COUNTS),
        present,
        decimals=1,
        title="Evaluation (percent; test = held-out concept combinations)",
    )
    counts = {}
    for r in rows:
        counts.setdefault(r["split"], {}).update(
            {k: r[n] for k, n in INTERVAL_COUNTS.items() if isinstance(r.get(n), int) and k in present}
        )
    text += f"\n{INTERVAL_NOTE}; n: " + "; ".join(
        f"{split} " + ", ".join(f"{k.removesuffix('_acc')} {n}" for k, n in c.items()) for split, c in counts.items()
    )
    by_type = type_table(rows)
    if by_type:
        text += "\n\n" + by_type
    if latency:
        text += "\n\n" + format_table(
            latency, LATENCY_COLUMNS, title="Latency: score N texts against N images (seconds)"
        )
        if len({r["n"] for r in latency}) > 1:
            grow = {k: growth(latency, k) for k in ("teacher_s", "student_s", "student_cached_s")}
            text += "\ngrowth (log-log slope of time vs N; 2 = quadratic, 1 = linear): " + ", ".join(
                f"{k} {v:.2f}" for k, v in grow.items()
            )
    return text


def _registration_tags(rows: list[dict[str, Any]], p: Plan, cfg: TwoStageConfig) -> dict[str, str]:
    tags = {"vlforge.job": p.name, "vlforge.teacher": str(p.teacher_dir), "vlforge.seed": str(cfg.seed)}
    for r in rows:
        if r["model"] == "student-distilled":
            for k, v in r.items():
                if isinstance(v, float):
                    tags[f"eval.{r['split']}.{k}"] = f"{v:.2f}"
    return tags


def ensure_data(cfg: TwoStageConfig, log: Callable[[str], None] = print) -> bool:
    """Build the built-in corpus at a local ``data_root`` when the config asks for it and it is absent
    (or was built with other parameters); True when it was built (or rebuilt) now."""
    if cfg.corpus is None or is_uri(cfg.data_root):
        return False
    pending = _corpus_pending(cfg)
    ensure_corpus(dataclasses.replace(cfg.corpus, out=absolute(cfg.data_root)), progress=log)
    return pending


def run_two_stage(
    cfg: TwoStageConfig, *, ablations: bool = True, init_ray: bool = True, log: Callable[[str], None] = print
) -> TwoStageResult:
    """Train, evaluate, register; see the module docstring."""
    t_start = time.perf_counter()
    cfg = dataclasses.replace(
        cfg,
        tracking=dataclasses.replace(
            cfg.tracking,
            tracking_uri=resolve_tracking_uri(cfg.tracking),
            buffer_dir=os.path.abspath(cfg.tracking.buffer_dir),
        ),
    )
    _check_data_root(cfg)
    p = plan(cfg, ablations=ablations)
    if cfg.teacher.checkpoint:
        _check_teacher_dir(p, cfg)
    if ensure_data(cfg, log):  # the first plan's answer count was a placeholder
        p = plan(dataclasses.replace(cfg, name=p.name), ablations=ablations)
    _check_storage(cfg, p)
    p.root.mkdir(parents=True, exist_ok=True)
    (p.root / "config.yaml").write_text(dump_yaml(cfg))

    prepare_local_mlflow(cfg.tracking)
    tracker = make_tracker(cfg.tracking, 0)
    parent = tracker.start(run_key=p.name, run_name=p.name) if cfg.tracking.enabled else None
    try:
        tracker.log_config(cfg)
    except ConfigChangedError as exc:
        log(f"WARNING: job {p.name} continues with a changed config; its MLflow run keeps the first values: {exc}")
        tracker.set_tags({"vlforge.config_changed_on_resume": "true"})
    if parent:
        for key, run in p.runs.items():
            p.runs[key] = dataclasses.replace(
                run, tracking=dataclasses.replace(run.tracking, tags={**run.tracking.tags, PARENT_TAG: parent})
            )
    status = "FAILED"
    try:
        if init_ray:
            start_ray(num_train_workers=cfg.num_workers, worker_cpus=cfg.worker_cpus)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        built = cache_features(cfg, p, log)
        if built is not None:
            seconds["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        seconds.update({f"train {k}": v for k, v in train_all(cfg, p, log).items()})
        seconds["train"] = time.perf_counter() - t0

        log("== evaluation")
        t0 = time.perf_counter()
        rows = evaluate_all(cfg, p, log)
        seconds["eval"] = time.perf_counter() - t0
        latency: list[dict[str, Any]] = []
        if cfg.eval.latency:
            log("== latency")
            t0 = time.perf_counter()
            latency = measure_latency(cfg, p)
            seconds["latency"] = time.perf_counter() - t0
        table = report(rows, latency)
        artifacts = _write_results(p, rows, latency, table)
        for path in artifacts:
            tracker.log_artifact(path, "results")
        for r in rows:
            tracker.log_metrics(
                {f"{r['model']}/{r['split']}/{k}": v for k, v in r.items() if isinstance(v, float)}, step=0
            )
        if parent:
            _log_table(cfg, parent, rows, latency)

        registered = None
        student_dir = p.student_model("distilled", "itm")
        if cfg.register.enabled and parent and student_dir is not None:
            log("== registration")
            t0 = time.perf_counter()
            # lazy: pulls in mlflow
            from vlforge.serving.directory import prepare_serving_dir
            from vlforge.serving.registry import log_and_register

            serving = prepare_serving_dir(student_dir, eval_data(cfg), p.root / "serving")
            version = log_and_register(
                serving,
                eval_data(cfg),
                model_name=cfg.register.model_name,
                tags=_registration_tags(rows, p, cfg),
                alias=cfg.register.alias,
                run_id=parent,
                tracking_uri=cfg.tracking.tracking_uri,
                experiment=cfg.tracking.experiment,
            )
            registered = dataclasses.asdict(version)
            seconds["register"] = time.perf_counter() - t0
        elif cfg.register.enabled and not parent:
            log("registration skipped: tracking is disabled")
        seconds["total"] = time.perf_counter() - t_start
        tracker.log_metrics({f"seconds/{k}": v for k, v in seconds.items()}, step=0)
        status = "FINISHED"
        result = TwoStageResult(p.name, str(p.root), rows, latency, table, seconds, registered, parent, artifacts)
        (p.root / "summary.txt").write_text(result.summary() + "\n")
        return result
    finally:
        report_ = tracker.end(status)
        if report_ is not None and not report_.complete:
            log(f"MLflow: {report_.summary()}")


def _write_results(p: Plan, rows, latency, table: str) -> list[str]:
    (p.root / "results.json").write_text(json.dumps({"rows": rows, "latency": latency}, indent=1))
    (p.root / "results.txt").write_text(table + "\n")
    out = [str(p.root / "results.json"), str(p.root / "results.txt")]
    metrics = [m for m in HEADLINE_METRICS if any(m in r for r in rows)]
    labelled = [{**r, "label": f"{r['model']} ({r['split']})"} for r in rows]
    out.append(str(plot_results(labelled, metrics, p.root / "results.png", label_key="label")))
    if latency:
        out.append(str(plot_latency(latency, p.root / "latency.png")))
    return out


def _log_table(cfg: TwoStageConfig, run_id: str, rows, latency) -> None:
    """The results as MLflow tables (shown in the run's artifact view); best effort."""
    import logging

    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.tracking.tracking_uri)
        cols = sorted({k for r in rows for k in r})
        client.log_table(run_id, {c: [r.get(c) for r in rows] for c in cols}, "results/results_table.json")
        if latency:
            lcols = sorted({k for r in latency for k in r})
            client.log_table(run_id, {c: [r.get(c) for r in latency] for c in lcols}, "results/latency_table.json")
    except Exception as exc:  # noqa: BLE001 - the files above already hold the same figures
        logging.getLogger("vlforge").warning("could not log the results table to MLflow: %s", exc)
