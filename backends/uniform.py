"""`uniform`: LLaVA-OneVision's own video path — projector, 2×2 bilinear pooling, one newline token at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.base import Backend, ModelOps
from backends.registry import register_backend
from engine.types import DensePlan, FrameFeatures, VisualTokens


def bilinear_pool_2x(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(T, grid², D) → (T, ceil(grid/2)², D), bilinear as LLaVA-OneVision's `apply_pooling` (align_corners False)."""
    frames, _, dim = tokens.shape
    maps = tokens.view(frames, grid, grid, dim).permute(0, 3, 1, 2)
    side = math.ceil(grid / 2)
    pooled = F.interpolate(maps, size=(side, side), mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, side * side, dim)


@dataclass(frozen=True)
class UniformParams:
    pass


@register_backend("uniform")
class Uniform(Backend):
    label = "Uniform (LLaVA-OneVision)"
    paper = "LLaVA-OneVision: Easy Visual Task Transfer (Li et al., 2024)"
    paper_url = "https://arxiv.org/abs/2408.03326"
    description = "Every sampled frame, projected and 2×2 bilinear-pooled (196 tokens/frame at 384 px); the baseline."
    about = (
        'Every sampled frame goes through the projector and a 2×2 bilinear pool (27×27 → 14×14 = 196 tokens per '
        'frame at 384 px); one learned newline token closes the video. Nothing is dropped: the reference point '
        'for every ratio on this page.'
    )
    Params = UniformParams

    def num_tokens(self, num_frames: int, grid: int, params: UniformParams) -> int:
        return num_frames * math.ceil(grid / 2) ** 2 + 1

    def compress(self, features: FrameFeatures, question: str, ops: ModelOps, params: UniformParams) -> VisualTokens:
        projected = ops.project(features.patches.to(ops.device, ops.dtype))
        pooled = bilinear_pool_2x(projected, features.grid)
        frames, per_frame, dim = pooled.shape
        embeds = torch.cat([pooled.reshape(frames * per_frame, dim), ops.image_newline()[None].to(pooled.dtype)])
        frame_of_token = torch.arange(frames).repeat_interleave(per_frame)
        span = torch.stack([frame_of_token, frame_of_token], dim=1)
        span = torch.cat([span, torch.tensor([[-1, -1]])])
        return VisualTokens(embeds=embeds, frame_span=span, plan=DensePlan())
