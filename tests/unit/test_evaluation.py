"""Unit tests for vlforge.evaluation: Recall@K, teacher/student scoring, accuracy, eval sets, latency, reports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlforge.config import DataConfig, ImageConfig
from vlforge.evaluation import (
    RERANK_OFFSET,
    accuracy,
    caption_positives,
    evaluate_retrieval,
    format_table,
    growth,
    latency_table,
    load_eval_set,
    mean_std,
    plot_latency,
    plot_results,
    recall_at_k,
    student_scores,
    teacher_scores,
    type_columns,
    type_table,
)
from vlforge.evaluation.classification import by_group
from vlforge.models.distill import PairOutput
from vlforge.models.io import build_from_spec

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_inputs(n: int = 5, t: int = 8, img: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, 30522, (n, t), generator=g)
    lengths = torch.tensor([t - (i % 3) for i in range(n)])
    am = (torch.arange(t)[None] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    ids[am == 0] = 0
    return torch.randn(n, 3, img, img, generator=g), ids, am


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return build_from_spec({"model": "vlmo_debug", "method": "fusion"}).eval()


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(1)
    return build_from_spec({"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}).eval()


# ----------------------------------------------------------------------------- recall


def test_recall_perfect_and_keys():
    out = recall_at_k(torch.eye(4), torch.eye(4, dtype=torch.bool))
    assert list(out) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rmean"]
    assert all(v == 100.0 for v in out.values())


def test_recall_second_best_positive():
    scores = torch.tensor([[0.8, 0.9, 0.1], [0.2, 0.7, 0.3], [0.1, 0.2, 0.6]])
    pos = torch.eye(3, dtype=torch.bool)
    out = recall_at_k(scores, pos, ks=(1, 2))
    # image 0 ranks its own text second (0.9 > 0.8); the others rank theirs first.
    assert out["i2t_r1"] == pytest.approx(200 / 3)
    assert out["i2t_r2"] == 100.0
    # text 1: column [0.9, 0.7, 0.2] ranks image 1 second.
    assert out["t2i_r1"] == pytest.approx(200 / 3)
    assert out["t2i_r2"] == 100.0
    assert out["rmean"] == pytest.approx((200 / 3 * 2 + 200) / 4)


def test_recall_ties_count_against_the_query():
    out = recall_at_k(torch.zeros(3, 3), torch.eye(3, dtype=torch.bool), ks=(1, 3))
    assert out["i2t_r1"] == 0.0 and out["t2i_r1"] == 0.0
    assert out["i2t_r3"] == 100.0


def test_caption_positives_and_duplicate_captions():
    ids = torch.tensor([[101, 5, 6, 102], [101, 7, 102, 0], [101, 5, 6, 102], [101, 8, 102, 0]])
    pos = caption_positives(ids)
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True
    assert torch.equal(pos, expected)
    # Image 0's best text is text 2, the same caption: a hit. Image 2 prefers text 1: a miss.
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.0, 0.9, 0.1, 0.2], [0.3, 0.8, 0.4, 0.0], [0.0, 0.1, 0.2, 0.7]])
    out = recall_at_k(scores, pos, ks=(1, 2))
    assert out["i2t_r1"] == 75.0
    assert out["i2t_r2"] == 100.0
    # Text 2 (column [0.9, 0.1, 0.4, 0.2]) ranks image 0 first, which is a positive.
    assert recall_at_k(scores, torch.eye(4, dtype=torch.bool), ks=(1,))["t2i_r1"] < out["t2i_r1"]


# ----------------------------------------------------------------------------- scoring


def test_student_scores_match_direct_computation(student):
    pv, ids, am = make_inputs(5)
    got = student_scores(student, pv, ids, am, batch_size=2)
    with torch.no_grad():
        want = student.retrieval_scores(*student.encode(pv, ids, am))
    assert got.shape == (5, 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _full_itm(teacher: nn.Module, pv: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    n = len(ids)
    ii, tt = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    with torch.no_grad():
        logits = teacher("itm", pv[ii], ids[tt], am[tt]).logits
    return logits.softmax(-1)[:, 1].view(n, n)  # [Ni, Nt]


def test_teacher_scores_full_rerank_equals_itm_order(teacher):
    pv, ids, am = make_inputs(5)
    full = _full_itm(teacher, pv, ids, am)
    got = teacher_scores(teacher, pv, ids, am, rerank_k=5, batch_size=3)
    torch.testing.assert_close(got - RERANK_OFFSET, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argsort(dim=1), full.argsort(dim=1))
    assert torch.equal(got.argsort(dim=0), full.argsort(dim=0))
    bare = teacher_scores(teacher.encoder, pv, ids, am, rerank_k=99)
    torch.testing.assert_close(bare, got, rtol=1e-5, atol=1e-5)


def test_teacher_scores_rerank_shortlist(teacher):
    pv, ids, am = make_inputs(6)
    itc = teacher_scores(teacher, pv, ids, am, rerank_k=0)
    assert itc.abs().max() <= 1.0 + 1e-5
    got = teacher_scores(teacher, pv, ids, am, rerank_k=2)
    rescored = got >= RERANK_OFFSET
    shortlist = torch.zeros(6, 6, dtype=torch.bool)
    shortlist.scatter_(1, itc.topk(2, dim=1).indices, True)
    shortlist.scatter_(0, itc.topk(2, dim=0).indices, True)
    assert torch.equal(rescored, shortlist)
    torch.testing.assert_close(got[~shortlist], itc[~shortlist])
    torch.testing.assert_close(
        got[shortlist] - RERANK_OFFSET, _full_itm(teacher, pv, ids, am)[shortlist], rtol=1e-5, atol=1e-5
    )


def test_evaluate_retrieval_both_kinds(teacher, student):
    pv, ids, am = make_inputs(6)
    ids[3] = ids[1]
    am[3] = am[1]
    ev = {"pixel_values": pv, "input_ids": ids, "attention_mask": am}
    teacher.train()
    for model, kind in ((teacher, "teacher"), (student, "student")):
        out = evaluate_retrieval(model, ev, kind, rerank_k=2)
        assert out["n_images"] == out["n_texts"] == 6
        assert all(0.0 <= out[k] <= 100.0 for k in out if k.startswith(("i2t", "t2i", "rmean")))
        assert out["i2t_r10"] == 100.0
    assert teacher.training  # the training flag is restored
    teacher.eval()
    with pytest.raises(ValueError, match="kind"):
        evaluate_retrieval(student, ev, "fusion")


# ----------------------------------------------------------------------------- accuracy


class FakePairModel(nn.Module):
    """Returns preset logits for the samples whose index is stored in pixel_values[:, 0, 0, 0]."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.calls: list[tuple[str, int]] = []

    def forward(self, task, pixel_values, input_ids, attention_mask, pixel_values_2=None) -> PairOutput:
        assert not self.training and not torch.is_grad_enabled()
        if task == "nlvr2":
            assert pixel_values_2 is not None and pixel_values_2.shape == pixel_values.shape
        self.calls.append((task, len(pixel_values)))
        return PairOutput(self.table[pixel_values[:, 0, 0, 0].long()], [])


def _indexed_set(n: int) -> dict[str, torch.Tensor]:
    pv = torch.zeros(n, 3, 4, 4)
    pv[:, 0, 0, 0] = torch.arange(n).float()
    return {
        "pixel_values": pv,
        "pixel_values_2": pv.clone(),
        "input_ids": torch.ones(n, 3, dtype=torch.long),
        "attention_mask": torch.ones(n, 3, dtype=torch.long),
    }


def test_accuracy_nlvr2():
    preds = torch.tensor([0, 1, 0, 0, 1])
    model = FakePairModel(nn.functional.one_hot(preds, 2).float())
    ev = {**_indexed_set(5), "label": torch.tensor([0, 1, 1, 0, 1])}
    assert accuracy(model, "nlvr2", ev, batch_size=2) == {"acc": 80.0, "n": 5, "metric": "exact"}
    assert model.calls == [("nlvr2", 2), ("nlvr2", 2), ("nlvr2", 1)]
    del ev["pixel_values_2"]
    with pytest.raises(KeyError, match="pixel_values_2"):
        accuracy(model, "nlvr2", ev)


def test_accuracy_vqa_counts_unknown_answers_wrong():
    preds = torch.tensor([3, 1, 0, 2])
    model = FakePairModel(nn.functional.one_hot(preds, 4).float())
    ev = {**_indexed_set(4), "answer_id": torch.tensor([3, 1, -100, 0])}
    assert accuracy(model, "vqa", ev, batch_size=3) == {"acc": 50.0, "n": 4, "metric": "exact"}
    with pytest.raises(ValueError, match="task"):
        accuracy(model, "itm", ev)


def test_accuracy_vqa_by_question_type():
    preds = torch.tensor([3, 1, 0, 2, 2, 1])
    model = FakePairModel(nn.functional.one_hot(preds, 4).float())
    ev = {
        **_indexed_set(6),
        "answer_id": torch.tensor([3, 1, 1, 2, 0, 1]),
        "vqa_type": ["color", "count", "color", "color", "", "count"],
    }
    scored = accuracy(model, "vqa", ev, batch_size=4)
    assert scored["acc"] == pytest.approx(100 * 4 / 6) and scored["n"] == 6
    # color: samples 0 (right), 2 (wrong), 3 (right); count: 1 and 5 (both right); sample 4 names no type
    assert scored["by_type"] == {"color": {"acc": pytest.approx(200 / 3), "n": 3}, "count": {"acc": 100.0, "n": 2}}
    assert type_columns(scored) == {
        "vqa_acc.color": pytest.approx(200 / 3),
        "vqa_n.color": 3,
        "vqa_acc.count": 100.0,
        "vqa_n.count": 2,
    }
    assert "by_type" not in accuracy(model, "vqa", {k: v for k, v in ev.items() if k != "vqa_type"})
    with pytest.raises(ValueError, match="6 scores but 5 groups"):
        by_group([1.0] * 6, ev["vqa_type"][:5])


def test_type_table_has_one_column_per_type_with_intervals():
    rows = [
        {"model": "teacher", "split": "test", "vqa_acc": 50.0, "vqa_acc.color": 90.0, "vqa_n.color": 100},
        {"model": "teacher", "split": "val", "vqa_acc.count": 50.0, "vqa_n.count": 100},
    ]
    lines = type_table(rows).splitlines()
    assert lines[0] == "VQA accuracy by question type (percent)"
    assert lines[1].split() == ["model", "split", "vqa_acc.color", "vqa_acc.count"]
    # Wilson at 90 % of 100: half = 1.96 sqrt(0.0009 + 0.000096) / 1.038416 = 0.0596
    assert lines[3].split() == ["teacher", "test", "90.0", "±6.0", "-"]
    assert lines[4].split() == ["teacher", "val", "-", "50.0", "±9.6"]
    assert lines[-1] == "n per type: test color 100; val count 100"
    assert type_table([{"model": "student", "vqa_acc": 40.0}]) == ""


# ----------------------------------------------------------------------------- eval sets


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize(
    "set_dir, kind, extra",
    [
        ("scenes", "captions", set()),
        ("vqa", "vqa", {"answer_id", "vqa_type"}),
        ("nlvr2", "nlvr2", {"pixel_values_2", "label", "image_truth"}),
    ],
)
def test_load_eval_set(corpus, set_dir, kind, extra):
    data = DataConfig(image=ImageConfig(size=32), decode_batch_size=8)
    uri = str(corpus / set_dir / "val")
    full = load_eval_set(uri, data)
    assert set(full) == {"pixel_values", "input_ids", "attention_mask", "sample_id"} | extra
    n = len(full["input_ids"])
    assert n > 10
    assert full["pixel_values"].shape == (n, 3, 32, 32) and full["pixel_values"].dtype == torch.float32
    assert full["input_ids"].shape == (n, data.tokenizer.max_length)
    assert len(set(full["sample_id"].tolist())) == n
    again = load_eval_set(uri, data, kind=kind)
    assert all(_same(full[k], again[k]) for k in full)
    head = load_eval_set(uri, data, max_samples=10)
    assert all(_same(head[k], full[k][:10]) for k in full)
    if kind == "vqa":
        assert (full["answer_id"] >= 0).all()
        # each question's type from its metadata, in sample order
        assert len(full["vqa_type"]) == n and set(full["vqa_type"]) == {"relation", "color", "count", "exists"}
    if kind == "nlvr2":
        assert set(full["label"].tolist()) <= {0, 1}
        assert full["pixel_values_2"].shape == full["pixel_values"].shape
        # uint8 decoding (normalize off) ends as the same normalised floats.
        raw = load_eval_set(uri, DataConfig(image=ImageConfig(size=32, normalize=False)), max_samples=4)
        assert raw["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(raw["pixel_values_2"], full["pixel_values_2"][:4])


# ----------------------------------------------------------------------------- latency


def test_latency_table_structure(teacher, student):
    pv, ids, am = make_inputs(3)
    rows = latency_table(teacher, student, pv, ids, am, ns=(4, 8), max_teacher_pairs=20, batch_size=16)
    assert [r["n"] for r in rows] == [4, 8]
    keys = {
        "n",
        "teacher_s",
        "teacher_extrapolated",
        "teacher_pairs_timed",
        "student_s",
        "student_cached_s",
        "speedup",
        "speedup_cached",
    }
    for r in rows:
        assert set(r) == keys
        assert all(r[k] > 0 for k in ("teacher_s", "student_s", "student_cached_s", "speedup", "speedup_cached"))
        assert r["speedup"] == pytest.approx(r["teacher_s"] / r["student_s"])
    assert rows[0]["teacher_extrapolated"] is False and rows[0]["teacher_pairs_timed"] == 16
    assert rows[1]["teacher_extrapolated"] is True and rows[1]["teacher_pairs_timed"] == 24  # 3 full rows of 8
    assert math.isfinite(growth(rows, "teacher_s"))


def test_growth_on_synthetic_rows():
    rows = [{"n": 100, "t": 3.0}, {"n": 10, "t": 0.03}, {"n": 30, "t": 99.0}]
    assert growth(rows, "t") == pytest.approx(2.0)
    assert growth([{"n": 10, "t": 1.0}, {"n": 1000, "t": 100.0}], "t") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        growth([{"n": 10, "t": 1.0}], "t")


# ----------------------------------------------------------------------------- reports


def test_format_table():
    rows = [
        {"model": "teacher", "i2t_r1": 85.25, "speedup": 1.0, "lat": 0.01234, "n": 300, "ok": True},
        {"model": "student", "i2t_r1": 7.0, "lat": None, "n": 300, "ok": False},
    ]
    text = format_table(rows, ["model", "i2t_r1", "speedup", "lat", "n", "ok"], title="results")
    lines = text.splitlines()
    assert lines[0] == "results"
    assert lines[1].split() == ["model", "i2t_r1", "speedup", "lat", "n", "ok"]
    assert set(lines[2]) <= {"-", " "}
    assert lines[3].split() == ["teacher", "85.2", "1.000", "0.012", "300", "yes"]
    assert lines[4].split() == ["student", "7.0", "-", "-", "300", "no"]
    assert len({len(line) for line in lines[1:4]}) == 1  # fixed width


def test_plots_write_pngs(tmp_path):
    rows = [{"model": "teacher", "i2t_r1": 80.0, "acc": 70.0}, {"model": "student", "i2t_r1": 60.0}]
    p = plot_results(rows, ["i2t_r1", "acc"], tmp_path / "sub" / "results.png")
    assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 1000
    lat = [
        {"n": 10, "teacher_s": 0.1, "teacher_extrapolated": False, "student_s": 0.01, "student_cached_s": 0.005},
        {"n": 100, "teacher_s": 10.0, "teacher_extrapolated": True, "student_s": 0.1, "student_cached_s": 0.05},
    ]
    q = plot_latency(lat, tmp_path / "latency.png")
    assert q.read_bytes().startswith(PNG_MAGIC) and q.stat().st_size > 1000


def test_mean_std():
    assert mean_std([2.0, 4.0]) == pytest.approx((3.0, math.sqrt(2.0)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


# ----------------------------------------------------------------------------- intervals and `vlforge eval`


def test_wilson_interval_matches_hand_computation():
    from vlforge.evaluation import wilson_interval

    lo, hi = wilson_interval(50.0, 100)  # centre 0.5; half = 1.96 sqrt(0.0025 + 0.000096) / 1.038416
    assert lo == pytest.approx(40.383, abs=1e-3) and hi == pytest.approx(59.617, abs=1e-3)
    lo, hi = wilson_interval(0.0, 1000)
    assert lo == 0.0 and hi == pytest.approx(0.383, abs=1e-3)  # never a negative bound
    with pytest.raises(ValueError):
        wilson_interval(10.0, 0)


def test_with_intervals_formats_only_counted_metrics():
    from vlforge.evaluation import with_intervals

    rows = with_intervals([{"acc": 50.0, "n": 100, "other": 3.0}, {"acc": 40.0}], {"acc": "n"})
    assert rows[0]["acc"] == "50.0 ±9.6" and rows[0]["other"] == 3.0
    assert rows[1]["acc"] == 40.0  # no count, no interval


def test_vlforge_eval_scores_a_model_directory(corpus, tmp_path, capsys):
    import json

    from vlforge.cli import main
    from vlforge.models import create_model
    from vlforge.models.io import save_model_dir

    torch.manual_seed(0)
    model = create_model("vlmo_debug")
    d = save_model_dir(model.state_dict(), {"model": "vlmo_debug", "overrides": {}, "method": "vlmo"}, tmp_path / "m")
    out = tmp_path / "row.json"
    assert main(["eval", str(d), str(corpus / "scenes" / "test"), "--max-samples", "20", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["task"] == "captions" and row["n_texts"] == 20 and 0.0 <= row["t2i_r1"] <= 100.0
    assert "±" in capsys.readouterr().out
    # a bare VLMo has no true/false head: a clear error, exit 2
    assert main(["eval", str(d), str(corpus / "nlvr2" / "test"), "--max-samples", "5"]) == 2
    assert "no nlvr2 head" in capsys.readouterr().err


def test_vlforge_eval_breaks_vqa_down_by_question_type(corpus, tmp_path, capsys):
    import json

    from vlforge.cli import main
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(0)
    n_answers = len(json.loads((corpus / "answers.json").read_text()))
    spec = {"model": "vlmo_debug", "overrides": {}, "method": "fusion", "num_answers": n_answers}
    d = save_model_dir(build_from_spec(spec).state_dict(), spec, tmp_path / "m")
    out = tmp_path / "row.json"
    argv = ["eval", str(d), str(corpus / "vqa" / "test"), "--max-samples", "30", "--json", str(out), "--no-save"]
    assert main(argv) == 0
    row = json.loads(out.read_text())
    kinds = {k.removeprefix("vqa_n.") for k in row if k.startswith("vqa_n.")}
    assert kinds and kinds <= {"relation", "color", "count", "exists"}
    assert sum(row[f"vqa_n.{k}"] for k in kinds) == row["vqa_n"] == 30
    # the overall accuracy is the count-weighted mean of the per-type ones
    assert row["vqa_acc"] == pytest.approx(sum(row[f"vqa_acc.{k}"] * row[f"vqa_n.{k}"] for k in kinds) / 30)
    printed = capsys.readouterr().out
    assert "VQA accuracy by question type" in printed and "n per type: " in printed
