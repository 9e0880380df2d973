"""What the main job checks before it starts or joins Ray (``workflows.two_stage.preflight``), the
storage settings behind it (retries, the fast reachability check) and worker placement."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlforge.config import ConfigError, StorageConfig, TwoStageConfig, load

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "jobs" / "configs" / "two_stage_smoke.yaml"


def _cfg(corpus: Path, tmp_path: Path, *sets: str) -> TwoStageConfig:
    return load(
        TwoStageConfig, SMOKE, [f"data_root={corpus}", "corpus=null", f"storage_path={tmp_path / 'out'}", *sets]
    )


def test_preflight_returns_the_plan_when_everything_is_there(corpus, tmp_path):
    from vlforge.workflows.two_stage import preflight

    p = preflight(_cfg(corpus, tmp_path, "placement_strategy=STRICT_SPREAD"))
    assert list(p.runs)[:2] == ["teacher-pretrain", "teacher-finetune"]
    assert all(run.placement_strategy == "STRICT_SPREAD" for run in p.runs.values())
    assert not (tmp_path / "out").exists()


def test_a_missing_shard_set_names_the_run_and_stage(corpus, tmp_path):
    from vlforge.workflows.two_stage import preflight

    with pytest.raises(ConfigError, match=r"run student-distilled, stage nlvr2: shard set not found: .*nlvr2/nope"):
        preflight(_cfg(corpus, tmp_path, "student.stages.2.data.shards=nlvr2/nope"))


def test_a_missing_data_root_without_a_corpus_to_build(tmp_path):
    from vlforge.workflows.two_stage import preflight

    with pytest.raises(ConfigError, match="no-corpus does not exist .corpus is null"):
        preflight(_cfg(tmp_path / "no-corpus", tmp_path))


def test_a_corpus_built_with_other_parameters_is_left_to_the_rebuild(tmp_path):
    """A corpus written with other parameters (e.g. before the pair set became ``nlvr2/`` and
    ``n_nlvr`` became ``n_nlvr2``) is rebuilt by the job, so preflight does not look for its sets."""
    import dataclasses
    import json

    from vlforge.data.corpus import _params, corpus_current
    from vlforge.workflows.two_stage import _corpus_pending, preflight

    root = tmp_path / "old-corpus"
    (root / "nlvr" / "train").mkdir(parents=True)
    cfg = load(TwoStageConfig, SMOKE, [f"data_root={root}", f"storage_path={tmp_path / 'out'}"])
    old = _params(cfg.corpus)
    old["n_nlvr"] = old.pop("n_nlvr2")
    (root / "corpus.json").write_text(json.dumps({"params": old}))
    assert not corpus_current(dataclasses.replace(cfg.corpus, out=str(root)))
    assert _corpus_pending(cfg)
    preflight(cfg)  # no "shard set not found: .../nlvr2/train"
    (root / "corpus.json").write_text(json.dumps({"params": _params(cfg.corpus)}))
    assert not _corpus_pending(cfg)  # built with these parameters: its sets are checked
    with pytest.raises(ConfigError):  # the (empty) corpus's sets are checked now
        preflight(cfg)


def test_an_unreachable_s3_data_root_is_a_config_error(tmp_path, monkeypatch):
    from vlforge.workflows.two_stage import preflight

    monkeypatch.setenv("VLFORGE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    with pytest.raises(ConfigError, match=r"data_root: s3://b/corpus: S3 endpoint http://127.0.0.1:9 unreachable"):
        preflight(load(TwoStageConfig, SMOKE, ["data_root=s3://b/corpus", "corpus=null"]))


def test_check_reachable_says_when_credentials_are_missing(monkeypatch):
    from vlforge.data.storage import StorageUnreachable, check_reachable

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageUnreachable, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
        check_reachable("s3://b/x", StorageConfig(s3_endpoint_url="http://127.0.0.1:9"))
    check_reachable("/any/local/path")  # local paths: nothing to reach


def test_s3_filesystem_retries_with_backoff():
    from vlforge.data.storage import filesystem_for

    fs, path = filesystem_for(
        "s3://bucket/corpus", StorageConfig(s3_endpoint_url="http://127.0.0.1:9", max_attempts=7, connect_timeout_s=3)
    )
    assert path == "bucket/corpus" and fs.retries == 7
    assert fs.config_kwargs["retries"] == {"max_attempts": 7, "mode": "standard"}
    assert fs.config_kwargs["connect_timeout"] == 3


@pytest.mark.parametrize(
    "sets, message",
    [
        (["data.storage.max_attempts=0"], "max_attempts must be >= 1"),
        (["placement_strategy=SPRED"], "placement_strategy"),
    ],
)
def test_bad_storage_and_placement_settings(sets, message):
    from vlforge.config import TrainRunConfig

    with pytest.raises(ConfigError, match=message):
        load(TrainRunConfig, REPO / "jobs" / "configs" / "vlmo_stagewise_smoke.yaml", sets)


def test_eval_sets_take_a_users_shard_sets_and_are_checked(corpus, tmp_path):
    from vlforge.workflows.two_stage import eval_set_uri, preflight

    cfg = _cfg(corpus, tmp_path, f"eval.sets.itm/test={corpus / 'concepts' / 'test'}", "eval.sets.vqa/val=vqa/test")
    assert eval_set_uri(cfg, "itm", "test") == str(corpus / "concepts" / "test")
    assert eval_set_uri(cfg, "vqa", "val") == str(corpus / "vqa" / "test")  # relative: under data_root
    assert eval_set_uri(cfg, "nlvr2", "test") == str(corpus / "nlvr2" / "test")  # not named: the corpus's
    preflight(cfg)
    with pytest.raises(ConfigError, match=r"eval.sets.itm/val: shard set not found: .*mine/val"):
        preflight(_cfg(corpus, tmp_path, f"eval.sets.itm/val={tmp_path / 'mine' / 'val'}"))
    with pytest.raises(ConfigError, match="keys are '<task>/<split>'"):
        _cfg(corpus, tmp_path, "eval.sets.scenes/test=x")
