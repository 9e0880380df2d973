"""The YAML loader: ``--set`` overrides, strict conversion into dataclasses, load, and output
(``to_dict``, ``dump_yaml``, ``flatten``)."""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
# YAML 1.1 reads "3e-4" (no dot) as a string; configs accept it as a float.
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A config that does not match its declared schema."""


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=v`` overrides to a nested mapping (in place; returns it).

    A numeric part indexes a list that is already there: ``stages.1.steps=100``.
    """
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {where}: index out of range (list of {len(node)})")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[:i])} is a {type(node).__name__}, not a mapping")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


# ----------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return _origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and build dataclasses; errors name ``path``."""
    where = path or "<root>"
    origin = _origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp) or (str, Any)
        return {
            _convert(k, args[0], f"{path}.<key>"): _convert(v, args[1], f"{path}.{k}" if path else str(k))
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], raw: Mapping, path: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key {where}{unknown[0]} (allowed in {cls.__name__}: {known})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None
    return obj


def from_dict(cls: type[T], raw: Mapping | None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a mapping, after applying ``overrides``."""
    data = _deepcopy(dict(raw or {}))
    apply_overrides(data, overrides)
    return _build(cls, data)


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at ``path`` (or start from defaults when None) into ``cls``. Top-level keys
    named ``x-...`` are dropped: they hold YAML anchors (``&data``) that the config reuses."""
    raw: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
        # Top-level ``x-*`` keys only hold YAML anchors for reuse (as in docker compose files).
        raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
    try:
        return from_dict(cls, raw, overrides)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    """A plain nested dict (lists, not tuples) of a config dataclass."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML; ``load`` of this text gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, sep: str = ".") -> dict[str, Any]:
    """``{"data.batch_size": 32, ...}``: scalars by key path, lists as ``key.0``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            if not v and prefix:
                out[prefix] = "{}"
            for k, x in v.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), x)
        elif isinstance(v, list):
            if not v and prefix:
                out[prefix] = "[]"
            for i, x in enumerate(v):
                walk(f"{prefix}{sep}{i}", x)
        else:
            out[prefix] = v

    walk("", to_dict(cfg))
    return out
