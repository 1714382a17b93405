"""Layouts registered by name, detected from a checkpoint directory's config.json."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.errors import ModelUnavailable

BUILTIN_LAYOUT_MODULES = ("engine.checkpoints.llava_hf", "engine.checkpoints.videoxl2", "engine.checkpoints.vilamp")


@dataclass(frozen=True)
class CheckpointLayout:
    """`detect(config_json)` says whether a directory is in this layout; `load(dir, dtype, device)` returns
    (LlavaOnevisionForConditionalGeneration, {name: extra module}, engine overrides such as vision_feature_layer)."""

    name: str
    detect: Callable[[dict], bool]
    load: Callable[[Path, torch.dtype, str | dict], tuple[nn.Module, dict[str, nn.Module], dict]]


_LAYOUTS: dict[str, CheckpointLayout] = {}


def register_layout(layout: CheckpointLayout) -> CheckpointLayout:
    _LAYOUTS[layout.name] = layout
    return layout


def _load_builtins() -> None:
    for module in BUILTIN_LAYOUT_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def get_layout(name: str) -> CheckpointLayout:
    _load_builtins()
    return _LAYOUTS[name]


def detect_layout(directory: Path) -> CheckpointLayout:
    """The layout whose detector accepts `directory/config.json`."""
    _load_builtins()
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelUnavailable(f"{directory} has no config.json, so it is not a model checkpoint directory.")
    config = json.loads(config_path.read_text())
    for layout in _LAYOUTS.values():
        if layout.detect(config):
            return layout
    raise ModelUnavailable(
        f"{directory}: model type {config.get('model_type')!r} is not a layout this engine can load "
        f"(known: {', '.join(_LAYOUTS)})."
    )
