"""The promotion gate against a real ``mlflow server`` whose artifacts live in an S3-compatible
server on 127.0.0.1: the first version becomes champion, a better challenger is promoted, a worse
one is refused (exit 1, champion untouched), ``--dry-run`` changes nothing, rollback puts the
previous champion back, the champion loaded by alias scores like the module it was made from, and
two concurrent promotions cannot both win.

"Better" is measured, not assumed: a vlmo_debug student trained for 200 ITC steps on the corpus's
concept captions against untrained ones, all scored on the held-out concept pairs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = {"model": "vlmo_debug", "method": "distill", "overrides": {"vl_layers": 0}}


def _data():
    from vlforge.config import DataConfig, ImageConfig, TokenizerConfig

    return DataConfig(image=ImageConfig(size=32, augment=False), tokenizer=TokenizerConfig(max_length=16))


def _untrained(seed: int, out: Path) -> Path:
    from vlforge.models.io import build_from_spec, save_model_dir

    torch.manual_seed(seed)
    return save_model_dir(build_from_spec(SPEC).state_dict(), SPEC, out)


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    """Model directories: two untrained students and one trained on concept captions (ITC)."""
    from vlforge.evaluation import evaluate_retrieval, load_eval_set
    from vlforge.models.io import build_from_spec, save_model_dir
    from vlforge.tasks.distill import DistillationTask

    out = tmp_path_factory.mktemp("students")
    train = load_eval_set(str(corpus / "concepts" / "train"), _data(), kind="captions", max_samples=512)
    torch.manual_seed(0)
    student = build_from_spec(SPEC)
    task = DistillationTask(student, None, "itm", {"itc": 1.0})
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(train["input_ids"]), (32,), generator=g)
        loss = task({k: v[idx] for k, v in train.items()})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    dirs = {
        "weak0": _untrained(0, out / "weak0"),
        "weak1": _untrained(1, out / "weak1"),
        "trained": save_model_dir(student.state_dict(), SPEC, out / "trained"),
    }
    test = load_eval_set(str(corpus / "concepts" / "test"), _data(), kind="captions", max_samples=200)
    from vlforge.models.io import load_model_dir

    scores = {k: evaluate_retrieval(load_model_dir(d), test, "student")["rmean"] for k, d in dirs.items()}
    print("rmean on concepts/test:", scores)
    assert scores["trained"] > max(scores["weak0"], scores["weak1"]) + 5, scores  # the premise of the tests below
    return dirs


@pytest.fixture()
def model_name(mlflow_s3_server, monkeypatch):
    monkeypatch.setenv("VLFORGE_SERVING_DEVICE", "cpu")
    return f"dual-{uuid.uuid4().hex[:8]}"


def _register(server, name: str, model_dir: Path) -> str:
    from vlforge.serving.registry import log_and_register

    return log_and_register(
        model_dir,
        _data(),
        model_name=name,
        tags={"source": model_dir.name},
        alias="challenger",
        tracking_uri=server.uri,
        experiment="it-promotion",
    ).version


def _args(server, corpus, name: str, *more: str) -> list[str]:
    return [
        "--config",
        str(REPO / "jobs" / "configs" / "promote_smoke.yaml"),
        "--model",
        name,
        "--tracking-uri",
        server.uri,
        "--set",
        f"eval.shards={corpus / 'concepts' / 'test'}",
        "--set",
        "eval.max_samples=200",
        *more,
    ]


def _champion(server, name: str) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient(server.uri).get_model_version_by_alias(name, "champion").version)


def test_first_champion_promotion_refusal_dry_run_and_rollback(
    mlflow_s3_server, corpus, models, model_name, capsys, load_job
):
    from mlflow import MlflowClient

    from vlforge.serving.promotion import HISTORY_TAG

    server, name, job = mlflow_s3_server, model_name, load_job("promote")
    client = MlflowClient(server.uri)

    assert _register(server, name, models["weak0"]) == "1"
    assert job.main(_args(server, corpus, name)) == 0
    assert "becomes the first champion" in capsys.readouterr().out
    assert _champion(server, name) == "1"
    v1 = client.get_model_version(name, "1")
    assert v1.tags["promotion.decision"] == "promoted" and v1.tags["promotion.champion"] == "none"
    assert float(v1.tags["promotion.eval.rmean"]) >= 0 and "first champion" in v1.description

    assert _register(server, name, models["trained"]) == "2"
    assert job.main(_args(server, corpus, name, "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "DRY RUN: would be promoted" in out and "rmean" in out
    assert _champion(server, name) == "1" and "promotion.decision" not in client.get_model_version(name, "2").tags

    assert job.main(_args(server, corpus, name)) == 0
    assert _champion(server, name) == "2"
    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert v2.tags["promotion.decision"] == "promoted" and v2.tags["promotion.champion"] == "1"
    assert float(v2.tags["promotion.eval.rmean"]) > float(v1.tags["promotion.eval.rmean"])
    assert v1.tags["promotion.last_challenge"] == "version 2 promoted" and "version 2" in v1.description
    assert client.get_registered_model(name).tags[HISTORY_TAG] == "1,2"

    assert _register(server, name, models["weak1"]) == "3"
    assert job.main(_args(server, corpus, name)) == 1  # refused: exits non-zero with the reason
    out = capsys.readouterr().out
    assert "refused: rmean" in out and "needs >= +0.5" in out
    assert _champion(server, name) == "2"
    v3 = client.get_model_version(name, "3")
    assert v3.tags["promotion.decision"] == "refused" and "rmean" in v3.tags["promotion.reason"]

    assert job.main(_args(server, corpus, name, "--rollback")) == 0
    assert _champion(server, name) == "1"
    assert client.get_registered_model(name).tags[HISTORY_TAG] == "1"
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "rolled_back"
    assert job.main(_args(server, corpus, name, "--rollback")) == 2  # nothing before the first champion
    assert "first champion" in capsys.readouterr().err
    # The artifacts went to the S3-compatible server, through the tracking server.
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["VLFORGE_S3_ENDPOINT"])
    assert any(p.endswith("model.safetensors") for p in fs.find(f"{server.bucket}/mlartifacts"))


def test_the_champion_loaded_by_alias_scores_like_its_module(mlflow_s3_server, corpus, models, model_name, load_job):
    import numpy as np
    import pandas as pd

    from vlforge.evaluation import load_eval_set
    from vlforge.evaluation.retrieval import student_scores
    from vlforge.models.io import load_model_dir
    from vlforge.serving.registry import load_by_alias

    server, name = mlflow_s3_server, model_name
    _register(server, name, models["trained"])
    assert load_job("promote").main(_args(server, corpus, name)) == 0
    pyfunc = load_by_alias(name, "champion", tracking_uri=server.uri)
    from vlforge.data.shards import iter_samples, list_shards

    samples = [s for url in list_shards(str(corpus / "concepts" / "test")) for s in iter_samples(url)][:6]
    images = [next(v for k, v in s.items() if k in ("jpg", "png", "webp")) for s in samples]
    texts = [s["txt"].decode() for s in samples]
    out = pyfunc.predict(pd.DataFrame({"image": images, "text": texts}))
    ev = load_eval_set(str(corpus / "concepts" / "test"), _data(), kind="captions", max_samples=6)
    direct = (
        student_scores(load_model_dir(models["trained"]), ev["pixel_values"], ev["input_ids"], ev["attention_mask"])
        .diagonal()
        .numpy()
    )
    np.testing.assert_allclose(out["score"].to_numpy(), direct, atol=1e-4)


def test_concurrent_promotions_cannot_both_win(mlflow_s3_server, corpus, models, model_name, load_job):
    """Two promotions of equally good challengers start together against the same weak champion.
    The lock serialises them: the first wins, the second is then judged against the new champion
    (its twin: no gain) and refused. Without the lock both would win against version 1."""
    from mlflow import MlflowClient

    server, name = mlflow_s3_server, model_name
    _register(server, name, models["weak0"])
    assert load_job("promote").main(_args(server, corpus, name)) == 0
    a, b = _register(server, name, models["trained"]), _register(server, name, models["trained"])
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "promote.py"), *_args(server, corpus, name, "--challenger", v)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in (a, b)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    winner = (a, b)[[p.returncode for p in procs].index(0)]
    loser = b if winner == a else a
    client = MlflowClient(server.uri)
    assert _champion(server, name) == winner
    assert client.get_model_version(name, loser).tags["promotion.champion"] == winner
    assert client.get_model_version(name, loser).tags["promotion.decision"] == "refused"
    assert client.get_registered_model(name).tags["vlforge.champion_history"] == f"1,{winner}"
    names = [m.name for m in client.search_registered_models()]
    assert f"{name}.promotion-lock" not in names  # released
