from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from vlforge.config import (
    ConfigError,
    CorpusConfig,
    DataConfig,
    apply_overrides,
    dump_yaml,
    flatten,
    from_dict,
    load,
    parse_override,
)

pytestmark = pytest.mark.unit


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    stages: list[Inner] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    maybe: int | None = None


def test_unknown_key_names_full_path():
    with pytest.raises(ConfigError, match=r"unknown key inner\.lrr"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_unknown_key_inside_list_names_index():
    with pytest.raises(ConfigError, match=r"unknown key stages\[1\]\.bogus"):
        from_dict(Outer, {"stages": [{"lr": 1.0}, {"bogus": 2}]})


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"inner": {"steps": "ten"}}, r"inner\.steps: expected int, got str 'ten'"),
        ({"inner": {"steps": True}}, r"inner\.steps: expected int, got bool"),
        ({"inner": {"lr": "fast"}}, r"inner\.lr: expected float"),
        ({"inner": {"mode": "c"}}, r"inner\.mode: expected one of \['a', 'b'\]"),
        ({"inner": 3}, r"inner: expected a mapping for Inner"),
        ({"stages": {"lr": 1}}, r"stages: expected a list"),
        ({"tags": {"k": 1}}, r"tags\.k: expected str"),
        ({"name": None}, r"name: expected str"),
    ],
)
def test_wrong_types_name_full_path(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(Outer, raw)


def test_int_accepted_for_float_and_optional():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "maybe": None})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float) and cfg.maybe is None


def test_overrides_parse_yaml_values_and_create_nesting():
    assert parse_override("a.b=3e-4") == (["a", "b"], 3e-4)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    raw = apply_overrides({}, ["inner.steps=5", "name=run1"])
    assert raw == {"inner": {"steps": 5}, "name": "run1"}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_override_is_validated_like_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("n_scenes: 10\n")
    assert load(CorpusConfig, p, ["seed=3"]).seed == 3
    with pytest.raises(ConfigError, match=r"c.yaml: seed: expected int"):
        load(CorpusConfig, p, ["seed=abc"])
    with pytest.raises(ConfigError, match="unknown key image.bogus"):
        load(DataConfig, None, ["image.bogus=1"])


def test_post_init_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="image_size must be >= 32"):
        from_dict(CorpusConfig, {"image_size": 8})


def test_top_level_must_be_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(CorpusConfig, p)


def test_dump_round_trip_and_flatten():
    cfg = from_dict(Outer, {"stages": [{"lr": 0.5}], "tags": {"k": "v"}}, ["inner.mode=b"])
    again = from_dict(Outer, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["inner.mode"] == "b" and flat["stages.0.lr"] == 0.5 and flat["tags.k"] == "v"
    data = flatten(DataConfig())
    assert data["image.size"] == 64 and data["image.mean.0"] == 0.5


def test_exponent_without_dot_is_a_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 3e-4\n")
    assert load(Outer, p).inner.lr == 3e-4


def test_override_indexes_lists():
    raw = apply_overrides({"stages": [{"lr": 1.0}, {"lr": 2.0}]}, ["stages.1.lr=0.5", "stages.0.steps=3"])
    assert raw == {"stages": [{"lr": 1.0, "steps": 3}, {"lr": 0.5}]}
    with pytest.raises(ConfigError, match=r"stages\.2: index out of range \(list of 2\)"):
        apply_overrides(raw, ["stages.2.lr=1"])
    with pytest.raises(ConfigError, match="index out of range"):
        apply_overrides(raw, ["stages.x.lr=1"])
