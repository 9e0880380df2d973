"""Promotion between registry aliases, gated on a fresh evaluation; rollback.

    vlforge promote                                  # challenger -> champion of vlforge-dual-encoder, if it wins
    vlforge promote --dry-run                        # evaluate and decide, change nothing
    vlforge promote --challenger 7 --set eval.max_samples=1000
    vlforge promote --rollback                       # put the previous champion back
    python jobs/promote.py --config jobs/configs/promote.yaml      # the same, for ray job submit

``promote(cfg)``:

1. Resolves the challenger (an alias, ``challenger`` by default, or a version number) and
   the current ``champion`` of ``cfg.model_name``.
2. Takes the model's promotion lock: a registered model named ``<name>.promotion-lock``,
   created with ``create_registered_model``, which the registry's unique name constraint lets
   exactly one caller create (the server's database decides; no extra service). Others wait up
   to ``lock_timeout_s``; a lock older than ``stale_lock_s`` (a crashed promotion) is broken.
   Holding it, the champion read in step 3 cannot move under the decision, so two concurrent
   promotions cannot both win against the same champion.
3. Downloads both models from the registry and scores them on the fixed evaluation set
   (``cfg.eval``, each model with the preprocessing it was registered with, in percent): a dual
   encoder on image-text retrieval R@1/5/10 both ways and their mean; a captioning model
   (Frozen, VC-GPT, VLKD) on its greedy captions' CIDEr, BLEU-4, ROUGE-L (METEOR with Java) and
   objects named, or, for Frozen on a VQA set, few-shot VQA accuracy. Tags are not trusted; rules
   naming a metric the evaluation does not produce are an error.
4. Decides: every ``improve`` metric must gain at least its margin and no ``guard`` metric may
   drop by more than its tolerance. With no champion, the challenger becomes the first one.
5. Records the decision before anything moves: tags (``promotion.*``: decision, reason, time,
   the other version, the evaluation set, each metric) and a description on both versions.
6. Only then, when promoted, points the champion alias at the challenger and appends it to the
   registered model's ``vlforge.champion_history`` tag, which ``rollback`` walks back.

A refused promotion leaves the alias where it was; the command exits 1 with the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlforge.config import DataConfig, PromoteConfig
from vlforge.config.promote import CAPTION_PROMOTION_METRICS
from vlforge.data.pipeline import detect_kind
from vlforge.evaluation import evaluate_retrieval, format_table, load_eval_set
from vlforge.evaluation.generation import score_captioner, score_few_shot_vqa, sibling_train
from vlforge.models.io import load_model_dir
from vlforge.tracking.redact import redact_text, secret_env_values
from vlforge.tracking.store import resolve_tracking_uri

HISTORY_TAG = "vlforge.champion_history"
LOCK_SUFFIX = ".promotion-lock"
PROMOTED, REFUSED, UNCHANGED, ROLLED_BACK = "promoted", "refused", "unchanged", "rolled_back"


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot go ahead (missing alias, busy lock, moved alias)."""


@dataclass
class Decision:
    model_name: str
    action: str  # promoted | refused | unchanged | rolled_back
    challenger: str | None  # version numbers
    champion: str | None  # the champion before the decision
    reason: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "challenger" / "champion" -> metric -> value
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    time: str = ""
    eval_set: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.action == REFUSED else 0

    def summary(self) -> str:
        lines = []
        if self.comparisons:
            lines.append(
                format_table(
                    self.comparisons,
                    ["metric", "rule", "champion", "challenger", "delta", "needed", "ok"],
                    title=f"{self.model_name}: version {self.challenger} vs champion "
                    f"{self.champion or '-'} on {self.eval_set}",
                    decimals=2,
                )
            )
        elif self.metrics.get("challenger"):
            lines.append(
                f"{self.model_name} version {self.challenger} on {self.eval_set}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in self.metrics["challenger"].items() if not k.startswith("n_"))
            )
        lines.append(f"{'DRY RUN: would be ' if self.dry_run else ''}{self.action}: {self.reason}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- registry helpers


def _client(cfg: PromoteConfig):
    from mlflow import MlflowClient

    return MlflowClient(
        tracking_uri=resolve_tracking_uri(cfg.tracking), registry_uri=resolve_tracking_uri(cfg.tracking)
    )


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def resolve_version(client, name: str, ref: str) -> str:
    """The version number of an alias (``vlforge.serving.registry.resolve_alias``) or of a version."""
    from mlflow.exceptions import MlflowException

    if not str(ref).isdigit():
        # lazy: pulls in mlflow
        from vlforge.serving.registry import resolve_alias

        return resolve_alias(name, ref, client.tracking_uri).version
    try:
        return str(client.get_model_version(name, str(ref)).version)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise PromotionError(f"no registered model {name!r}") from None
        raise PromotionError(f"model {name!r} has no version {ref!r}") from None


def champion_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def _history(client, name: str) -> list[str]:
    text = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in text.split(",") if v]


@contextlib.contextmanager
def promotion_lock(
    client, name: str, timeout_s: float, stale_s: float, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` (a registered model only one caller can create) for the block."""
    from mlflow.exceptions import MlflowException

    lock, token = f"{name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline, waited = time.monotonic() + timeout_s, False
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={
                    "holder": token,
                    "host": socket.gethostname(),
                    "pid": str(os.getpid()),
                    "since": f"{time.time():.3f}",
                },
                description=f"held while a promotion of {name} decides; deleted after",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).tags
        except MlflowException:
            continue  # released in between
        age = time.time() - float(held.get("since", "0") or 0)
        if age > stale_s:
            log(
                f"breaking a stale promotion lock on {name} "
                f"(held {age:.0f}s by {held.get('host')} pid {held.get('pid')})"
            )
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock)
            continue
        if time.monotonic() > deadline:
            raise PromotionError(
                f"another promotion of {name} is in progress (lock {lock} held {age:.0f}s by "
                f"{held.get('host')} pid {held.get('pid')}); try again later"
            )
        if not waited:
            log(f"waiting for another promotion of {name} to finish ...")
            waited = True
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            if client.get_registered_model(lock).tags.get("holder") == token:
                client.delete_registered_model(lock)


# ----------------------------------------------------------------------------- evaluation


def evaluate_version(client, name: str, version: str, cfg: PromoteConfig, workdir: Path) -> dict[str, float]:
    """The metrics (percent) of one registered version on the fixed evaluation set: retrieval for a dual
    encoder, captioning or few-shot VQA for a captioning model (``PromotionEvalConfig``)."""
    # lazy: pulls in mlflow
    from vlforge.serving.directory import serving_image, serving_kind
    from vlforge.serving.pyfunc_model import DUAL_ENCODER
    from vlforge.serving.registry import download_serving_dir

    directory = download_serving_dir(name, "", client.tracking_uri, workdir / f"v{version}", version=version)
    kind = serving_kind(directory)
    data_kind = detect_kind(cfg.eval.shards, cfg.eval.storage)
    model = load_model_dir(directory)
    if kind == DUAL_ENCODER:
        if data_kind != "captions":
            raise PromotionError(
                f"eval.shards {cfg.eval.shards} is a {data_kind} set; a dual encoder is gated on "
                "image-text retrieval over a captions set"
            )
        return _retrieval(model, directory, cfg)
    data = DataConfig(shards=cfg.eval.shards, image=serving_image(directory), storage=cfg.eval.storage)
    if data_kind == "captions":
        out = score_captioner(
            model,
            cfg.eval.shards,
            data,
            max_samples=cfg.eval.max_samples,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        return {k: float(out[k]) for k in CAPTION_PROMOTION_METRICS if k in out}
    if data_kind == "vqa" and callable(getattr(model, "generate_from_prompt", None)):
        pool = cfg.eval.pool or sibling_train(cfg.eval.shards)
        out = score_few_shot_vqa(
            model, cfg.eval.shards, pool, data, shots=cfg.eval.shots, max_samples=cfg.eval.max_samples
        )
        return {"vqa_acc": float(out["acc"])}
    raise PromotionError(
        f"version {version} of {name} is a captioning model ({type(model).__name__}); it is "
        f"gated on a captions set, or (Frozen) a VQA set, not a {data_kind} set ({cfg.eval.shards})"
    )


def _retrieval(model, directory: Path, cfg: PromoteConfig) -> dict[str, float]:
    # lazy: pulls in mlflow
    from vlforge.serving.directory import serving_preprocessing

    image, tokenizer = serving_preprocessing(directory)
    data = DataConfig(shards=cfg.eval.shards, image=image, tokenizer=tokenizer, storage=cfg.eval.storage)
    eval_set = load_eval_set(cfg.eval.shards, data, kind="captions", max_samples=cfg.eval.max_samples)
    out = evaluate_retrieval(model, eval_set, "student", batch_size=cfg.eval.batch_size)
    return {k: float(v) for k, v in out.items()}


def check_metrics(metrics: dict[str, float], cfg: PromoteConfig, version: str) -> None:
    """PromotionError unless the evaluation produced every metric the rules name."""
    wanted = sorted(set(cfg.improve) | set(cfg.guard))
    missing = [m for m in wanted if m not in metrics]
    if missing:
        raise PromotionError(
            f"the rules name {missing}, which the evaluation of version {version} on {cfg.eval.shards} does not "
            f"produce (it gives {sorted(k for k in metrics if not k.startswith('n_'))}); set improve / guard "
            "to metrics of this kind of model"
        )


def compare(
    challenger: dict[str, float], champion: dict[str, float], cfg: PromoteConfig
) -> tuple[bool, str, list[dict[str, Any]]]:
    """(promote?, reason, one row per rule)."""
    rows, failed = [], []
    for metric, margin in cfg.improve.items():
        delta = challenger[metric] - champion[metric]
        ok = delta >= margin - 1e-9
        rows.append(
            {
                "metric": metric,
                "rule": "improve",
                "champion": champion[metric],
                "challenger": challenger[metric],
                "delta": delta,
                "needed": f">= +{margin:g}",
                "ok": "yes" if ok else "NO",
            }
        )
        if not ok:
            failed.append(f"{metric} {delta:+.2f} (needs >= +{margin:g})")
    for metric, tolerance in cfg.guard.items():
        delta = challenger[metric] - champion[metric]
        ok = delta >= -tolerance - 1e-9
        rows.append(
            {
                "metric": metric,
                "rule": "guard",
                "champion": champion[metric],
                "challenger": challenger[metric],
                "delta": delta,
                "needed": f">= -{tolerance:g}",
                "ok": "yes" if ok else "NO",
            }
        )
        if not ok:
            failed.append(f"guarded {metric} {delta:+.2f} (may drop at most {tolerance:g})")
    if failed:
        return False, "; ".join(failed), rows
    gains = ", ".join(f"{r['metric']} {r['delta']:+.2f}" for r in rows if r["rule"] == "improve")
    return True, f"improves {gains}; no guarded metric worse than allowed", rows


# ----------------------------------------------------------------------------- recording


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(text: str) -> str:
    return redact_text(text, secret_env_values())


def record(client, d: Decision) -> None:
    """Tags and descriptions on both versions, written before any alias moves."""
    name = d.model_name
    common = {"promotion.time": d.time, "promotion.eval_set": d.eval_set}
    chal_tags = {
        **common,
        "promotion.decision": d.action,
        "promotion.reason": d.reason[:4000],
        "promotion.champion": d.champion or "none",
    }
    chal_tags.update({f"promotion.eval.{k}": f"{v:.4f}" for k, v in d.metrics.get("challenger", {}).items()})
    for k, v in chal_tags.items():
        client.set_model_version_tag(name, d.challenger, k, _clean(v))
    client.update_model_version(
        name,
        d.challenger,
        description=_clean(
            f"{d.time}: {d.action} against champion {d.champion or 'none'} ({d.reason}).\n\n{d.summary()}"
        ),
    )
    if d.champion:
        champ_tags = {**common, "promotion.last_challenge": f"version {d.challenger} {d.action}"}
        champ_tags.update({f"promotion.eval.{k}": f"{v:.4f}" for k, v in d.metrics.get("champion", {}).items()})
        for k, v in champ_tags.items():
            client.set_model_version_tag(name, d.champion, k, _clean(v))
        old = client.get_model_version(name, d.champion).description or ""
        line = f"{d.time}: challenged by version {d.challenger}: {d.action} ({d.reason})"
        client.update_model_version(name, d.champion, description=_clean(f"{old}\n{line}".strip()[-5000:]))


# ----------------------------------------------------------------------------- promote / rollback


def promote(cfg: PromoteConfig, *, dry_run: bool = False, log: Callable[[str], None] = print) -> Decision:
    """Evaluate, decide, record, and (when it wins and this is no dry run) move the champion alias."""
    client = _client(cfg)
    name = cfg.model_name
    challenger = resolve_version(client, name, cfg.challenger)
    eval_set = f"{cfg.eval.shards} (first {cfg.eval.max_samples})"
    guard = (
        contextlib.nullcontext() if dry_run else promotion_lock(client, name, cfg.lock_timeout_s, cfg.stale_lock_s, log)
    )
    with guard:
        champion = champion_version(client, name, cfg.champion_alias)
        d = Decision(
            name,
            UNCHANGED,
            challenger,
            str(champion.version) if champion else None,
            "",
            dry_run=dry_run,
            time=_now(),
            eval_set=eval_set,
        )
        if champion is not None and str(champion.version) == d.challenger:
            d.reason = f"version {d.challenger} is already @{cfg.champion_alias}"
            return d
        log(
            f"evaluating {name} version {d.challenger}"
            + (f" and champion version {d.champion}" if d.champion else "")
            + f" on {eval_set} ..."
        )
        with tempfile.TemporaryDirectory(prefix="vlforge-promote-") as tmp:
            d.metrics["challenger"] = evaluate_version(client, name, d.challenger, cfg, Path(tmp))
            check_metrics(d.metrics["challenger"], cfg, d.challenger)
            if champion is not None:
                d.metrics["champion"] = evaluate_version(client, name, d.champion, cfg, Path(tmp))
        if champion is None:
            ok, d.reason = True, f"no @{cfg.champion_alias} yet: version {d.challenger} becomes the first champion"
        else:
            ok, d.reason, d.comparisons = compare(d.metrics["challenger"], d.metrics["champion"], cfg)
        d.action = PROMOTED if ok else REFUSED
        if dry_run:
            return d
        record(client, d)
        if ok:
            now = champion_version(client, name, cfg.champion_alias)
            if (str(now.version) if now else None) != d.champion:
                raise PromotionError(
                    f"@{cfg.champion_alias} of {name} moved to version {now.version if now else None} "
                    f"while version {d.challenger} was evaluated against {d.champion} (set by hand, "
                    f"outside the promotion lock); nothing was changed, run the promotion again"
                )
            history = _history(client, name)
            if d.champion and (not history or history[-1] != d.champion):
                history.append(d.champion)
            client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, d.challenger]))
            client.set_registered_model_alias(name, cfg.champion_alias, d.challenger)
        return d


def rollback(cfg: PromoteConfig, *, dry_run: bool = False, log: Callable[[str], None] = print) -> Decision:
    """Point the champion alias back at the version that was champion before the current one."""
    client = _client(cfg)
    name = cfg.model_name
    guard = (
        contextlib.nullcontext() if dry_run else promotion_lock(client, name, cfg.lock_timeout_s, cfg.stale_lock_s, log)
    )
    with guard:
        champion = champion_version(client, name, cfg.champion_alias)
        if champion is None:
            raise PromotionError(f"{name} has no @{cfg.champion_alias}: nothing to roll back")
        history = _history(client, name)
        current = str(champion.version)
        if not history or history[-1] != current:
            raise PromotionError(
                f"@{cfg.champion_alias} of {name} is version {current}, but the promotion history "
                f"({HISTORY_TAG} = {','.join(history) or 'empty'}) does not end there: it was moved "
                f"outside `vlforge promote`; set the alias you want by hand"
            )
        if len(history) < 2:
            raise PromotionError(f"version {current} is the first champion of {name}: there is none before it")
        target = history[-2]
        d = Decision(
            name,
            ROLLED_BACK,
            target,
            current,
            f"@{cfg.champion_alias} back from version {current} to version {target}",
            dry_run=dry_run,
            time=_now(),
        )
        if dry_run:
            return d
        for version, tag in ((current, "promotion.rolled_back_from"), (target, "promotion.restored")):
            client.set_model_version_tag(name, version, tag, d.time)
        client.set_model_version_tag(name, current, "promotion.decision", "rolled_back")
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
        client.set_registered_model_alias(name, cfg.champion_alias, target)
        return d
