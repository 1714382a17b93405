"""Frame preprocessing in torch on the engine's device: resize to the checkpoint's square size, rescale, normalise."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def preprocess_frames(frames: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                      device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (T, H, W, 3) → (T, 3, size, size), bicubic with antialias as the checkpoint's processor resizes."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        pixels = pixels.clamp_(0, 255)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((pixels / 255.0 - mean_t) / std_t).to(dtype)
