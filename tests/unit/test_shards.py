import io
import json

import pytest
from PIL import Image

from vlforge.data.ingest import IngestError, ingest
from vlforge.data.shards import MANIFEST, ShardWriter, iter_samples, list_shards, read_manifest, verify

pytestmark = pytest.mark.unit


def _png(color=(255, 0, 0), size=(8, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_round_trip_and_manifest(tmp_path):
    with ShardWriter(tmp_path / "set", samples_per_shard=3, params={"p": 1}) as w:
        for i in range(7):
            w.write(
                f"k{i:03d}",
                image=_png((i, 0, 0)),
                image_ext="png",
                text=f"caption {i}",
                meta={"i": i},
                extra={"right.png": _png((0, i, 0))} if i % 2 else None,
            )
    m = read_manifest(str(tmp_path / "set"))
    assert [s.samples for s in m.shards] == [3, 3, 1] and m.total_samples == 7 and m.params == {"p": 1}
    shards = list_shards(str(tmp_path / "set"))
    assert len(shards) == 3
    got = [s for shard in shards for s in iter_samples(shard)]
    assert [s["__key__"] for s in got] == [f"k{i:03d}" for i in range(7)]
    assert got[3]["txt"] == b"caption 3" and json.loads(got[3]["json"]) == {"i": 3}
    assert Image.open(io.BytesIO(got[3]["right.png"])).getpixel((0, 0)) == (0, 3, 0)
    assert "right.png" not in got[2]
    assert verify(str(tmp_path / "set")) == []


def test_verify_detects_corruption_and_missing(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=2) as w:
        for i in range(4):
            w.write(f"k{i}", image=_png(), text="x")
    shard = tmp_path / "shard-00001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("shard-00001.tar: sha256" in p for p in verify(str(tmp_path)))
    (tmp_path / "shard-00000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        list_shards(str(tmp_path))


def test_list_without_manifest_glob_and_single(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=1) as w:
        w.write("a", image=_png(), text="x")
        w.write("b", image=_png(), text="y")
    (tmp_path / MANIFEST).unlink()
    assert len(list_shards(str(tmp_path))) == 2
    assert len(list_shards(str(tmp_path / "shard-*.tar"))) == 2
    assert len(list_shards(str(tmp_path / "shard-00000.tar"))) == 1
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nope"))


def test_writer_rejects_bad_keys(tmp_path):
    w = ShardWriter(tmp_path)
    w.write("a", image=_png(), text="x")
    for key in ("a", "b.c", "", "d/e"):
        with pytest.raises(ValueError):
            w.write(key, image=_png(), text="x")
    with pytest.raises(ValueError, match="image_ext"):
        w.write("z", image=_png(), image_ext="gif")


def test_same_samples_same_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name) as w:
            w.write("k", image=_png(), text="x", meta={"b": 1, "a": 2})
    assert (tmp_path / "a" / "shard-00000.tar").read_bytes() == (tmp_path / "b" / "shard-00000.tar").read_bytes()


def test_ingest_csv_and_jsonl(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    (img / "a.png").write_bytes(_png())
    (img / "b.jpg").write_bytes(_png(fmt="JPEG"))
    (img / "c.bmp").write_bytes(_png(fmt="BMP"))
    (img / "bad.png").write_bytes(b"not an image")
    csv = tmp_path / "caps.csv"
    csv.write_text(
        "file,caption,label\na.png,a red square,1\nb.jpg,another,0\nc.bmp,bitmap,1\n"
        "missing.png,gone,0\nbad.png,broken,1\na.png,,0\n../caps.csv,escape,0\n"
    )
    rep = ingest(img, csv, tmp_path / "out", samples_per_shard=2)
    assert rep.written == 3
    assert rep.skipped == {"missing_image": 1, "unreadable_image": 1, "missing_caption": 1, "outside_folder": 1}
    samples = [s for sh in list_shards(str(tmp_path / "out")) for s in iter_samples(sh)]
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["json", "png", "txt"],
        ["jpg", "json", "txt"],
        ["json", "png", "txt"],
    ]
    assert json.loads(samples[0]["json"]) == {"label": "1", "split": "train", "source": "a.png"}
    with pytest.raises(IngestError, match="4 rows skipped"):
        ingest(img, csv, tmp_path / "strict", strict=True)

    jl = tmp_path / "caps.jsonl"
    jl.write_text(json.dumps({"image": "a.png", "text": "x", "split": "val"}) + "\n\n")
    rep = ingest(img, jl, tmp_path / "out2")
    assert rep.written == 1
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(IngestError, match="bad.jsonl:1: not valid JSON"):
        ingest(img, tmp_path / "bad.jsonl", tmp_path / "out3")
    (tmp_path / "nocol.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(IngestError, match="no image column"):
        ingest(img, tmp_path / "nocol.csv", tmp_path / "out4")


# ----------------------------------------------------------------------------- img2dataset's output


def _img2dataset_shard(path, samples, stats: int | None = None):
    """A tar as img2dataset writes it: ``%09d`` keys, jpg + txt + json members, ``<shard>_stats.json``
    and ``<shard>.parquet`` beside it. ``samples``: (key, with_image, caption or None)."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, with_image, caption in samples:
            members = [("json", json.dumps({"url": f"http://x/{key}.jpg", "key": key, "status": "success"}).encode())]
            if with_image:
                members.insert(0, ("jpg", _jpeg()))
            if caption is not None:
                members.insert(1, ("txt", caption.encode()))
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    path.with_suffix(".parquet").write_bytes(b"PAR1 not read")
    if stats is not None:
        (path.parent / f"{path.stem}_stats.json").write_text(json.dumps({"count": stats, "successes": stats}))


def _jpeg() -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(b, format="JPEG")
    return b.getvalue()


def test_img2dataset_shards_verify_and_manifest_without_rewriting(tmp_path, capsys):
    from vlforge.cli import main
    from vlforge.config import DataConfig, ImageConfig
    from vlforge.data.pipeline import detect_kind
    from vlforge.data.shards import scan_shard, write_manifest
    from vlforge.evaluation.data import load_eval_set

    d = tmp_path / "laion"
    d.mkdir()
    _img2dataset_shard(d / "00000.tar", [(f"{i:09d}", True, f"caption {i}") for i in range(3)], stats=3)
    _img2dataset_shard(
        d / "00001.tar",
        [("000010000", True, "ok"), ("000010001", False, "no image"), ("000010002", True, None)],
        stats=3,
    )
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    scan = scan_shard(str(d / "00001.tar"))
    assert scan.samples == 2
    assert scan.problems == {"missing_image": 1, "missing_caption": 1, "stats_mismatch": 1}
    assert scan.bytes == len(before["00001.tar"])
    import hashlib

    assert scan.sha256 == hashlib.sha256(before["00001.tar"]).hexdigest()

    assert main(["data", "verify", str(d)]) == 1  # no manifest: every shard read, problems listed
    out = capsys.readouterr().out
    assert "000010001 has no image member" in out and "counts 3 successes" in out and "3 problem(s)" in out

    assert main(["data", "manifest", str(d), "--quiet"]) == 1  # written, but the problems make it exit 1
    out = capsys.readouterr().out
    assert "2 shard(s), 5 samples, kind captions" in out and "missing_image 1" in out
    manifest = read_manifest(str(d))
    assert [(s.name, s.samples) for s in manifest.shards] == [("00000.tar", 3), ("00001.tar", 2)]
    assert manifest.params["source"] == "img2dataset" and manifest.params["scan_problems"]["stats_mismatch"] == 1
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != MANIFEST} == before  # shards untouched
    assert verify(str(d)) == []
    assert detect_kind(str(d)) == "captions"
    ev = load_eval_set(str(d), DataConfig(image=ImageConfig(size=8, augment=False)))
    assert ev["input_ids"].shape[0] == 4  # 3 + "ok"; the sample without a caption is dropped in decoding

    with pytest.raises(FileExistsError, match="--force"):
        write_manifest(str(d))
    assert main(["data", "manifest", str(d), "--kind", "vqa", "--force", "--quiet"]) == 1
    assert read_manifest(str(d)).params["kind"] == "vqa"
    (d / "00000.tar").write_bytes(before["00000.tar"][:700])  # cut inside the first image
    assert "corrupt_tar" in scan_shard(str(d / "00000.tar")).problems
    assert main(["data", "manifest", str(tmp_path / "nowhere")]) == 2


def test_manifest_kind_reads_legacy_task_manifests(tmp_path):
    """Shard sets written before ``params.kind`` recorded ``params.task`` (the corpus set's name,
    ``nlvr`` for the pair kind); they still read, as the data kind they hold."""
    from vlforge.config import DATA_KINDS, DataConfig, ImageConfig
    from vlforge.data.pipeline import detect_kind
    from vlforge.data.shards import Manifest, manifest_kind
    from vlforge.evaluation.data import load_eval_set

    legacy = {"nlvr": "nlvr2", "scenes": "captions", "concepts": "captions", "vqa": "vqa", "captions": "captions"}
    for old, kind in legacy.items():
        assert manifest_kind(Manifest([], {"task": old})) == kind
    for kind in DATA_KINDS:
        assert manifest_kind(Manifest([], {"kind": kind})) == kind
        assert manifest_kind(Manifest([], {"kind": kind, "task": "scenes"})) == kind  # kind wins
    assert manifest_kind(Manifest([], {})) == manifest_kind(None) == "captions"

    # an old pair set, end to end: detected as nlvr2 and decoded with its second image and label
    d = tmp_path / "old_nlvr"
    with ShardWriter(d, samples_per_shard=2, params={"task": "nlvr"}) as w:
        for i in range(3):
            w.write(
                f"nlvr-val-{i:06d}",
                image=_png((200, 0, 0)),
                image_ext="png",
                text=f"statement {i}",
                meta={"label": i % 2 == 0, **({"relation_holds": [True, False]} if i == 0 else {})},
                extra={"right.png": _png((0, 0, 200))},
            )
    assert detect_kind(str(d)) == "nlvr2"
    ev = load_eval_set(str(d), DataConfig(image=ImageConfig(size=8, augment=False)))
    assert ev["label"].tolist() == [1, 0, 1] and ev["pixel_values_2"].shape == ev["pixel_values"].shape
    # per-image truths where the json has them (the built-in corpus), -100 (unknown) elsewhere
    assert ev["image_truth"].tolist() == [[1, 0], [-100, -100], [-100, -100]]


def test_is_shard_set_tells_a_set_from_one_tar_or_a_glob(tmp_path):
    from vlforge.data.shards import is_shard_set, set_manifest

    assert is_shard_set("s3://bucket/corpus/scenes/train") and is_shard_set(f"{tmp_path}/set/")
    for uri in ("data/set/shard-000000.tar", "data/set/*.tar", "data/set/shard-00000?.tar", "data/set/[ab].tar"):
        assert not is_shard_set(uri), uri
    assert set_manifest(str(tmp_path)) is None  # a directory without a manifest
