import json
from collections import Counter
from pathlib import Path

import pytest

from vlforge.config import CorpusConfig
from vlforge.data.corpus import COLORS, SPLITS, Obj, build_corpus, load_concepts, noto_font_path, plan, relation
from vlforge.data.shards import iter_samples, list_shards, read_manifest

pytestmark = pytest.mark.unit
SMALL = dict(n_concepts=120, n_scenes=200, n_vqa=200, n_nlvr2=240, samples_per_shard=50, workers=1)


def _load(root: Path, task: str, split: str) -> list[dict]:
    out = []
    for shard in list_shards(str(root / task / split)):
        for s in iter_samples(shard):
            s["meta"] = json.loads(s["json"])
            s["text"] = s["txt"].decode()
            out.append(s)
    return out


def test_concepts_are_real_emoji_with_groups():
    concepts = load_concepts()
    assert len(concepts) >= 200
    assert len({c.name for c in concepts}) == len(concepts)
    assert {c.group for c in concepts} >= {"animal", "food", "vehicle", "object"}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_corpus(CorpusConfig(out=str(tmp_path / "a"), **SMALL), progress=None)
    b = build_corpus(CorpusConfig(out=str(tmp_path / "b"), **SMALL), progress=None)
    c = build_corpus(CorpusConfig(out=str(tmp_path / "c"), seed=1, **SMALL), progress=None)
    assert a["counts"] == b["counts"]
    for task in ("concepts", "scenes", "vqa", "nlvr2"):
        ma = read_manifest(str(tmp_path / "a" / task / "train"))
        mb = read_manifest(str(tmp_path / "b" / task / "train"))
        mc = read_manifest(str(tmp_path / "c" / task / "train"))
        assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards]
        assert [s.sha256 for s in ma.shards] != [s.sha256 for s in mc.shards]
    assert a["heldout_concepts"] != c["heldout_concepts"]


def test_splits_hold_out_concepts_and_combinations(corpus):
    meta = json.loads((corpus / "corpus.json").read_text())
    assert "CC BY-SA 4.0" in meta["license"] and "OpenMoji" in meta["artwork"]
    heldout = set(meta["heldout_concepts"])
    pairs_seen = set()
    for task in ("scenes", "vqa", "nlvr2"):
        for split in ("train", "val"):
            for s in _load(corpus, task, split):
                names = s["meta"]["concepts"]
                assert not heldout & set(names), (task, split, names)
                pairs_seen |= {frozenset((a, b)) for a in names for b in names if a != b}
    for task in ("scenes", "vqa", "nlvr2"):
        test = _load(corpus, task, "test")
        assert test
        for s in test:
            names = s["meta"]["concepts"]
            assert not heldout & set(names)
            assert frozenset(names[:2]) not in pairs_seen, f"{task} test pair {names[:2]} seen in train/val"
        for s in _load(corpus, task, "heldout"):
            assert heldout & set(s["meta"]["concepts"])
    for s in _load(corpus, "concepts", "heldout"):
        assert s["meta"]["concept"] in heldout
    for split in ("train", "val", "test"):
        assert not any(s["meta"]["concept"] in heldout for s in _load(corpus, "concepts", split))


def test_captions_state_the_drawn_relations(corpus):
    for s in _load(corpus, "scenes", "train")[:100]:
        objs = [Obj(**o) for o in s["meta"]["objects"]]
        first = s["text"].split(",")[0]
        assert f"{relation(objs[0], objs[1])} " in first, (s["text"], objs)
        assert s["text"].endswith(f"{s['meta']['background']} background")


def test_vqa_answers_are_right(corpus):
    kinds = Counter()
    for s in _load(corpus, "vqa", "train"):
        m = s["meta"]
        kinds[m["question_type"]] += 1
        objs = [Obj(**o) for o in m["objects"]]
        q, a = m["question"], m["answer"]
        if m["question_type"] == "relation":
            rel, target = q[len("what is ") : -1].rsplit(" the ", 1)
            b = next(o for o in objs if o.name == target)
            hits = [o.name for o in objs if o is not b and relation(o, b) == rel]
            assert hits == [a]
        elif m["question_type"] == "color":
            assert a == m["background"] and a in COLORS
        elif m["question_type"] == "count":
            assert a == {2: "two", 3: "three"}[len(objs)]
        else:
            asked = q[len("is there ") : -1].split(" ", 1)[1]
            assert (a == "yes") == (asked in [o.name for o in objs])
    assert set(kinds) == {"relation", "color", "count", "exists"}
    answers = json.loads((corpus / "answers.json").read_text())
    assert {"yes", "no", "two", "three"} <= set(answers)


def test_nlvr2_balanced_and_needs_the_relation(corpus):
    for split in SPLITS:
        samples = _load(corpus, "nlvr2", split)
        labels = Counter(s["meta"]["label"] for s in samples)
        assert abs(labels[True] - labels[False]) <= 1, (split, labels)
        by_objects = Counter()
        for s in samples:
            m = s["meta"]
            assert "right.jpg" in s
            left = [Obj(**o) for o in m["objects"]]
            right = [Obj(**o) for o in m["right"]["objects"]]
            assert [o.name for o in left] == [o.name for o in right] == m["concepts"]
            holds = [relation(left[0], left[1]) == m["relation"], relation(right[0], right[1]) == m["relation"]]
            assert holds == m["relation_holds"]
            want = {"both": all(holds), "exactly_one": holds[0] != holds[1], "neither": not any(holds)}
            assert want[m["template"]] == m["label"], s["text"]
            by_objects[m["label"]] += 1
        assert set(by_objects) == {True, False}


def test_relation_is_unambiguous_in_every_scene():
    samples, _ = plan(CorpusConfig(**{k: v for k, v in SMALL.items() if k != "workers"}))
    for s in samples["scenes"]:
        objs = s.scenes[0].objects
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert abs(abs(a.x - b.x) - abs(a.y - b.y)) >= 0.12 - 1e-3


@pytest.mark.skipif(noto_font_path() is None, reason="Noto Color Emoji font not installed (fonts-noto-color-emoji)")
def test_second_style_repeats_test_specs_in_other_art(corpus):
    for split in ("test", "heldout"):
        a, b = _load(corpus, "scenes", split), _load(corpus, "scenes", f"{split}_style2")
        assert [s["text"] for s in a] == [s["text"] for s in b] and a
        assert all(x["meta"]["style"] == "openmoji" and y["meta"]["style"] == "noto" for x, y in zip(a, b))
        assert all(x["jpg"] != y["jpg"] for x, y in zip(a, b))


def test_ensure_corpus_rebuilds_one_made_with_other_parameters(tmp_path):
    from vlforge.data.corpus import corpus_params, ensure_corpus

    small = dict(n_concepts=20, n_scenes=20, n_vqa=20, n_nlvr2=20, second_style=False, workers=1)
    out = tmp_path / "c"
    said = []
    ensure_corpus(CorpusConfig(out=str(out), **small), progress=said.append)
    stamp = (out / "corpus.json").stat().st_mtime_ns
    ensure_corpus(CorpusConfig(out=str(out), **small), progress=said.append)  # same parameters: kept
    assert (out / "corpus.json").stat().st_mtime_ns == stamp
    ensure_corpus(CorpusConfig(out=str(out), **{**small, "n_scenes": 40}), progress=said.append)
    assert corpus_params(out)["n_scenes"] == 40
    assert any("built with other parameters (n_scenes)" in m for m in said)
    assert sum(1 for _ in iter_samples(list_shards(str(out / "scenes" / "train"))[0])) == 26


def test_extra_train_adds_training_samples_and_leaves_every_other_draw_as_it_was():
    base = CorpusConfig(**SMALL)
    more = CorpusConfig(**SMALL, extra_train={"vqa": 50, "nlvr2": 30})
    (a, _), (b, _) = plan(base), plan(more)
    for name in a:
        extra = b[name][len(a[name]) :]
        assert b[name][: len(a[name])] == a[name], name  # every earlier draw, in every split, unchanged
        assert len(extra) == more.extra_train.get(name, 0)
        assert {s.split for s in extra} <= {"train"}
    keys = [s.key for s in b["vqa"] if s.split == "train"]
    assert len(keys) == len(set(keys)) and keys[-1] == f"vqa-train-{len(keys) - 1:06d}"
    kinds = Counter(s.meta["question_type"] for s in b["vqa"][len(a["vqa"]) :])
    assert kinds == {"relation": 20, "color": 10, "count": 10, "exists": 10}
    assert Counter(s.meta["label"] for s in b["nlvr2"][len(a["nlvr2"]) :]) == {True: 15, False: 15}


def test_extra_train_is_checked_and_absent_from_the_parameters_when_empty(tmp_path):
    from vlforge.data.corpus import _params

    assert "extra_train" not in _params(CorpusConfig(**SMALL))  # corpora built before it stay current
    assert _params(CorpusConfig(**SMALL, extra_train={"vqa": 5}))["extra_train"] == {"vqa": 5}
    with pytest.raises(ValueError, match="unknown corpus set 'vqav2'"):
        CorpusConfig(extra_train={"vqav2": 5})
    with pytest.raises(ValueError, match="extra_train.vqa must be an integer >= 0"):
        CorpusConfig(extra_train={"vqa": -1})
