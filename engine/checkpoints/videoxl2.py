"""BAAI/Video-XL-2's original checkpoint (LLaVA-style `llava_qwen`): the shared LLaVA keys (see llava_original) plus
the DTS fusion autoencoder `model.sae.*` as the extra module "dts_fusion".

Reference: VectorSpaceLab/Video-XL, Video-XL-2 `model/llava_arch.py`, `language_model/llava_qwen.py`,
`multimodal_encoder/siglip_encoder.py`. Its `model.text_mlp.*` is trained but never used at inference, and
`model.image_newline` is optional (only "unpad" merge types create it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backends.dts_fusion import DTSAutoencoder
from engine.checkpoints.llava_original import engine_overrides, load_original, read_checkpoint
from engine.checkpoints.registry import CheckpointLayout, register_layout
from engine.errors import ModelUnavailable

LABEL = "Video-XL-2"
FUSION = "model.sae."
UNUSED = ("model.text_mlp.",)  # trained, never called at inference


def is_videoxl2(config: dict) -> bool:
    """A LLaVA-Qwen config with Video-XL-2's marks: its SAE/DTS flag, its "unires" merge type, or its name."""
    if "mm_vision_tower" not in config or "composer_type" in config:  # composer_type: ViLAMP's layout
        return False
    names = " ".join(str(config.get(k, "")) for k in ("model_type", "architectures", "auto_map", "_name_or_path"))
    return "freeze_sae" in config or config.get("mm_patch_merge_type") == "unires" or "videoxl" in names.lower()


def load(directory: Path, dtype: torch.dtype, device_map: str | dict) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """The engine model and the DTS autoencoder from the original checkpoint; refuses any unmapped or missing weight."""
    checkpoint = read_checkpoint(directory, LABEL)
    encoding = checkpoint.shapes.get(FUSION + "temporal_encoding")
    if encoding is None:
        raise ModelUnavailable(f"{directory} has no DTS fusion weights (model.sae.*).")
    fusion = DTSAutoencoder(int(encoding[1]))
    # A missing newline becomes zeros: the reference never appends it to video tokens, so zeros are honest.
    model = load_original(checkpoint, dtype, device_map, LABEL, skipped=UNUSED, extras={FUSION: fusion},
                          zero_if_absent=("model.image_newline",))
    return model, {"dts_fusion": fusion}, engine_overrides(model)


LAYOUT = register_layout(CheckpointLayout(name="videoxl2", detect=is_videoxl2, load=load))
