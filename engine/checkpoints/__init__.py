"""Checkpoint layouts: each maps one on-disk format onto the engine's LlavaOnevision classes (+ extra modules)."""

from engine.checkpoints.registry import CheckpointLayout, detect_layout, get_layout, register_layout

__all__ = ["CheckpointLayout", "detect_layout", "get_layout", "register_layout"]
