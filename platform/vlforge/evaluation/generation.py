"""Evaluation of generative models: captioning metrics, open-ended VQA accuracy, few-shot prompts,
and whether a caption names a scene's objects.

    scores = caption_metrics({"k1": ["a llama left of a taxi", ...]}, {"k1": "a llama left of a taxi"})
    # {"bleu4": ..., "rouge_l": ..., "cider": ..., "meteor": ..., "tokenizer": "ptb", "n": 1}
    vqa_accuracy(["2", "Yes."], [["2"], ["yes"] * 10])          # {"acc": 100.0, "n": 2, "metric": ...}
    prompts = few_shot_episodes(eval_keys, train_pool, shots=4, seed=0)
    objects_named("a llama left of a taxi", ["llama", "taxi"], vocabulary)   # True

Captioning metrics come from ``pycocoevalcap`` (the COCO caption evaluation code): BLEU-4, ROUGE-L
and CIDEr-D always, METEOR when Java is on the machine. Captions are tokenised with its Stanford
PTB tokenizer when Java is present (the standard protocol) and otherwise with a plain tokenizer
(lowercase, punctuation removed, whitespace split), which ``tokenizer`` in the result says, so a
table can mark the figures. SPICE is not computed: it downloads Stanford CoreNLP at first use,
and nothing is downloaded at run time. Figures are in percent (x100), as papers print them.

VQA answers are compared after the answer normalisation the VQAv2 adapter applies to the human
answers (``data.adapters.normalize_answer``: lowercase, whitespace collapsed, trailing periods
removed). With several human answers per question the score is the VQAv2 one, min(1, matching
humans / 3); with one it is exact match.

Few-shot episodes draw their shots from a training pool only: a shot can never be a sample of the
evaluated split (``few_shot_episodes`` refuses a pool that shares keys with it). The prompt
interleaves images and texts as Frozen does (``models.frozen.few_shot_prompt``).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlforge.data.adapters import normalize_answer
from vlforge.data.corpus import load_concepts
from vlforge.data.pipeline import caption_list, sample_id
from vlforge.data.shards import iter_samples, list_shards
from vlforge.evaluation.data import load_eval_set

__all__ = [
    "caption_metrics",
    "few_shot_episodes",
    "first_answer",
    "java_available",
    "objects_named",
    "plain_tokenize",
    "score_captioner",
    "score_few_shot_vqa",
    "vqa_accuracy",
    "vqa_prompt",
]

_PUNCT = re.compile(r"[^\w\s]")


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """Whether a working ``java`` is on the PATH (pycocoevalcap's PTB tokenizer and METEOR run on it)."""
    exe = shutil.which("java")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def plain_tokenize(text: str) -> str:
    """The fallback tokenizer without Java: lowercase, punctuation removed, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _tokenized(refs: Mapping[str, Sequence[str]], cands: Mapping[str, str], ptb: bool):
    if ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in cands})
        res = tok.tokenize({k: [{"caption": cands[k]}] for k in cands})
        return gts, res
    return ({k: [plain_tokenize(c) for c in refs[k]] for k in cands}, {k: [plain_tokenize(cands[k])] for k in cands})


def caption_metrics(
    references: Mapping[str, Sequence[str]],
    candidates: Mapping[str, str],
    *,
    java: bool | None = None,
    meteor: bool = True,
) -> dict[str, Any]:
    """BLEU-4, ROUGE-L, CIDEr-D (and METEOR with Java) of ``candidates`` (one caption per key) against
    ``references`` (one or more per key), in percent; ``java`` None = use it when available."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = [k for k in candidates if not references.get(k)]
    if missing:
        raise KeyError(f"{len(missing)} candidate(s) without references, first: {missing[0]!r}")
    use_java = java_available() if java is None else java
    gts, res = _tokenized(references, candidates, ptb=use_java)
    # pycocoevalcap's scorers crash on an empty hypothesis; an empty caption scores as a lone unknown word.
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {
        "bleu4": 100 * bleu[3],
        "rouge_l": 100 * Rouge().compute_score(gts, res)[0],
        "cider": 100 * Cider().compute_score(gts, res)[0],
    }
    if use_java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = 100 * scorer.compute_score(gts, res)[0]
        finally:
            _close_meteor(scorer)
    out.update(tokenizer="ptb" if use_java else "plain (no Java: BLEU/ROUGE/CIDEr only)", n=len(candidates))
    return out


def _close_meteor(scorer) -> None:
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Open-ended VQA accuracy in percent after answer normalisation: the VQAv2 score min(1, n/3)
    when a question has several human answers, exact match when it has one."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no predictions")
    total, multi = 0.0, False
    for pred, truth in zip(predictions, answers):
        p = normalize_answer(pred)
        counts = Counter(normalize_answer(a) for a in truth)
        if len(truth) > 1:
            multi = True
            total += min(1.0, counts[p] / 3)
        else:
            total += float(counts[p] > 0)
    return {
        "acc": 100.0 * total / len(predictions),
        "n": len(predictions),
        "metric": "vqav2 min(1, n/3)" if multi else "exact match",
    }


def few_shot_episodes(eval_keys: Sequence[str], pool_keys: Sequence[str], shots: int, seed: int = 0) -> list[list[str]]:
    """For each evaluated key, the keys of its ``shots`` shots, drawn without replacement from the
    training pool with a fixed seed (the same episodes every run). The pool must not share a key
    with the evaluated set."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    shared = set(eval_keys) & set(pool_keys)
    if shared:
        raise ValueError(
            f"{len(shared)} shot candidate(s) are in the evaluated set, e.g. {sorted(shared)[0]!r}: "
            "shots come from the training split only"
        )
    if shots and len(pool_keys) < shots:
        raise ValueError(f"{shots} shots need at least that many pool samples, got {len(pool_keys)}")
    rng = np.random.default_rng(seed)
    pool = list(pool_keys)
    return [[pool[i] for i in rng.choice(len(pool), size=shots, replace=False)] if shots else [] for _ in eval_keys]


def named_objects(caption: str, vocabulary: Sequence[str]) -> set[str]:
    """The names of the ``vocabulary`` (the corpus's object names) that ``caption`` mentions, plainly
    tokenised; each matched as whole words, longer names first so that "red car" is not also "car"."""
    text = f" {plain_tokenize(caption)} "
    found = set()
    for name in sorted({plain_tokenize(v) for v in vocabulary}, key=len, reverse=True):
        if name and f" {name} " in text:
            found.add(name)
            text = text.replace(f" {name} ", " | ")
    return found


def objects_named(caption: str, objects: Sequence[str], vocabulary: Sequence[str]) -> bool:
    """Whether ``caption`` names exactly the scene's ``objects`` among the ``vocabulary``."""
    return named_objects(caption, vocabulary) == {plain_tokenize(o) for o in objects}


def _references(shards: str, storage, wanted: set[int]) -> dict[int, tuple[list[str], list[str]]]:
    """sample id -> (reference captions, object names) for the wanted samples, read in file order."""
    import json

    out: dict[int, tuple[list[str], list[str]]] = {}
    for url in list_shards(shards, storage):
        for s in iter_samples(url, storage):
            sid = sample_id(s["__key__"])
            if sid not in wanted:
                continue
            try:
                meta = json.loads(s.get("json", b"{}") or b"{}")
            except ValueError:
                meta = {}
            text = (s.get("txt") or b"").decode("utf-8", "replace").strip()
            refs = caption_list(meta) or ([text] if text else [])
            names = [o["name"] for o in meta.get("objects", []) if isinstance(o, dict) and "name" in o]
            out[sid] = (refs, names)
            if len(out) == len(wanted):
                return out
    return out


def score_captioner(
    model,
    shards: str,
    data,
    *,
    max_samples: int | None = None,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    java: bool | None = None,
    examples: int = 0,
    generate_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Captions of ``model`` (anything with ``generate(pixel_values, max_new_tokens)``) for the
    images of a captions shard set, scored against the set's captions (all of them, for COCO-style
    samples): ``caption_metrics`` plus ``objects_named`` (percent of captions naming exactly the
    scene's objects, where the samples' metadata lists them; corpus concept names as the vocabulary),
    ``objects_recall`` (percent of the scenes' objects named) and ``objects_precision`` (percent of the
    objects named that are in the scene), over ``objects_total`` scene objects.
    ``examples``: also return that many (sample id, caption, references, image as [H, W, 3] uint8) for
    a picture or a table;
    ``generate_kwargs`` go to ``generate``: ``beams`` (beam search; greedy without it), VC-GPT's ``branch``
    (the self-ensemble ablation)."""
    import torch

    ev = load_eval_set(shards, data, kind="captions", max_samples=max_samples)
    ids = ev["sample_id"].tolist()
    refs = _references(shards, data.storage, set(ids))
    captions: list[str] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                captions += model.generate(
                    ev["pixel_values"][start : start + batch_size],
                    max_new_tokens=max_new_tokens,
                    **(generate_kwargs or {}),
                )
    finally:
        model.train(was)
    keyed = {str(i): c for i, c in zip(ids, captions)}
    out = caption_metrics({str(i): refs[i][0] for i in ids}, keyed, java=java)
    with_objects = [i for i in ids if refs[i][1]]
    if with_objects:
        vocab = [c.name for c in load_concepts()]
        found = [named_objects(keyed[str(i)], vocab) for i in with_objects]
        scene = [{plain_tokenize(o) for o in refs[i][1]} for i in with_objects]
        hits = sum(len(f & w) for f, w in zip(found, scene))
        out["objects_named"] = 100.0 * sum(f == w for f, w in zip(found, scene)) / len(with_objects)
        out["objects_n"] = len(with_objects)
        out["objects_total"] = sum(len(w) for w in scene)
        out["objects_recall"] = 100.0 * hits / out["objects_total"]
        out["objects_precision"] = 100.0 * hits / max(1, sum(len(f) for f in found))
    if examples:
        shown = display_images(ev["pixel_values"][:examples], data.image)
        out["examples"] = [
            {"sample_id": i, "caption": keyed[str(i)], "references": refs[i][0], "image": img}
            for i, img in zip(ids[:examples], shown)
        ]
    return out


def display_images(pixel_values, image_cfg) -> list[np.ndarray]:
    """Normalised ``[B, 3, H, W]`` pixels back to ``[H, W, 3]`` uint8 images for a picture."""
    mean = np.asarray(image_cfg.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image_cfg.std, np.float32).reshape(1, 3, 1, 1)
    x = (pixel_values.float().cpu().numpy() * std + mean) * 255.0
    return list(np.clip(x, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1))


def sibling_train(shards: str) -> str:
    """The ``train`` split beside a shard set (``.../vqa/test`` -> ``.../vqa/train``): where few-shot
    VQA draws its shots by default."""
    return f"{shards.rstrip('/').rsplit('/', 1)[0]}/train"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """One VQA turn of a few-shot prompt: ``"Q: <question> A: <answer>"`` (the query leaves the answer open)."""
    return f"Q: {question.strip()} A:" + (f" {answer}" if answer is not None else "")


def first_answer(text: str) -> str:
    """The answer a model generated after ``A:``: up to the first newline, ``Q:`` or sentence end."""
    text = text.strip().split("\n", 1)[0]
    text = re.split(r"\bQ:|[.?!;]", text, maxsplit=1)[0]
    return text.strip()


def _vqa_samples(shards: str, data, max_samples: int | None):
    """(pixel values [N, 3, H, W], questions, human answers per question, keys) of a VQA shard set."""
    import json

    ev = load_eval_set(shards, data, kind="vqa", max_samples=max_samples)
    wanted = {sid: i for i, sid in enumerate(ev["sample_id"].tolist())}
    questions: list[str | None] = [None] * len(wanted)
    answers: list[list[str]] = [[] for _ in wanted]
    keys: list[str] = [""] * len(wanted)
    found = 0
    for url in list_shards(shards, data.storage):
        for s in iter_samples(url, data.storage):
            i = wanted.get(sample_id(s["__key__"]))
            if i is None:
                continue
            meta = json.loads(s.get("json") or b"{}")
            questions[i] = (s.get("txt") or b"").decode("utf-8", "replace").strip()
            answers[i] = [str(a) for a in meta.get("answers") or [meta["answer"]]]
            keys[i] = s["__key__"]
            found += 1
        if found == len(wanted):
            break
    return ev["pixel_values"], questions, answers, keys


def score_few_shot_vqa(
    model,
    eval_shards: str,
    pool_shards: str,
    data,
    *,
    shots: int,
    blind: bool = False,
    max_samples: int | None = None,
    pool_size: int = 200,
    seed: int = 0,
    max_new_tokens: int = 5,
) -> dict[str, Any]:
    """Open-ended few-shot VQA of an interleaved-prompt model (Frozen: ``generate_from_prompt``): each
    question of ``eval_shards`` is asked after ``shots`` solved examples drawn from ``pool_shards``
    (the training split; ``few_shot_episodes`` refuses overlap). ``blind``: the same prompts with every
    image left out (the paper's control). Returns ``vqa_accuracy`` plus the settings."""
    import torch

    pv, questions, answers, keys = _vqa_samples(eval_shards, data, max_samples)
    pool_pv, pool_q, pool_a, pool_keys = _vqa_samples(pool_shards, data, pool_size)
    episodes = few_shot_episodes(keys, pool_keys, shots, seed)
    where = {k: i for i, k in enumerate(pool_keys)}
    preds = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, episode in enumerate(episodes):
                items: list[Any] = []
                for k in episode:
                    j = where[k]
                    items += ([] if blind else [pool_pv[j]]) + [vqa_prompt(pool_q[j], pool_a[j][0])]
                items += ([] if blind else [pv[i]]) + [vqa_prompt(questions[i])]
                preds.append(first_answer(model.generate_from_prompt(items, max_new_tokens=max_new_tokens)))
    finally:
        model.train(was)
    out = vqa_accuracy(preds, answers)
    out.update(
        shots=shots,
        blind=blind,
        examples=[
            {"question": q, "prediction": p, "answers": a[:3]} for q, p, a in list(zip(questions, preds, answers))[:5]
        ],
    )
    return out
