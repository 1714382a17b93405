"""Backends registered by name; built-ins are imported lazily, third parties come through an entry point group."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points

from backends.base import Backend

ENTRY_POINT_GROUP = "frame_arena.backends"
BUILTIN_MODULES = ("backends.uniform", "backends.videoxl2", "backends.vilamp", "backends.hico")

_REGISTRY: dict[str, type[Backend]] = {}
_loaded = {"builtins": False}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: `@register_backend("vilamp")`."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    if _loaded["builtins"]:
        return
    _loaded["builtins"] = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def list_backends() -> list[str]:
    """Names of every registered backend, built-ins first in a fixed order."""
    _load_all()
    builtin_order = {module.rsplit(".", 1)[1]: i for i, module in enumerate(BUILTIN_MODULES)}
    names = list(_REGISTRY)
    return sorted(names, key=lambda name: (builtin_order.get(name, len(builtin_order)), names.index(name)))


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
