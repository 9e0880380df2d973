"""The promotion gate's rules and lock without a server: margins, guards, the config, the summary,
and the lock's wait / timeout / stale-lock behaviour against a small in-memory registry fake."""

from __future__ import annotations

import time

import pytest

from vlforge.config import ConfigError, PromoteConfig, from_dict

pytestmark = pytest.mark.unit

CHAMP = {"rmean": 20.0, "i2t_r1": 5.0, "t2i_r1": 6.0}


def _cfg(**raw) -> PromoteConfig:
    return from_dict(PromoteConfig, raw)


def test_promotes_when_every_margin_is_met_and_no_guard_drops():
    from vlforge.serving.promotion import compare

    ok, reason, rows = compare({"rmean": 20.5, "i2t_r1": 5.0, "t2i_r1": 7.0}, CHAMP, _cfg())
    assert ok and "rmean +0.50" in reason
    assert [(r["metric"], r["rule"], r["ok"]) for r in rows] == [
        ("rmean", "improve", "yes"),
        ("i2t_r1", "guard", "yes"),
        ("t2i_r1", "guard", "yes"),
    ]


@pytest.mark.parametrize(
    "challenger, words",
    [
        ({"rmean": 20.4, "i2t_r1": 5.0, "t2i_r1": 6.0}, "rmean +0.40 (needs >= +0.5)"),
        ({"rmean": 25.0, "i2t_r1": 4.9, "t2i_r1": 6.0}, "guarded i2t_r1 -0.10 (may drop at most 0)"),
    ],
)
def test_refuses_a_small_gain_or_a_guarded_drop(challenger, words):
    from vlforge.serving.promotion import compare

    ok, reason, _ = compare(challenger, CHAMP, _cfg())
    assert not ok and words in reason


def test_a_guard_tolerance_allows_a_small_drop():
    from vlforge.serving.promotion import compare

    ok, _, _ = compare({"rmean": 25.0, "i2t_r1": 4.5, "t2i_r1": 6.0}, CHAMP, _cfg(guard={"i2t_r1": 1.0}))
    assert ok


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"improve": {}}, "at least one metric"),
        ({"improve": {"accuracy": 1.0}}, "unknown metrics"),
        ({"guard": {"rmean": -1.0}}, ">= 0"),
        ({"challenger": "champion"}, "must differ"),
        ({"eval": {"max_samples": 1}}, "max_samples"),
        ({"eval": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"improve": {"ciderr": 1.0}}, "unknown metrics"),
        ({"colour": 1}, "unknown key colour"),
    ],
)
def test_bad_promotion_configs_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**raw)


def test_summary_and_exit_codes():
    from vlforge.serving.promotion import Decision, compare

    ok, reason, rows = compare({"rmean": 19.0, "i2t_r1": 5.0, "t2i_r1": 6.0}, CHAMP, _cfg())
    d = Decision("m", "refused", "3", "2", reason, comparisons=rows, eval_set="x (first 10)")
    text = d.summary()
    assert "version 3 vs champion 2" in text and "refused: rmean -1.00" in text and d.exit_code == 1
    assert (
        Decision("m", "promoted", "3", None, "first", dry_run=True)
        .summary()
        .endswith("DRY RUN: would be promoted: first")
    )
    assert Decision("m", "promoted", "3", "2", "ok").exit_code == 0


class _Exc(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.error_code = code


class _Model:
    def __init__(self, tags):
        self.tags = tags


class FakeRegistry:
    """create_registered_model fails on an existing name, like the registry's unique constraint."""

    def __init__(self):
        self.models: dict[str, dict] = {}

    def create_registered_model(self, name, tags=None, description=None):
        if name in self.models:
            raise _Exc("RESOURCE_ALREADY_EXISTS")
        self.models[name] = dict(tags or {})

    def get_registered_model(self, name):
        if name not in self.models:
            raise _Exc("RESOURCE_DOES_NOT_EXIST")
        return _Model(self.models[name])

    def delete_registered_model(self, name):
        self.models.pop(name, None)


@pytest.fixture()
def fake_mlflow_exception(monkeypatch):
    import mlflow.exceptions

    monkeypatch.setattr(mlflow.exceptions, "MlflowException", _Exc)


def test_the_lock_excludes_a_second_holder_and_is_released(fake_mlflow_exception):
    from vlforge.serving.promotion import PromotionError, promotion_lock

    reg = FakeRegistry()
    with promotion_lock(reg, "m", timeout_s=0.2, stale_s=60, log=lambda s: None):
        assert "m.promotion-lock" in reg.models
        t0 = time.monotonic()
        with pytest.raises(PromotionError, match="another promotion of m is in progress"):
            with promotion_lock(reg, "m", timeout_s=0.6, stale_s=60, log=lambda s: None):
                pass
        assert time.monotonic() - t0 >= 0.5  # it waited before giving up
    assert "m.promotion-lock" not in reg.models


def test_a_stale_lock_is_broken(fake_mlflow_exception):
    from vlforge.serving.promotion import promotion_lock

    reg = FakeRegistry()
    reg.create_registered_model("m.promotion-lock", tags={"holder": "gone", "since": f"{time.time() - 3600:.0f}"})
    said = []
    with promotion_lock(reg, "m", timeout_s=0, stale_s=60, log=said.append):
        assert reg.models["m.promotion-lock"]["holder"] != "gone"
    assert said and "stale" in said[0]


def test_command_line_values_stay_strings(tmp_path, monkeypatch):
    import argparse

    from vlforge.cli.promote import promote_arguments, run_promote
    from vlforge.serving import promotion

    seen = {}
    monkeypatch.setattr(
        promotion,
        "promote",
        lambda cfg, dry_run: (
            seen.setdefault("cfg", cfg) and None or promotion.Decision(cfg.model_name, "unchanged", "7", "7", "same")
        ),
    )
    p = argparse.ArgumentParser()
    promote_arguments(p, None)
    assert run_promote(p.parse_args(["--model", "123", "--challenger", "7", "--tracking-uri", "http://h:5000"])) == 0
    assert (seen["cfg"].model_name, seen["cfg"].challenger) == ("123", "7")
    assert seen["cfg"].tracking.tracking_uri == "http://h:5000"


def test_caption_metrics_gate_like_retrieval_and_must_be_produced():
    from vlforge.serving.promotion import PromotionError, check_metrics, compare

    cfg = _cfg(improve={"cider": 1.0}, guard={"bleu4": 0.5})
    ok, reason, _ = compare({"cider": 30.0, "bleu4": 9.7}, {"cider": 28.5, "bleu4": 10.0}, cfg)
    assert ok and "cider +1.50" in reason
    ok, reason, _ = compare({"cider": 30.0, "bleu4": 9.0}, {"cider": 28.5, "bleu4": 10.0}, cfg)
    assert not ok and "guarded bleu4 -1.00" in reason
    check_metrics({"cider": 1.0, "bleu4": 2.0, "rouge_l": 3.0}, cfg, "4")
    with pytest.raises(PromotionError, match=r"rules name \['bleu4', 'cider'\].*gives \['rmean'"):
        check_metrics({"rmean": 5.0, "n_images": 10}, cfg, "4")


@pytest.mark.parametrize("name", ["promote", "promote_smoke", "promote_captioner", "promote_captioner_smoke"])
def test_shipped_promotion_configs_load(name):
    from pathlib import Path

    from vlforge.config import PromoteConfig, load

    cfg = load(PromoteConfig, str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / f"{name}.yaml"))
    kind = "captioner" if "captioner" in name else "dual-encoder"
    assert cfg.model_name == f"vlforge-{kind}"
