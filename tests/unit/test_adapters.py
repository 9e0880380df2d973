"""Ingest adapters for COCO, Karpathy, VQAv2 and NLVR2 files: shards that decode through the eval loader."""

import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlforge.cli import main
from vlforge.config import DataConfig, ImageConfig
from vlforge.data.adapters import (
    answer_scores,
    ingest_coco,
    ingest_karpathy,
    ingest_nlvr2,
    ingest_vqav2,
    normalize_answer,
    parse_label,
)
from vlforge.data.ingest import IngestError
from vlforge.data.pipeline import answer_targets
from vlforge.data.shards import iter_samples, list_shards, read_manifest
from vlforge.evaluation.classification import accuracy
from vlforge.evaluation.data import load_eval_set

pytestmark = pytest.mark.unit
S = 16
DATA = DataConfig(image=ImageConfig(size=S, augment=False))
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _img(color=RED, fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (S, S), color if mode == "RGB" else (*color, 128)).save(buf, format=fmt)
    return buf.getvalue()


def _samples(out) -> list[dict]:
    return [s for sh in list_shards(str(out)) for s in iter_samples(sh)]


def _meta(out) -> list[dict]:
    return [json.loads(s["json"]) for s in _samples(out)]


@pytest.fixture
def imgs(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(_img(RED))
    (d / "b.jpg").write_bytes(_img(BLUE, "JPEG"))
    (d / "rgba.png").write_bytes(_img(RED, mode="RGBA"))
    (d / "bad.png").write_bytes(b"not an image")
    (tmp_path / "outside.png").write_bytes(_img())
    return d


def _write(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


# ----------------------------------------------------------------------------- COCO


def _coco(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "license": 3},
        {"id": 2, "file_name": "b.jpg"},
        {"id": 3, "file_name": "rgba.png"},
        {"id": 4, "file_name": "missing.png"},
        {"id": 5, "file_name": "a.png"},
        {"id": 6, "file_name": "../outside.png"},
        {"id": 7, "file_name": "bad.png"},
    ]
    caps = [
        (1, "a red square"),
        (2, "a blue square"),
        (1, "  red, again "),
        (1, ""),
        (3, "see-through"),
        (4, "gone"),
        (5, "   "),
        (6, "escape"),
        (7, "broken"),
        (99, "nobody's"),
    ]
    anns = [{"id": 10 + n, "image_id": i, "caption": c} for n, (i, c) in enumerate(caps)]
    return _write(tmp_path / "captions_val2014.json", {"info": {}, "images": images, "annotations": anns})


def test_coco_one_sample_per_image_with_every_caption(tmp_path, imgs):
    rep = ingest_coco(_coco(tmp_path), imgs, tmp_path / "out", split="val", samples_per_shard=2)
    assert rep.written == 3
    assert rep.skipped == {
        "missing_image": 1,
        "missing_caption": 1,
        "outside_folder": 1,
        "unreadable_image": 1,
        "unknown_image_id": 1,
    }
    samples = _samples(tmp_path / "out")
    assert [s["txt"].decode() for s in samples] == ["a red square", "a blue square", "see-through"]
    meta = [json.loads(s["json"]) for s in samples]
    assert meta[0]["captions"] == ["a red square", "red, again"]
    assert meta[0]["image_id"] == 1 and meta[0]["file_name"] == "a.png" and meta[0]["license"] == 3
    assert {m["split"] for m in meta} == {"val"}
    assert "jpg" in samples[1] and Image.open(io.BytesIO(samples[2]["png"])).mode == "RGBA"  # bytes kept as they are
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.total_samples == 3 and manifest.params["kind"] == "captions"
    assert manifest.params["skipped"] == rep.skipped
    ev = load_eval_set(str(tmp_path / "out"), DATA)  # task from the manifest
    assert ev["pixel_values"].shape == (3, 3, S, S)
    assert ingest_coco(_coco(tmp_path), imgs, tmp_path / "dflt").manifest.params["split"] == "train"
    with pytest.raises(IngestError, match="5 rows skipped"):
        ingest_coco(_coco(tmp_path), imgs, tmp_path / "strict", strict=True)


def test_coco_structure_errors(tmp_path, imgs):
    with pytest.raises(IngestError, match="no 'annotations' key"):
        ingest_coco(_write(tmp_path / "c.json", {"images": []}), imgs, tmp_path / "o")
    with pytest.raises(IngestError, match="does not exist"):
        ingest_coco(tmp_path / "none.json", imgs, tmp_path / "o")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(IngestError, match="not valid JSON"):
        ingest_coco(tmp_path / "broken.json", imgs, tmp_path / "o")
    with pytest.raises(IngestError, match="no usable samples"):
        ingest_coco(_write(tmp_path / "e.json", {"images": [], "annotations": []}), imgs, tmp_path / "o")


# ----------------------------------------------------------------------------- Karpathy


def _karpathy(tmp_path, imgs):
    (imgs / "val2014").mkdir()
    (imgs / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(_img(BLUE, "JPEG"))

    def entry(n, name, split, raws, filepath=None):
        e = {
            "filename": name,
            "imgid": n,
            "split": split,
            "cocoid": 1000 + n,
            "sentences": [{"raw": r, "tokens": r.split(), "imgid": n, "sentid": 5 * n + k} for k, r in enumerate(raws)],
        }
        if filepath:
            e["filepath"] = filepath
        return e

    images = [
        entry(0, "COCO_val2014_000000000042.jpg", "test", ["one", "two", "three"], "val2014"),
        entry(1, "a.png", "restval", ["restval caption"], "val2014"),  # found in the folder itself
        entry(2, "b.jpg", "train", ["train caption", " "]),
        entry(3, "rgba.png", "val", ["val caption"]),
        entry(4, "missing.jpg", "test", ["gone"]),
        entry(5, "a.png", "test", ["", "  "]),
        {"filename": "a.png", "imgid": 6, "sentences": []},
    ]
    return _write(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_keeps_splits_and_filters(tmp_path, imgs):
    path = _karpathy(tmp_path, imgs)
    rep = ingest_karpathy(path, imgs, tmp_path / "all")
    assert rep.written == 4
    assert rep.skipped == {"missing_image": 1, "missing_caption": 1, "missing_field": 1}
    meta = _meta(tmp_path / "all")
    assert [m["split"] for m in meta] == ["test", "restval", "train", "val"]
    assert meta[0]["captions"] == ["one", "two", "three"] and meta[0]["image_id"] == 1000 and meta[0]["imgid"] == 0
    assert meta[0]["source"] == "val2014/COCO_val2014_000000000042.jpg" and meta[1]["source"] == "a.png"
    assert meta[2]["captions"] == ["train caption"] and meta[0]["dataset"] == "coco"

    rep = ingest_karpathy(path, imgs, tmp_path / "test", split="test")
    assert rep.written == 1 and rep.manifest.params["filtered_out"] == 3
    assert _samples(tmp_path / "test")[0]["txt"] == b"one"
    assert [m["split"] for m in _meta(tmp_path / "test")] == ["test"]
    rep = ingest_karpathy(path, imgs, tmp_path / "train", split="train,restval")
    assert [m["split"] for m in _meta(tmp_path / "train")] == ["restval", "train"]
    assert ingest_karpathy(path, imgs, tmp_path / "lst", split=["val"]).written == 1
    with pytest.raises(IngestError, match="no usable samples .* for split nope"):
        ingest_karpathy(path, imgs, tmp_path / "none", split="nope")
    ev = load_eval_set(str(tmp_path / "all"), DATA, kind="captions")
    assert ev["input_ids"].shape[0] == 4


def test_karpathy_sets_are_scored_with_the_coco_protocol(tmp_path, imgs):
    from vlforge.evaluation.retrieval import recall_at_k, retrieval_texts

    ingest_karpathy(_karpathy(tmp_path, imgs), imgs, tmp_path / "all")
    ev = load_eval_set(str(tmp_path / "all"), DATA, kind="captions")
    assert ev["caption_image"].tolist() == [0, 0, 0, 1, 2, 3]  # "one", "two", "three"; then one caption each
    assert torch.equal(ev["caption_input_ids"][0], ev["input_ids"][0])
    assert not torch.equal(ev["caption_input_ids"][1], ev["input_ids"][0])
    ids, mask, positives = retrieval_texts(ev)
    assert ids.shape[0] == mask.shape[0] == 6 and positives.shape == (4, 6)
    assert positives.sum(dim=1).tolist() == [3, 1, 1, 1] and positives.sum(dim=0).tolist() == [1] * 6
    # Image 0 ranks its third caption first: an i2t hit at 1. Caption 1 ("two") ranks image 3 first: a t2i miss.
    scores = torch.zeros(4, 6)
    scores[0, :3] = torch.tensor([0.1, 0.2, 0.9])
    scores[1, 3] = scores[2, 4] = scores[3, 5] = 1.0
    scores[3, 1] = 0.95
    r = recall_at_k(scores, positives, ks=(1,))
    assert r["i2t_r1"] == 100.0 and r["t2i_r1"] == pytest.approx(100 * 5 / 6)
    only = load_eval_set(str(tmp_path / "all"), DATA, kind="captions", max_samples=2)
    assert only["caption_image"].tolist() == [0, 0, 0, 1]


# ----------------------------------------------------------------------------- VQAv2


def _vqa(tmp_path, imgs):
    (imgs / "COCO_val2014_000000000001.jpg").write_bytes(_img(RED, "JPEG"))
    (imgs / "other_name_000000000002.jpg").write_bytes(_img(BLUE, "JPEG"))  # found by the id fallback
    qs = [
        (1, 101, "How many squares?"),
        (1, 102, "Is it blue?"),
        (2, 201, "Is it blue?"),
        (1, 103, "Is it red?"),
        (3, 301, "Where is it?"),
        (1, 104, "No annotation?"),
        (1, 105, "  "),
    ]
    answers = {
        101: ("2", ["2"] * 4 + ["two"] * 3 + ["3"] * 3),
        102: ("No.", ["Yes"] + ["no"] * 9),
        201: ("yes", ["yes"] * 10),
        103: ("no", [" No "] * 10),
        301: ("nowhere", ["nowhere"] * 10),
        105: ("x", ["x"] * 10),
    }
    questions = {
        "data_subtype": "val2014",
        "questions": [{"image_id": i, "question_id": q, "question": t} for i, q, t in qs],
    }
    anns = {
        "annotations": [
            {
                "question_id": q,
                "image_id": 0,
                "multiple_choice_answer": mca,
                "answer_type": "other",
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(ten)],
            }
            for q, (mca, ten) in answers.items()
        ]
    }
    return _write(tmp_path / "q.json", questions), _write(tmp_path / "a.json", anns)


def test_vqa_answer_normalisation_and_soft_scores():
    assert normalize_answer("  Yes. ") == "yes" and normalize_answer("Two  Dogs..") == "two dogs"
    assert answer_scores(["2"] * 4 + ["two"] * 3 + ["3"] * 3) == {"2": 1.0, "two": 1.0, "3": 1.0}
    assert answer_scores(["yes"] + ["no"] * 9) == pytest.approx({"yes": 1 / 3, "no": 1.0})


def test_vqav2_samples_scores_vocabulary_and_decoding(tmp_path, imgs):
    q, a = _vqa(tmp_path, imgs)
    out = tmp_path / "vqa"
    rep = ingest_vqav2(q, a, imgs, out, samples_per_shard=3)
    assert rep.written == 4
    assert rep.skipped == {"missing_image": 1, "missing_annotation": 1, "missing_question": 1}
    samples = _samples(out)
    assert [s["txt"].decode() for s in samples] == ["How many squares?", "Is it blue?", "Is it blue?", "Is it red?"]
    meta = [json.loads(s["json"]) for s in samples]
    assert [m["answer"] for m in meta] == ["2", "no", "yes", "no"]
    assert meta[0]["answer_scores"] == {"2": 1.0, "two": 1.0, "3": 1.0}
    assert meta[1]["answer_scores"] == pytest.approx({"yes": 1 / 3, "no": 1.0})
    assert meta[1]["answers"] == ["yes"] + ["no"] * 9 and meta[3]["answers"] == ["no"] * 10
    assert (meta[0]["question_id"], meta[0]["image_id"], meta[0]["split"]) == (101, 1, "val2014")
    assert meta[0]["source"] == "COCO_val2014_000000000001.jpg" and meta[2]["source"] == "other_name_000000000002.jpg"
    vocab = json.loads((out / "answers.json").read_text())
    assert vocab == ["no", "2", "yes"]  # by frequency, then alphabetical
    manifest = read_manifest(str(out))
    assert manifest.params["kind"] == "vqa" and manifest.params["answers"] == 3
    ev = load_eval_set(str(out), DATA, kind="vqa")
    assert ev["answer_id"].tolist() == [vocab.index(m["answer"]) for m in meta]

    rep = ingest_vqav2(q, a, imgs, tmp_path / "min2", min_answer_count=2, split="val")
    assert json.loads((tmp_path / "min2" / "answers.json").read_text()) == ["no"]
    assert {m["split"] for m in _meta(tmp_path / "min2")} == {"val"}
    ev = load_eval_set(str(tmp_path / "min2"), DATA, kind="vqa")
    assert ev["answer_id"].tolist() == [-100, 0, -100, 0]
    ingest_vqav2(q, a, imgs, tmp_path / "shared", vocabulary=out / "answers.json")
    assert json.loads((tmp_path / "shared" / "answers.json").read_text()) == vocab
    rep = ingest_vqav2(q, a, imgs, tmp_path / "named", image_name=lambda i: f"COCO_val2014_{i:012d}.jpg")
    assert rep.written == 4


class _Answers(torch.nn.Module):
    """Predicts a fixed answer index per row (the row's position in ``picks``)."""

    def __init__(self, picks: list[int], n_answers: int):
        super().__init__()
        self.picks, self.n_answers = picks, n_answers

    def forward(self, task, pixel_values, input_ids, attention_mask, pixel_values_2=None):
        logits = torch.zeros(len(input_ids), self.n_answers)  # [B, A]
        logits[torch.arange(len(input_ids)), torch.tensor(self.picks[: len(input_ids)])] = 1.0
        return SimpleNamespace(logits=logits)


def test_vqav2_soft_targets_feed_the_vqav2_metric_and_bce(tmp_path, imgs):
    q, a = _vqa(tmp_path, imgs)
    out = tmp_path / "vqa"
    ingest_vqav2(q, a, imgs, out)
    vocab = json.loads((out / "answers.json").read_text())  # ["no", "2", "yes", "two", "3"]
    ev = load_eval_set(str(out), DATA, kind="vqa")
    t = ev["answer_targets"]
    assert t.shape == (4, len(vocab)) and t.dtype == torch.float32
    # question 102: "yes" once, "no" nine times
    assert t[1, vocab.index("no")] == 1.0 and t[1, vocab.index("yes")] == pytest.approx(1 / 3)
    assert t[1].sum() == pytest.approx(4 / 3)
    # Predict "yes" for 102 (1/3), "2" for 101 (1), "no" for 201 (0) and for 103 (1): mean 7/12.
    picks = [vocab.index("2"), vocab.index("yes"), vocab.index("no"), vocab.index("no")]
    scored = accuracy(_Answers(picks, len(vocab)), "vqa", ev)
    assert scored["metric"] == "vqav2" and scored["n"] == 4
    assert scored["acc"] == pytest.approx(100 * (1 + 1 / 3 + 0 + 1) / 4)
    # every annotation names answer_type "other", so the breakdown has that one type, scored the same way
    assert ev["vqa_type"] == ["other"] * 4
    assert scored["by_type"] == {"other": {"acc": pytest.approx(scored["acc"]), "n": 4}}
    exact = accuracy(_Answers(picks, len(vocab)), "vqa", {k: v for k, v in ev.items() if k != "answer_targets"})
    assert exact["metric"] == "exact" and exact["acc"] == pytest.approx(100 * 2 / 4)  # 101 and 103 match answer_id

    # min_answer_count=2 drops rare answers from the vocabulary, and from the targets with them.
    ingest_vqav2(q, a, imgs, tmp_path / "min2", min_answer_count=2)
    small = load_eval_set(str(tmp_path / "min2"), DATA, kind="vqa")["answer_targets"]
    assert small.shape == (4, 1) and small[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0])


def test_answer_targets_without_scores_are_one_hot():
    index = {"no": 0, "yes": 1}
    t = answer_targets([{"yes": 1 / 3, "no": 1.0, "maybe": 1.0}, None, None], [0, 1, -100], index)
    assert t.ravel().tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1.0, 0.0, 0.0])


def test_fusion_finetune_uses_bce_and_the_vqa_score_on_soft_targets():
    from vlforge.objectives.distillation import multilabel_bce
    from vlforge.tasks.distill import FusionFinetuneTask

    class Head(torch.nn.Module):
        heads = {"vqa": 3}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]]))

        def forward(self, task, pixel_values, input_ids, attention_mask, pixel_values_2=None):
            return SimpleNamespace(logits=self.w)

    task = FusionFinetuneTask.__new__(FusionFinetuneTask)
    torch.nn.Module.__init__(task)
    task.model, task.task, task.weights = Head(), "vqa", {"hard": 1.0}
    targets = torch.tensor([[1 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch = {
        "pixel_values": None,
        "input_ids": None,
        "attention_mask": None,
        "answer_id": torch.tensor([1, 2]),
        "answer_targets": targets,
    }
    out = task(batch)
    assert out["hard"].item() == pytest.approx(multilabel_bce(task.model.w, targets).item())
    assert out["acc"].item() == pytest.approx((1 / 3 + 1.0) / 2)  # argmaxes 0 and 2
    out["loss"].backward()
    assert task.model.w.grad is not None


def test_vqav2_structure_errors(tmp_path, imgs):
    q, a = _vqa(tmp_path, imgs)
    with pytest.raises(IngestError, match="no 'questions' key"):
        ingest_vqav2(a, a, imgs, tmp_path / "o")
    with pytest.raises(IngestError, match="no 'annotations' key"):
        ingest_vqav2(q, q, imgs, tmp_path / "o")
    with pytest.raises(IngestError, match="image name pattern"):
        ingest_vqav2(q, a, imgs, tmp_path / "o", image_name="{nope}.jpg")


# ----------------------------------------------------------------------------- NLVR2


def _nlvr2(tmp_path, imgs):
    for name, color in (("dev-1-0-img0.png", RED), ("dev-1-0-img1.png", BLUE), ("x.png", BLUE)):
        (imgs / name).write_bytes(_img(color))
    (imgs / "7").mkdir()
    (imgs / "7" / "train-5-1-img0.png").write_bytes(_img(RED))
    (imgs / "7" / "train-5-1-img1.png").write_bytes(_img(BLUE, "JPEG"))
    rows = [
        {
            "identifier": "dev-1-0-0",
            "sentence": "The left image is red.",
            "label": "True",
            "left_url": "https://example.com/a.jpg",
            "right_url": "https://example.com/b.jpg",
        },
        {"identifier": "dev-1-0-1", "sentence": "Both images are red.", "label": "False"},
        {"identifier": "dev-2-0-0", "sentence": "Maybe.", "label": "maybe"},
        {"identifier": "dev-3-0-0", "sentence": "No images.", "label": "True"},
        {
            "identifier": "dev-4-0-0",
            "sentence": "Escapes.",
            "label": "True",
            "left": "../outside.png",
            "right": "x.png",
        },
        {"identifier": "dev-1-0-2", "sentence": "  ", "label": "True"},
        {"identifier": "train-5-1-0", "sentence": "From a train folder.", "label": True, "directory": 7},
        {"sentence": "Named files.", "label": "false", "left": "a.png", "right": "x.png"},
        {"sentence": "Downloaded.", "label": "true", "left_url": "http://h/p/a.png?x=1", "right_url": "http://h/x.png"},
    ]
    (tmp_path / "dev.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return tmp_path / "dev.json"


def test_nlvr2_pairs_labels_and_decoding(tmp_path, imgs):
    assert [parse_label(v) for v in ("True", "false", True, 0, "1", "maybe", 2, None)] == [
        True,
        False,
        True,
        False,
        True,
        None,
        None,
        None,
    ]
    out = tmp_path / "nlvr2"
    rep = ingest_nlvr2(_nlvr2(tmp_path, imgs), imgs, out)
    assert rep.written == 5
    assert rep.skipped == {"bad_label": 1, "missing_image": 1, "outside_folder": 1, "missing_sentence": 1}
    samples = _samples(out)
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples[1:3]] == [
        ["json", "png", "right.png", "txt"],
        ["json", "png", "right.jpg", "txt"],
    ]
    meta = [json.loads(s["json"]) for s in samples]
    assert [m["label"] for m in meta] == [True, False, True, False, True]
    assert [m["identifier"] for m in meta[:3]] == ["dev-1-0-0", "dev-1-0-1", "train-5-1-0"]
    assert [m["split"] for m in meta[:3]] == ["dev", "dev", "train"]
    assert (meta[0]["source"], meta[0]["source_right"]) == ("dev-1-0-img0.png", "dev-1-0-img1.png")
    assert (meta[4]["source"], meta[4]["source_right"]) == ("a.png", "x.png")
    assert samples[0]["txt"] == b"The left image is red."
    assert read_manifest(str(out)).params["kind"] == "nlvr2"
    ev = load_eval_set(str(out), DATA, kind="nlvr2")
    assert ev["label"].tolist() == [1, 0, 1, 0, 1]
    left, right = ev["pixel_values"][0], ev["pixel_values_2"][0]
    assert left[0].mean() > left[2].mean() and right[2].mean() > right[0].mean()  # red left, blue right


# ----------------------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["data", "ingest", *map(str, argv)])
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_cli_formats(tmp_path, imgs, capsys):
    rc, out, _ = _cli(capsys, imgs, _coco(tmp_path), "--format", "coco", "--out", tmp_path / "c")
    assert rc == 0 and "wrote 3 samples in 1 shard(s)" in out and "skipped 5" in out and "missing_image: " in out
    rc, out, _ = _cli(
        capsys, imgs, _karpathy(tmp_path, imgs), "--format", "karpathy", "--split", "test", "--out", tmp_path / "k"
    )
    assert rc == 0 and "wrote 1 samples" in out
    q, a = _vqa(tmp_path, imgs)
    rc, out, _ = _cli(
        capsys, imgs, q, "--format", "vqav2", "--annotations", a, "--min-answer-count", "2", "--out", tmp_path / "v"
    )
    assert rc == 0 and "wrote 4 samples" in out and "answers.json: 1 answers" in out
    assert json.loads((tmp_path / "v" / "answers.json").read_text()) == ["no"]
    rc, out, _ = _cli(capsys, imgs, _nlvr2(tmp_path, imgs), "--format", "nlvr2", "--out", tmp_path / "n")
    assert rc == 0 and "wrote 5 samples" in out
    assert load_eval_set(str(tmp_path / "n"), DATA)["label"].tolist() == [1, 0, 1, 0, 1]


def test_cli_folder_default_unchanged(tmp_path, imgs, capsys):
    (tmp_path / "caps.csv").write_text("file,caption\na.png,a red square\nmissing.png,gone\n")
    rc, out, _ = _cli(capsys, imgs, tmp_path / "caps.csv", "--out", tmp_path / "f")
    assert rc == 0 and "wrote 1 samples" in out and "missing_image" in out
    assert _meta(tmp_path / "f") == [{"split": "train", "source": "a.png"}]
    assert read_manifest(str(tmp_path / "f")).params["source"] == "caps.csv"


def test_cli_errors(tmp_path, imgs, capsys):
    q, a = _vqa(tmp_path, imgs)
    rc, _, err = _cli(capsys, imgs, q, "--format", "vqav2", "--out", tmp_path / "o")
    assert rc == 2 and "--format vqav2 needs --annotations" in err
    rc, _, err = _cli(capsys, imgs, tmp_path / "nope.json", "--format", "coco", "--out", tmp_path / "o")
    assert rc == 2 and "nope.json does not exist" in err
    rc, _, err = _cli(
        capsys, imgs, _write(tmp_path / "k.json", {"imgs": []}), "--format", "karpathy", "--out", tmp_path / "o"
    )
    assert rc == 2 and "no 'images' key" in err
    rc, _, err = _cli(capsys, imgs, q, "--format", "vqav2", "--annotations", q, "--out", tmp_path / "o")
    assert rc == 2 and "no 'annotations' key" in err
    rc, _, err = _cli(capsys, imgs, _coco(tmp_path), "--format", "coco", "--image-col", "x", "--out", tmp_path / "o")
    assert rc == 2 and "--image-col does not apply to --format coco" in err
    rc, _, err = _cli(capsys, imgs, _coco(tmp_path), "--format", "coco", "--annotations", a, "--out", tmp_path / "o")
    assert rc == 2 and "--annotations does not apply" in err
    rc, _, err = _cli(capsys, tmp_path / "noimgs", _coco(tmp_path), "--format", "coco", "--out", tmp_path / "o")
    assert rc == 2 and "is not a directory" in err
    with pytest.raises(SystemExit):
        main(["data", "ingest", str(imgs), q, "--format", "tsv", "--out", str(tmp_path / "o")])
