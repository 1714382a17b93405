"""The transformers-native LLaVA-OneVision layout (llava-hf/* checkpoints and directories the engine saved)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration

from engine.checkpoints.registry import CheckpointLayout, register_layout


def _load(directory: Path, dtype: torch.dtype, device_map: str | dict) -> tuple[nn.Module, dict, dict]:
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        directory, dtype=dtype, device_map=device_map, attn_implementation="sdpa"
    )
    return model, {}, {}


LAYOUT = register_layout(
    CheckpointLayout(name="llava-hf", detect=lambda cfg: cfg.get("model_type") == "llava_onevision", load=_load)
)
