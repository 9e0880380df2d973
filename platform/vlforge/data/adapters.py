"""Ingest adapters: public dataset files (COCO, Karpathy, VQAv2, NLVR2) -> vlforge shard sets.

    vlforge data ingest train2014/ annotations/captions_train2014.json --format coco --out data/coco/train
    vlforge data ingest coco/ dataset_coco.json --format karpathy --split test --out data/coco/karpathy_test
    vlforge data ingest coco/ dataset_coco.json --format karpathy --split train,restval --out data/coco/karpathy_train
    vlforge data ingest val2014/ v2_OpenEnded_mscoco_val2014_questions.json --format vqav2 \\
        --annotations v2_mscoco_val2014_annotations.json --out data/vqav2/val
    vlforge data ingest nlvr2/dev/ dev.json --format nlvr2 --out data/nlvr2/dev

or from Python: ``ingest_coco(annotations_json, images_dir, out)``, ``ingest_karpathy(...)``,
``ingest_vqav2(questions_json, annotations_json, images_dir, out)``, ``ingest_nlvr2(jsonl, images_dir, out)``.

Each writes the layout of ``vlforge.data.shards`` through ``ShardWriter`` (``KEY.jpg|png|webp``,
``KEY.txt``, ``KEY.json``, ``KEY.right.*`` for the second NLVR2 image, ``manifest.json`` whose
``params.kind`` is the data kind, ``captions``, ``vqa`` or ``nlvr2``) and returns the ``IngestReport`` of
``vlforge.data.ingest``: samples written, skips counted by reason, the first examples. What lands in
``KEY.txt`` and ``KEY.json``:

- coco: one sample per image; txt = its first caption; json ``captions`` (all of them), ``image_id``,
  ``file_name``, ``split`` (the ``split`` argument, default "train").
- karpathy: one sample per image; txt = first sentence; json ``captions``, ``split`` (the file's:
  train / restval / val / test), ``image_id`` (``cocoid``, else ``imgid``), ``imgid``, ``file_name``.
  ``split="test"`` (or "train,restval", or a list) keeps only those splits.
- vqav2: one sample per question; txt = question; json ``question``, ``answer`` (the normalised
  ``multiple_choice_answer``), ``answers`` (the ten normalised answers), ``answer_scores``
  ({answer: min(1, count / 3)}), ``question_id``, ``image_id``; ``answers.json`` (the vocabulary
  ``pipeline.find_answers`` reads: answers seen at least ``min_answer_count`` times, most frequent
  first) is written beside the shards, or copied from ``vocabulary=`` (e.g. the train set's).
- nlvr2: one sample per row; txt = sentence; json ``label`` (bool), ``identifier``; the left image is
  the main image, the right one ``KEY.right.*``.

Images are read with ``ingest._image_bytes`` (JPEG / PNG / WebP kept byte for byte, other formats
re-encoded as PNG, alpha kept). Skip reasons: ``missing_image``, ``unreadable_image``,
``outside_folder`` (a path that leaves ``images_dir``), ``missing_caption`` / ``missing_question`` /
``missing_sentence`` (no non-empty text), ``missing_field`` (a required key absent or unusable),
``missing_annotation`` (a VQAv2 question with no annotation), ``bad_label`` (an NLVR2 label other than
true/false), ``duplicate_image`` (an image listed twice), ``unknown_image_id`` (COCO captions naming
an image id that ``images`` does not list; once per id). Files of the wrong structure raise
``IngestError`` naming the missing key; ``strict=True`` turns any skip into an error, and a run that
writes nothing is an error. ``split`` filters only for karpathy; coco, vqav2 (default: the questions
file's ``data_subtype``) and nlvr2 (default: the identifier's prefix) write it into the metadata.
"""

from __future__ import annotations

import json
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vlforge.data.ingest import IngestError, IngestReport, image_bytes
from vlforge.data.shards import ShardWriter

FORMATS = ("coco", "karpathy", "vqav2", "nlvr2")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
VQA_IMAGE_NAME = "COCO_{subtype}_{image_id:012d}.jpg"
_COCO_ID = re.compile(r"(\d{12})\.(?:jpe?g|png)$", re.IGNORECASE)

Progress = Callable[[str], None] | None


# ----------------------------------------------------------------------------- shared plumbing


def _load_json(path: str | Path, what: str) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path} does not exist ({what})")
    try:
        with path.open(encoding="utf-8") as f:
            return path, json.load(f)
    except json.JSONDecodeError as exc:
        raise IngestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected {what}") from None
    except UnicodeDecodeError:
        raise IngestError(f"{path}: not UTF-8 text; expected {what}") from None


def _list(doc: Any, key: str, path: Path, what: str) -> list:
    if not isinstance(doc, dict):
        raise IngestError(f"{path}: not {what}: expected a JSON object with a {key!r} key, got {type(doc).__name__}")
    if key not in doc:
        raise IngestError(f"{path}: not {what}: no {key!r} key (keys: {', '.join(map(str, doc)) or 'none'})")
    value = doc[key]
    if not isinstance(value, list):
        raise IngestError(f"{path}: {key!r} must be a list, got {type(value).__name__}")
    return value


def _images_dir(images_dir: str | Path) -> Path:
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise IngestError(f"{images_dir} is not a directory")
    return images_dir


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


class _Sink:
    """A ShardWriter plus the report, image lookup inside the folder and a small image cache."""

    def __init__(
        self, out: str | Path, samples_per_shard: int, images_dir: Path, params: dict[str, Any], progress: Progress
    ):
        self.report = IngestReport()
        self.images_dir = images_dir
        self.root = images_dir.resolve()
        self.progress = progress
        self.writer = ShardWriter(out, samples_per_shard, params={**params, "ingested_from": images_dir.name})
        self._cache: OrderedDict[Path, tuple[bytes, str] | str] = OrderedDict()

    def skip(self, reason: str, detail: str) -> None:
        self.report.skip(reason, detail)

    def locate(self, names: Iterable[str | Path], where: str) -> tuple[Path, str] | None:
        """The first of ``names`` (relative to the folder) that is a file, or None (skip counted)."""
        tried = []
        for name in names:
            path = (self.images_dir / name).resolve()
            if self.root not in path.parents:
                self.skip("outside_folder", f"{where} ({name})")
                return None
            if path.is_file():
                return path, path.relative_to(self.root).as_posix()
            tried.append(str(name))
        self.skip("missing_image", f"{where} ({' or '.join(tried) or 'no file name'})")
        return None

    def image(self, path: Path, where: str) -> tuple[bytes, str] | None:
        """The bytes and extension of an image file, or None (``unreadable_image`` counted)."""
        got = self._cache.get(path)
        if got is None:
            try:
                got = image_bytes(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable image is reported, not fatal
                got = str(exc) or type(exc).__name__
            self._cache[path] = got
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        if isinstance(got, str):
            self.skip("unreadable_image", f"{where} ({path.name}: {got})")
            return None
        return got

    def write(
        self, image: tuple[bytes, str], text: str, meta: dict[str, Any], right: tuple[bytes, str] | None = None
    ) -> None:
        extra = {f"right.{right[1]}": right[0]} if right else None
        self.writer.write(
            f"{self.report.written:09d}", image=image[0], image_ext=image[1], text=text, meta=meta, extra=extra
        )
        self.report.written += 1
        if self.progress and self.report.written % 1000 == 0:
            self.progress(f"  {self.report.written} samples")

    def finish(self, source: Path, strict: bool, note: str = "", **params: Any) -> IngestReport:
        report = self.report
        if strict and report.skipped:
            raise IngestError(f"{sum(report.skipped.values())} rows skipped: " + "; ".join(report.examples))
        if report.written == 0:
            raise IngestError(
                f"no usable samples in {source}{note}" + (": " + "; ".join(report.examples) if report.examples else "")
            )
        self.writer.params.update(params)
        self.writer.params["skipped"] = report.skipped
        report.manifest = self.writer.close()
        return report


# ----------------------------------------------------------------------------- COCO captions


def ingest_coco(
    annotations_json: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    samples_per_shard: int = 1000,
    strict: bool = False,
    progress: Progress = None,
) -> IngestReport:
    """A COCO captions file (``images``: id, file_name; ``annotations``: image_id, caption) -> one
    sample per image with all its captions; ``split`` is written into each sample's metadata."""
    images_dir = _images_dir(images_dir)
    path, doc = _load_json(annotations_json, "a COCO captions file")
    what = "a COCO captions file"
    images = _list(doc, "images", path, what)
    annotations = _list(doc, "annotations", path, what)
    sink = _Sink(
        out,
        samples_per_shard,
        images_dir,
        {"source": path.name, "format": "coco", "kind": "captions", "split": split},
        progress,
    )
    captions: dict[Any, list[str]] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            sink.skip("missing_field", f"{path.name}: annotations[{n}] needs image_id and caption")
            continue
        captions.setdefault(ann["image_id"], []).append(_text(ann["caption"]))
    listed = {im["id"] for im in images if isinstance(im, dict) and "id" in im}
    known = set()
    for n, im in enumerate(images):
        where = f"{path.name}: images[{n}]"
        if not isinstance(im, dict) or "id" not in im or not _text(im.get("file_name")):
            sink.skip("missing_field", f"{where} needs id and file_name")
            continue
        image_id, name = im["id"], im["file_name"].strip()
        where = f"{where} ({name})"
        if image_id in known:
            sink.skip("duplicate_image", f"{where}: image id {image_id} listed before")
            continue
        known.add(image_id)
        caps = [c for c in captions.get(image_id, []) if c]
        if not caps:
            sink.skip("missing_caption", where)
            continue
        found = sink.locate([name], where)
        image = found and sink.image(found[0], where)
        if not image:
            continue
        meta = {
            "captions": caps,
            "image_id": image_id,
            "file_name": name,
            "split": split,
            "source": found[1],
            "format": "coco",
        }
        if "license" in im:
            meta["license"] = im["license"]
        sink.write(image, caps[0], meta)
    for image_id in captions.keys() - listed:
        sink.skip("unknown_image_id", f"{path.name}: {len(captions[image_id])} caption(s) for image id {image_id}")
    return sink.finish(path, strict)


# ----------------------------------------------------------------------------- Karpathy splits


def _splits(split: str | Iterable[str] | None) -> set[str] | None:
    if split is None:
        return None
    parts = split.split(",") if isinstance(split, str) else list(split)
    wanted = {s.strip() for s in parts if s and s.strip()}
    return wanted or None


def ingest_karpathy(
    dataset_json: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    split: str | Iterable[str] | None = None,
    samples_per_shard: int = 1000,
    strict: bool = False,
    progress: Progress = None,
) -> IngestReport:
    """A Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...) -> one sample per
    image with all its sentences. ``split`` ("test", "train,restval", a list; None = all) filters by
    the file's own ``split``, which is written as it is ("restval" stays "restval")."""
    images_dir = _images_dir(images_dir)
    path, doc = _load_json(dataset_json, "a Karpathy split file")
    images = _list(doc, "images", path, "a Karpathy split file")
    wanted = _splits(split)
    dataset = doc.get("dataset")
    sink = _Sink(
        out,
        samples_per_shard,
        images_dir,
        {
            "source": path.name,
            "format": "karpathy",
            "kind": "captions",
            "split": ",".join(sorted(wanted)) if wanted else "all",
        },
        progress,
    )
    filtered, seen = 0, set()
    for n, im in enumerate(images):
        where = f"{path.name}: images[{n}]"
        if not isinstance(im, dict) or not _text(im.get("filename")) or not _text(im.get("split")):
            sink.skip("missing_field", f"{where} needs filename and split")
            continue
        name, its_split = im["filename"].strip(), im["split"].strip()
        if wanted is not None and its_split not in wanted:
            filtered += 1
            continue
        folder = _text(im.get("filepath"))
        rel = f"{folder}/{name}" if folder else name
        where = f"{where} ({rel})"
        if rel in seen:
            sink.skip("duplicate_image", where)
            continue
        seen.add(rel)
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            sink.skip("missing_field", f"{where} has no sentences list")
            continue
        caps = []
        for s in sentences:
            if isinstance(s, dict):
                text = _text(s.get("raw")) or " ".join(t for t in s.get("tokens") or [] if isinstance(t, str))
                if text.strip():
                    caps.append(text.strip())
        if not caps:
            sink.skip("missing_caption", where)
            continue
        # COCO's file keeps ``filepath`` (train2014 / val2014); images in one folder are found too
        found = sink.locate([rel, name] if folder else [name], where)
        image = found and sink.image(found[0], where)
        if not image:
            continue
        image_id = im.get("cocoid", im.get("imgid"))
        meta = {
            "captions": caps,
            "split": its_split,
            "image_id": image_id,
            "imgid": im.get("imgid"),
            "file_name": name,
            "source": found[1],
            "format": "karpathy",
        }
        if folder:
            meta["filepath"] = folder
        if dataset is not None:
            meta["dataset"] = dataset
        sink.write(image, caps[0], meta)
    note = f" for split {','.join(sorted(wanted))}" if wanted else ""
    return sink.finish(path, strict, note, filtered_out=filtered, dataset=dataset)


# ----------------------------------------------------------------------------- VQAv2


def normalize_answer(answer: Any) -> str:
    """Lower-case, trimmed, inner whitespace collapsed, trailing periods removed."""
    text = " ".join(str(answer).lower().split())
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text


def answer_scores(answers: Iterable[str]) -> dict[str, float]:
    """VQA soft scores: each distinct answer scores min(1, annotators who gave it / 3)."""
    return {a: min(1.0, c / 3) for a, c in Counter(answers).items()}


def answer_vocabulary(counts: Counter, min_count: int = 1) -> list[str]:
    """Answers seen at least ``min_count`` times, most frequent first, ties alphabetical."""
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


class _CocoImages:
    """Image id -> file name: the ``image_name`` pattern or callable first, then ``*{id:012d}.jpg``
    found anywhere under the folder (index built on the first miss)."""

    def __init__(self, images_dir: Path, image_name: str | Callable[[int], str] | None, subtype: str | None):
        self.images_dir = images_dir
        self.image_name = VQA_IMAGE_NAME if image_name is None else image_name
        self.subtype = subtype
        self._index: dict[int, str] | None = None
        if isinstance(self.image_name, str):
            try:
                self.image_name.format(image_id=1, subtype=subtype or "x")
            except (KeyError, IndexError, ValueError) as exc:
                raise IngestError(
                    f"image name pattern {self.image_name!r}: {exc!r}; "
                    "it may use {image_id} (e.g. {image_id:012d}) and {subtype}"
                ) from None

    def names(self, image_id: Any) -> Iterator[str]:
        if callable(self.image_name):
            yield str(self.image_name(image_id))
        elif self.subtype is not None or "{subtype" not in self.image_name:
            yield self.image_name.format(image_id=image_id, subtype=self.subtype)
        if self._index is None:
            self._index = {}
            for p in sorted(self.images_dir.rglob("*"), key=lambda p: (len(p.parts), str(p))):
                m = _COCO_ID.search(p.name)
                if m and p.is_file():
                    self._index.setdefault(int(m.group(1)), p.relative_to(self.images_dir).as_posix())
        if image_id in self._index:
            yield self._index[image_id]


def ingest_vqav2(
    questions_json: str | Path,
    annotations_json: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    image_name: str | Callable[[int], str] | None = None,
    split: str | None = None,
    min_answer_count: int = 1,
    vocabulary: str | Path | None = None,
    samples_per_shard: int = 1000,
    strict: bool = False,
    progress: Progress = None,
) -> IngestReport:
    """VQAv2 questions + annotations -> one sample per question, and ``answers.json`` in ``out``.

    ``image_name`` maps an image id to its file (a pattern with ``{image_id}`` / ``{subtype}`` or a
    callable); by default ``COCO_{subtype}_{image_id:012d}.jpg`` with the questions file's
    ``data_subtype``, falling back to any ``*{image_id:012d}.jpg`` under ``images_dir``. ``split``
    (default: that ``data_subtype``, e.g. "val2014") is written into the metadata. ``vocabulary``: an
    existing ``answers.json`` (say the train set's) to write instead of this set's own, so that
    ``answer_id`` means the same in both sets.
    """
    if min_answer_count < 1:
        raise IngestError(f"min_answer_count must be >= 1, got {min_answer_count}")
    images_dir = _images_dir(images_dir)
    qpath, qdoc = _load_json(questions_json, "a VQAv2 questions file")
    questions = _list(qdoc, "questions", qpath, "a VQAv2 questions file")
    apath, adoc = _load_json(annotations_json, "a VQAv2 annotations file")
    annotations = _list(adoc, "annotations", apath, "a VQAv2 annotations file")
    fixed_vocab = None
    if vocabulary is not None:
        vpath, fixed_vocab = _load_json(vocabulary, "an answers.json vocabulary")
        if not isinstance(fixed_vocab, list) or not all(isinstance(a, str) for a in fixed_vocab) or not fixed_vocab:
            raise IngestError(f"{vpath}: an answers.json vocabulary must be a non-empty JSON list of strings")
    subtype = qdoc.get("data_subtype") or (adoc.get("data_subtype") if isinstance(adoc, dict) else None)
    split = split or subtype or "train"
    names = _CocoImages(images_dir, image_name, subtype)
    out = Path(out)
    sink = _Sink(
        out,
        samples_per_shard,
        images_dir,
        {"source": qpath.name, "annotations": apath.name, "format": "vqav2", "kind": "vqa", "split": split},
        progress,
    )
    by_question: dict[Any, dict] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "question_id" not in ann:
            sink.skip("missing_field", f"{apath.name}: annotations[{n}] has no question_id")
            continue
        by_question[ann["question_id"]] = ann
    counts: Counter = Counter()
    for n, q in enumerate(questions):
        where = f"{qpath.name}: questions[{n}]"
        if not isinstance(q, dict) or "question_id" not in q or "image_id" not in q:
            sink.skip("missing_field", f"{where} needs question_id and image_id")
            continue
        qid, image_id = q["question_id"], q["image_id"]
        where = f"{where} (question {qid})"
        question = _text(q.get("question"))
        if not question:
            sink.skip("missing_question", where)
            continue
        ann = by_question.get(qid)
        if ann is None:
            sink.skip("missing_annotation", where)
            continue
        answer = normalize_answer(ann.get("multiple_choice_answer") or "")
        raw = ann.get("answers")
        if not answer or not isinstance(raw, list):
            sink.skip("missing_field", f"{where}: the annotation needs multiple_choice_answer and answers")
            continue
        answers = [normalize_answer(a.get("answer", "") if isinstance(a, dict) else a) for a in raw]
        answers = [a for a in answers if a]
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        if not isinstance(image_id, int) and not callable(names.image_name):
            sink.skip("missing_field", f"{where}: image_id {image_id!r} is not a number")
            continue
        found = sink.locate(names.names(image_id), where)
        image = found and sink.image(found[0], where)
        if not image:
            continue
        meta = {
            "question": question,
            "answer": answer,
            "answers": answers,
            "answer_scores": answer_scores(answers),
            "question_id": qid,
            "image_id": image_id,
            "split": split,
            "source": found[1],
            "format": "vqav2",
        }
        for key in ("question_type", "answer_type"):
            if key in ann:
                meta[key] = ann[key]
        sink.write(image, question, meta)
        counts[answer] += 1
    vocab = fixed_vocab if fixed_vocab is not None else answer_vocabulary(counts, min_answer_count)
    if not vocab and sink.report.written:
        raise IngestError(f"no answer occurs {min_answer_count} or more times; lower min_answer_count")
    report = sink.finish(
        qpath,
        strict,
        answers=len(vocab),
        min_answer_count=min_answer_count,
        vocabulary=str(vocabulary) if vocabulary is not None else "built",
    )
    (out / "answers.json").write_text(json.dumps(vocab, indent=1) + "\n")
    return report


# ----------------------------------------------------------------------------- NLVR2


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # a JSON list of rows is read too
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise IngestError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            yield from enumerate(rows, 1)
            return
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise IngestError(
                    f"{path}:{i}: not valid JSON ({exc.msg}); NLVR2 files hold one object per line"
                ) from None


def parse_label(value: Any) -> bool | None:
    """NLVR2 labels: "True" / "False" (any case), booleans, 1 / 0; anything else is None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower())
    return None


def _nlvr2_names(row: dict, side: int, identifier: str) -> list[str]:
    """Candidate file names of one side: ``left``/``right``; the release's ``{id minus -N}-img{side}.png``
    (also under the train set's ``directory``); ``left_url``/``right_url`` as a path, or a URL's last part."""
    key = ("left", "right")[side]
    names = [row[key].strip()] if _text(row.get(key)) else []
    if identifier and "-" in identifier:
        base = f"{identifier.rsplit('-', 1)[0]}-img{side}.png"
        if row.get("directory") not in (None, ""):
            names.append(f"{row['directory']}/{base}")
        names.append(base)
    url = _text(row.get(f"{key}_url"))
    if url:
        if "://" in url:  # a web address: the file it names, downloaded into the folder
            tail = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            if tail and tail not in (".", ".."):
                names.append(tail)
        else:
            names.append(url)
    return names


def ingest_nlvr2(
    jsonl: str | Path,
    images_dir: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    samples_per_shard: int = 1000,
    strict: bool = False,
    progress: Progress = None,
) -> IngestReport:
    """NLVR2 rows (``identifier``, ``sentence``, ``label``) -> one sample per row: left image as the
    main image, right image as ``KEY.right.*``, json ``label`` as a bool. ``split`` (default: the
    identifier's prefix, e.g. "dev") is written into the metadata."""
    images_dir = _images_dir(images_dir)
    path = Path(jsonl)
    if not path.is_file():
        raise IngestError(f"{path} does not exist (an NLVR2 JSONL file)")
    sink = _Sink(
        out,
        samples_per_shard,
        images_dir,
        {"source": path.name, "format": "nlvr2", "kind": "nlvr2", "split": split or "from identifiers"},
        progress,
    )
    for line, row in _jsonl(path):
        where = f"{path.name}:{line}"
        if not isinstance(row, dict):
            raise IngestError(f"{where}: each row must be a JSON object")
        if "sentence" not in row or "label" not in row:
            missing = [k for k in ("sentence", "label") if k not in row]
            sink.skip("missing_field", f"{where}: no {' or '.join(missing)}")
            continue
        identifier = _text(row.get("identifier"))
        where = f"{where} ({identifier})" if identifier else where
        sentence = _text(row["sentence"])
        if not sentence:
            sink.skip("missing_sentence", where)
            continue
        label = parse_label(row["label"])
        if label is None:
            sink.skip("bad_label", f"{where}: label {row['label']!r}")
            continue
        sides = []
        for side in (0, 1):
            names = _nlvr2_names(row, side, identifier)
            if not names:
                sink.skip("missing_field", f"{where}: no identifier and no {('left', 'right')[side]} image field")
                break
            found = sink.locate(names, where)
            image = found and sink.image(found[0], where)
            if not image:
                break
            sides.append((found[1], image))
        if len(sides) != 2:
            continue
        meta = {
            "label": label,
            "identifier": identifier,
            "sentence": sentence,
            "split": split or (identifier.split("-", 1)[0] if identifier else "train"),
            "source": sides[0][0],
            "source_right": sides[1][0],
            "format": "nlvr2",
        }
        for key in ("synset", "query", "writer"):
            if key in row:
                meta[key] = row[key]
        sink.write(sides[0][1], sentence, meta, right=sides[1][1])
    return sink.finish(path, strict)


__all__ = [
    "FORMATS",
    "KARPATHY_SPLITS",
    "VQA_IMAGE_NAME",
    "answer_scores",
    "answer_vocabulary",
    "ingest_coco",
    "ingest_karpathy",
    "ingest_nlvr2",
    "ingest_vqav2",
    "normalize_answer",
    "parse_label",
]
