"""Generation metrics (``vlforge.evaluation.generation``) against hand-computed values, few-shot
episodes (shots only from the pool, never the evaluated set) and object naming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import scene_set
from vlforge.evaluation.generation import (
    caption_metrics,
    few_shot_episodes,
    java_available,
    objects_named,
    plain_tokenize,
    vqa_accuracy,
)

pytestmark = pytest.mark.unit

REFS = {"a": ["a cat sat on the mat"], "b": ["a red taxi left of a llama"], "c": ["two dogs"]}
CANDS = {"a": "a cat on a mat", "b": "a red taxi left of a llama", "c": "a dog"}


def _rouge_l(cand: str, ref: str, beta: float = 1.2) -> float:
    c, r = cand.split(), ref.split()
    table = [[0] * (len(r) + 1) for _ in range(len(c) + 1)]
    for i in range(len(c)):
        for j in range(len(r)):
            table[i + 1][j + 1] = table[i][j] + 1 if c[i] == r[j] else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if not lcs:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return (1 + beta**2) * p * rec / (rec + beta**2 * p)


def test_caption_metrics_match_hand_computed_rouge_and_bleu():
    out = caption_metrics(REFS, CANDS, java=False)
    assert out["tokenizer"].startswith("plain") and out["n"] == 3 and "meteor" not in out
    # "a cat on a mat" vs "a cat sat on the mat": LCS "a cat on mat" = 4 of 5 and 6 words.
    expected = (_rouge_l(CANDS["a"], REFS["a"][0]) + 1.0 + _rouge_l(CANDS["c"], REFS["c"][0])) / 3
    assert out["rouge_l"] == pytest.approx(100 * expected, abs=1e-6)
    # Corpus BLEU-4: clipped n-gram matches 11/14, 7/11, 5/8, 4/6 over the three captions; the hypotheses
    # have 14 words and the references 15, so the brevity penalty is exp(1 - 15/14).
    import math

    precisions = [11 / 14, 7 / 11, 5 / 8, 4 / 6]
    bleu4 = math.exp(1 - 15 / 14) * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert out["bleu4"] == pytest.approx(100 * bleu4, rel=1e-4)
    assert out["cider"] > 0


def test_identical_captions_score_the_maximum():
    refs = {k: [v[0]] for k, v in REFS.items()}
    out = caption_metrics(refs, {k: v[0] for k, v in refs.items()}, java=False)
    assert out["rouge_l"] == pytest.approx(100.0)
    assert out["bleu4"] == pytest.approx(100.0, rel=1e-6)
    worse = caption_metrics(refs, {"a": "", "b": "a llama", "c": "two dogs"}, java=False)  # an empty caption scores
    assert worse["cider"] < out["cider"] and worse["bleu4"] < out["bleu4"]


@pytest.mark.skipif(not java_available(), reason="needs Java (pycocoevalcap's PTB tokenizer and METEOR)")
def test_with_java_the_ptb_tokenizer_and_meteor_run():
    out = caption_metrics({"a": ["A cat sat on the mat."]}, {"a": "a cat sat on the mat"}, java=True)
    assert out["tokenizer"] == "ptb" and out["rouge_l"] == pytest.approx(100.0)  # PTB drops the case and period
    assert 0 < out["meteor"] <= 100


def test_caption_metric_errors():
    with pytest.raises(ValueError, match="no candidate"):
        caption_metrics(REFS, {}, java=False)
    with pytest.raises(KeyError, match="without references"):
        caption_metrics(REFS, {"zzz": "x"}, java=False)


def test_vqa_accuracy_exact_and_vqav2():
    assert vqa_accuracy(["Yes.", "2", "no"], [["yes"], ["two"], ["no"]]) == {
        "acc": pytest.approx(200 / 3),
        "n": 3,
        "metric": "exact match",
    }
    ten = ["no"] * 8 + ["yes"] * 2
    out = vqa_accuracy(["yes", "no"], [ten, ten])
    assert out["acc"] == pytest.approx(100 * (2 / 3 + 1) / 2) and out["metric"].startswith("vqav2")
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa_accuracy(["a", "b"], [["a"]])


def test_few_shot_episodes_come_from_the_pool_only_and_repeat():
    pool = [f"train-{i}" for i in range(10)]
    evals = ["test-0", "test-1", "test-2"]
    eps = few_shot_episodes(evals, pool, shots=4, seed=3)
    assert len(eps) == 3 and all(len(e) == 4 and len(set(e)) == 4 and set(e) <= set(pool) for e in eps)
    assert eps == few_shot_episodes(evals, pool, shots=4, seed=3)
    assert eps != few_shot_episodes(evals, pool, shots=4, seed=4)
    assert few_shot_episodes(evals, pool, shots=0) == [[], [], []]
    with pytest.raises(ValueError, match="in the evaluated set"):
        few_shot_episodes(evals, [*pool, "test-1"], shots=1)
    with pytest.raises(ValueError, match="at least"):
        few_shot_episodes(evals, pool[:2], shots=4)


def test_objects_named_needs_exactly_the_scenes_objects():
    vocab = ["llama", "taxi", "red car", "car", "cat"]
    assert objects_named("A llama, left of a taxi.", ["llama", "taxi"], vocab)
    assert not objects_named("a llama left of a cat", ["llama", "taxi"], vocab)
    assert not objects_named("a llama", ["llama", "taxi"], vocab)
    assert objects_named("the red car above a cat", ["red car", "cat"], vocab)  # "car" inside "red car" not counted
    assert plain_tokenize("Hello,  World!") == "hello world"


def _scene_set(tmp_path):
    scenes = [
        ("a llama left of a taxi", ["llama", "taxi"]),
        ("a cat above a dog", ["cat", "dog"]),
        ("a taxi below a cat", ["taxi", "cat"]),
    ]
    return scene_set(tmp_path / "scenes" / "test", scenes), scenes


class _Captioner(torch.nn.Module):
    """Returns fixed captions in sample order (the set is smaller than one generation batch)."""

    def __init__(self, captions):
        super().__init__()
        self.captions = captions

    def generate(self, pixel_values, max_new_tokens=20):
        return self.captions[: len(pixel_values)]


def test_score_captioner_scores_references_and_objects(tmp_path):
    from vlforge.config import DataConfig, ImageConfig
    from vlforge.evaluation.generation import score_captioner

    shards, scenes = _scene_set(tmp_path)
    data = DataConfig(image=ImageConfig(size=32, augment=False))
    perfect = score_captioner(_Captioner([t for t, _ in scenes]), str(shards), data, java=False, examples=2)
    assert perfect["rouge_l"] == pytest.approx(100.0) and perfect["objects_named"] == pytest.approx(100.0)
    assert perfect["objects_n"] == 3 and perfect["n"] == 3
    assert perfect["examples"][0]["caption"] == scenes[0][0] and perfect["examples"][0]["references"] == [scenes[0][0]]
    wrong = ["a llama left of a cat", "a cat above a dog", "a taxi"]  # only the second names its objects
    out = score_captioner(_Captioner(wrong), str(shards), data, java=False)
    assert out["objects_named"] == pytest.approx(100 / 3) and out["rouge_l"] < 100
    # 6 scene objects; named: llama (+ cat, not there), cat and dog, taxi: 4 of 6 found, 4 of 5 right
    assert out["objects_total"] == 6
    assert out["objects_recall"] == pytest.approx(400 / 6) and out["objects_precision"] == pytest.approx(80.0)
    assert perfect["objects_recall"] == pytest.approx(100.0) and perfect["objects_precision"] == pytest.approx(100.0)


def test_vlforge_eval_on_a_caption_model_directory(tmp_path, capsys):
    import json

    from vlforge.cli import main
    from vlforge.models.io import build_from_spec, save_model_dir

    shards, _ = _scene_set(tmp_path)
    spec = {"model": "frozen_debug", "method": "frozen", "overrides": {}}
    torch.manual_seed(0)
    model_dir = save_model_dir(build_from_spec(spec).state_dict(), spec, tmp_path / "frozen")
    report = tmp_path / "row.json"
    assert main(["eval", str(model_dir), str(shards), "--json", str(report), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "bleu4" in out and "objects_named" in out and "captions tokenised with" in out
    row = json.loads(report.read_text())
    assert row["task"] == "captioning" and row["n"] == 3 and 0.0 <= row["cider"]
    beside = tmp_path / "eval" / "scenes-test"  # written beside the model directory by default
    saved = json.loads((beside / "eval.json").read_text())
    assert saved["cider"] == row["cider"] and len(saved["examples"]) == 3 and "image" not in saved["examples"][0]
    assert "bleu4" in (beside / "table.txt").read_text()
    from PIL import Image

    with Image.open(beside / "examples.png") as im:
        assert im.size[0] >= 600 and im.size[1] >= 200
    out_dir = tmp_path / "beam"
    assert main(["eval", str(model_dir), str(shards), "--beams", "2", "--out", str(out_dir), "--examples", "0"]) == 0
    assert json.loads((out_dir / "eval.json").read_text())["beams"] == 2 and not (out_dir / "examples.png").exists()


def _vqa_sets(tmp_path):
    import io
    import json

    from PIL import Image

    from vlforge.data.shards import ShardWriter

    def write(split, rows):
        out = tmp_path / "vqa" / split
        with ShardWriter(out, samples_per_shard=3, params={"kind": "vqa"}) as w:
            for i, (q, a) in enumerate(rows):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (30 * i, 90, 160)).save(buf, format="PNG")
                w.write(f"{split}{i:04d}", image=buf.getvalue(), image_ext="png", text=q, meta={"answer": a})
        return out

    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "answers.json").write_text(json.dumps(["yes", "no", "2", "llama"]))
    pool = write("train", [(f"how many? {i}", "2") for i in range(6)])
    test = write("test", [("is it a llama?", "yes"), ("what is it?", "llama"), ("how many cats?", "2")])
    return test, pool


class _PromptModel(torch.nn.Module):
    """Records each prompt; answers "yes" when the prompt's last text asks about a llama, else "2."."""

    def __init__(self):
        super().__init__()
        self.prompts = []

    def generate_from_prompt(self, items, max_new_tokens=20):
        self.prompts.append(items)
        return " yes\nQ: next" if "llama" in items[-1] else " 2. and more"


def test_few_shot_vqa_prompts_interleave_train_shots_and_blind_drops_images(tmp_path):
    from vlforge.config import DataConfig, ImageConfig
    from vlforge.evaluation.generation import first_answer, score_few_shot_vqa, vqa_prompt

    test, pool = _vqa_sets(tmp_path)
    data = DataConfig(image=ImageConfig(size=32, augment=False))
    model = _PromptModel()
    out = score_few_shot_vqa(model, str(test), str(pool), data, shots=2, seed=1)
    assert out["n"] == 3 and out["shots"] == 2 and out["acc"] == pytest.approx(100 * 2 / 3)  # "what is it?" -> "2"
    for items in model.prompts:
        kinds = ["image" if isinstance(x, torch.Tensor) else "text" for x in items]
        assert kinds == ["image", "text"] * 3  # two shots, then the query image and its open question
        assert all(t.startswith("Q: how many? ") and t.endswith("A: 2") for t in items[1:4:2])  # from train
        assert items[-1].endswith("A:")
    blind = _PromptModel()
    out = score_few_shot_vqa(blind, str(test), str(pool), data, shots=1, blind=True)
    assert out["blind"] is True and all(not any(isinstance(x, torch.Tensor) for x in p) for p in blind.prompts)
    zero = _PromptModel()
    score_few_shot_vqa(zero, str(test), str(pool), data, shots=0)
    assert all(len(p) == 2 for p in zero.prompts)
    assert vqa_prompt("Is it red? ", "no") == "Q: Is it red? A: no"
    assert first_answer(" yes\nQ: more") == "yes" and first_answer("two dogs. Q: x") == "two dogs"
    with pytest.raises(ValueError, match="in the evaluated set"):
        score_few_shot_vqa(_PromptModel(), str(test), str(test), data, shots=1)


def test_few_shot_vqa_runs_on_a_real_frozen_model(tmp_path):
    from vlforge.config import DataConfig, ImageConfig
    from vlforge.evaluation.generation import score_few_shot_vqa
    from vlforge.models import create_model

    test, pool = _vqa_sets(tmp_path)
    torch.manual_seed(0)
    model = create_model("frozen_debug")
    out = score_few_shot_vqa(
        model, str(test), str(pool), DataConfig(image=ImageConfig(size=32, augment=False)), shots=1, max_new_tokens=3
    )
    assert out["n"] == 3 and 0.0 <= out["acc"] <= 100.0 and len(out["examples"]) == 3


def test_vlforge_eval_few_shot_vqa_on_a_frozen_model_directory(tmp_path, capsys):
    import json

    from vlforge.cli import main
    from vlforge.models.io import build_from_spec, save_model_dir

    test, pool = _vqa_sets(tmp_path)
    spec = {"model": "frozen_debug", "method": "frozen", "overrides": {}}
    torch.manual_seed(0)
    model_dir = save_model_dir(build_from_spec(spec).state_dict(), spec, tmp_path / "frozen")
    report = tmp_path / "row.json"
    assert main(["eval", str(model_dir), str(test), "--shots", "2", "--blind", "--json", str(report)]) == 0
    row = json.loads(report.read_text())
    assert row["task"] == "few-shot vqa" and row["shots"] == 2 and row["blind"] is True
    assert row["pool"] == str(pool) and row["vqa_n"] == 3
    assert "vqa_acc" in capsys.readouterr().out
    vcgpt = {"model": "vcgpt_debug", "method": "vcgpt", "overrides": {}}
    other = save_model_dir(build_from_spec(vcgpt).state_dict(), vcgpt, tmp_path / "vcgpt")
    assert main(["eval", str(other), str(test), "--shots", "1"]) == 2
    assert "interleaved prompts" in capsys.readouterr().err


def test_display_images_undo_normalisation():
    from vlforge.config import ImageConfig
    from vlforge.data.pipeline import normalise
    from vlforge.evaluation.generation import display_images

    cfg = ImageConfig(size=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    raw = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    back = display_images(torch.from_numpy(normalise(raw, cfg)), cfg)
    assert all(np.array_equal(b, r) for b, r in zip(back, raw))
