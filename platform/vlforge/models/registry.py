"""Registry of named model sizes, in the style of timm's ``register_model``.

Each model file registers factories for its named sizes (``vlmo_debug``,
``vlmo_small``, ...). ``create_model(name, **overrides)`` builds one; the
overrides replace fields of the size's config dataclass. ``model_class(name)`` is the class a
size builds (its factory's return annotation), known without building any weights.

    from vlforge.models import create_model, list_models
    model = create_model("vlmo_debug")
    model_class("vlmo_large").capabilities    # frozenset({"embed_image", "embed_text"})
"""

from __future__ import annotations

from collections.abc import Callable

_REGISTRY: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` (a factory taking ``**overrides``) under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(prefix: str = "") -> list[str]:
    _import_model_modules()
    return sorted(n for n in _REGISTRY if n.startswith(prefix))


def create_model(name: str, **overrides):
    _import_model_modules()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)


def model_class(name: str) -> type:
    """The class the factory of ``name`` returns, from its return annotation (nothing is built)."""
    import typing

    _import_model_modules()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cls = typing.get_type_hints(_REGISTRY[name]).get("return")
    if not isinstance(cls, type):
        raise TypeError(f"model {name!r}: its factory's return annotation is {cls!r}, not a class")
    return cls


def _import_model_modules() -> None:
    """Import every model file under vlforge.models so their sizes register."""
    import importlib
    import pkgutil

    # lazy: import cycle with vlforge.models (its __init__ imports this module)
    import vlforge.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"vlforge.models.{info.name}")
