"""The ViLAMP checkpoint (orange-sk/ViLAMP-llava-qwen): the shared LLaVA keys (see llava_original) plus the learned
DFM module `model.composer_projector.*` as the extra module "dfm".

Reference: steven-ccq/ViLAMP — `llava/model/language_model/llava_qwen.py` (LlavaQwenConfig fields),
`llava/model/llava_arch.py` (LlavaLongVideoMetaModel: vision_tower, mm_projector, frame_selector,
composer_projector, image_newline) and `llava/model/multimodal_projector/builder.py` (SigPooling). The CLIP frame
selector (`model.frame_selector.model.*`) is not loaded: its tokenizer is not part of the checkpoint, and keyframe
relevance is computed from the LLM instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backends.vilamp_dfm import DFMProjection
from engine.checkpoints.llava_original import engine_overrides, load_original, read_checkpoint
from engine.checkpoints.registry import CheckpointLayout, register_layout

LABEL = "ViLAMP"
DFM_PREFIX = "model.composer_projector."
SKIPPED = ("model.frame_selector.",)  # ViLAMP's CLIP ViT-B/32 selector (see the module docstring)


def is_vilamp_config(config: dict) -> bool:
    """A LLaVA-NeXT `llava_qwen` config carrying ViLAMP's selector/composer fields."""
    return config.get("model_type") == "llava_qwen" and "composer_type" in config and "f2f_thrd" in config


def load(directory: Path, dtype: torch.dtype, device_map: str | dict) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """The engine model and, when the checkpoint has it, the DFM module (without it the backend is parameter-free)."""
    checkpoint = read_checkpoint(directory, LABEL)
    query = checkpoint.shapes.get(DFM_PREFIX + "linear_q.weight")
    dfm = DFMProjection(*query) if query is not None else None
    model = load_original(checkpoint, dtype, device_map, LABEL, skipped=SKIPPED,
                          extras={DFM_PREFIX: dfm} if dfm is not None else {})
    overrides = engine_overrides(model) | {"spatial_pool_mode": checkpoint.config.get("mm_spatial_pool_mode",
                                                                                        "bilinear")}
    return model, {"dfm": dfm} if dfm is not None else {}, overrides


LAYOUT = register_layout(CheckpointLayout(name="vilamp", detect=is_vilamp_config, load=load))
