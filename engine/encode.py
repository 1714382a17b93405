"""The vision tower over a Clip's frames, in bounded batches, up to the checkpoint's feature layer."""

from __future__ import annotations

import torch
from torch import nn

from engine.preprocess import preprocess_frames
from engine.types import Clip


def vision_features(vision_tower: nn.Module, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """Hidden states after `feature_layer` (python-style index into [embeddings, layer 1, …, layer L])."""
    layers = vision_tower.encoder.layers
    stop = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    hidden = vision_tower.embeddings(pixels)
    for layer in layers[:stop]:
        out = layer(hidden, None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.inference_mode()
def encode_clip(loaded, clip: Clip, batch_size: int = 16) -> torch.Tensor:
    """(T, P, D_vision) patch features; frames are preprocessed on the device one batch at a time."""
    vision_tower = loaded.model.model.vision_tower
    device = vision_tower.embeddings.patch_embedding.weight.device
    outputs = []
    for start in range(0, clip.num_frames, batch_size):
        frames = clip.frames[start : start + batch_size]
        pixels = preprocess_frames(frames, loaded.image_size, loaded.image_mean, loaded.image_std, device,
                                   loaded.dtype)
        outputs.append(vision_features(vision_tower, pixels, loaded.vision_feature_layer))
    return torch.cat(outputs)
