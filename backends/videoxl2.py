"""`videoxl2`: Video-XL-2's DTS tokens (4 frames → 144 tokens, "Time t s:" markers) with chunk-based prefill and
optional bi-granularity KV.

Reference: VectorSpaceLab/Video-XL, Video-XL-2 `model/llava_arch.py` (`interpolate`, `add_video`,
`encode_multimodals`, `get_2dPool`), `language_model/llava_qwen.py` (`get_sparse_attention_mask`, the bi-level KV
part of `forward`) and `lmms_eval/models/videoxl2.py` (markers, block_size_chosed / prev_blocks_num).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from backends.base import Backend, ModelOps, Param
from backends.dts_fusion import GROUP, DTSAutoencoder, learned_fusion, parameter_free_fusion
from backends.registry import register_backend
from engine.errors import ModelUnavailable, UserFacingError
from engine.types import ChunkedPlan, FrameFeatures, VisualTokens

if TYPE_CHECKING:
    from engine.prefill import PrefillResult
    from engine.sequence import Sequence

FUSED_SIDE = 24  # the reference resizes every SigLIP map to 336 // 14 = 24 per side
POOL = 2
TOKENS_PER_GROUP = (FUSED_SIDE // POOL) ** 2
CHUNK_GROUPS = 24  # groups fused at once, as the reference does; bounds the fp32 resize and the fusion's memory
EXTRA_MODULE = "dts_fusion"
PARAMETER_FREE_NOTE = "parameter-free fusion (no Video-XL-2 DTS weights loaded): similarity-weighted frame mean"
FusionChoice = Literal["auto", "learned", "parameter-free"]


@dataclass(frozen=True)
class VideoXL2Params:
    group_size: int = field(default=GROUP, metadata={"param": Param(
        label="Frames per group", minimum=1, maximum=8, step=1,
        help="Frames fused into one 144-token map. The learned DTS module only accepts 4.")})
    block_groups: int = field(default=4, metadata={"param": Param(
        label="Groups per prefill block", minimum=1, maximum=16, step=1,
        help="Chunk-based prefill block size in groups (the authors: 4; 6 for LongVideoBench).")})
    prev_blocks: int = field(default=3, metadata={"param": Param(
        label="Previous blocks visible", minimum=0, maximum=32, step=1,
        help="Earlier blocks a block's visual tokens attend to (the authors: 3; 11 for LVBench). 0 = own block only.")})
    kv_topk: int = field(default=4, metadata={"param": Param(
        label="Dense KV blocks (top-k)", minimum=-1, maximum=64, step=1,
        help="Bi-granularity KV: the k blocks the question attends most keep full KV (with the first and last); "
             "the rest are pooled. -1 turns it off.")})
    kv_pool: int = field(default=4, metadata={"param": Param(
        label="KV pooling factor", minimum=1, maximum=16, step=1,
        help="Average-pooling factor of the visual KV of blocks that are not kept dense.")})
    fusion: FusionChoice = field(default="auto", metadata={"param": Param(
        label="Fusion", choices=("auto", "learned", "parameter-free"),
        help="auto: the learned DTS module when the checkpoint has one (and groups are 4 frames), else the "
             "parameter-free fusion.")})

    def __post_init__(self) -> None:
        if self.fusion not in ("auto", "learned", "parameter-free"):
            raise UserFacingError(f"Unknown fusion {self.fusion!r}: choose auto, learned or parameter-free.")
        for name in ("group_size", "block_groups", "kv_pool"):
            if getattr(self, name) < 1:
                raise UserFacingError(f"{name} must be at least 1.")
        if self.prev_blocks < 0 or self.kv_topk < -1:
            raise UserFacingError("prev_blocks must be ≥ 0 and kv_topk ≥ -1.")


def resize_maps(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """(T, grid², C) → (T, C, 24, 24): bilinear, align_corners False, computed in float32 as the reference does."""
    frames, _, channels = patches.shape
    maps = patches.view(frames, grid, grid, channels).permute(0, 3, 1, 2).float()
    resized = F.interpolate(maps, size=(FUSED_SIDE, FUSED_SIDE), mode="bilinear", align_corners=False)
    return resized.to(patches.dtype)


def padded_frame_index(num_frames: int, group: int) -> torch.Tensor:
    """Source frame of every padded slot: pad to a multiple of `group` by repeating the LAST frame (also T < group)."""
    total = math.ceil(num_frames / group) * group
    return torch.arange(total).clamp(max=num_frames - 1)


def average_pool_2x(tokens: torch.Tensor) -> torch.Tensor:
    """(G, 24·24, D) → (G, 144, D): 2×2 average pool over the map, row-major (the reference's get_2dPool)."""
    groups, _, dim = tokens.shape
    maps = tokens.view(groups, FUSED_SIDE, FUSED_SIDE, dim).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(maps, POOL)
    return pooled.permute(0, 2, 3, 1).reshape(groups, TOKENS_PER_GROUP, dim)


def marker_text(seconds: float) -> str:
    """The reference's marker, "Time {t}s:", t rounded to 0.1 s and printed as a Python float ("Time 12.0s:").

    The reference computes t as frame index / average fps; here t is the clip's PTS timestamp of that frame."""
    return f"Time {round(float(seconds), 1)}s:"


def group_frame_span(num_frames: int, group: int) -> torch.Tensor:
    """(G, 2): first and last REAL frame of each group (padding repeats point at the real last frame)."""
    firsts = torch.arange(0, num_frames, group)
    return torch.stack([firsts, (firsts + group - 1).clamp(max=num_frames - 1)], dim=1)


def choose_fusion(ops: ModelOps, params: VideoXL2Params) -> DTSAutoencoder | None:
    """The learned module to use, or None for the parameter-free fusion; refuses impossible combinations."""
    module = ops.extra_module(EXTRA_MODULE)
    usable = module is not None and params.group_size == GROUP
    if params.fusion == "parameter-free" or (params.fusion == "auto" and not usable):
        return None
    if module is None:
        raise ModelUnavailable("Learned DTS fusion needs a Video-XL-2 checkpoint (preset videoxl2-7b); the loaded "
                               "model has no fusion weights. Choose fusion = auto or parameter-free.")
    if params.group_size != GROUP:
        raise UserFacingError(f"The learned DTS fusion fuses exactly {GROUP} frames per group; set group size to "
                              f"{GROUP} or use the parameter-free fusion.")
    return module


@register_backend("videoxl2")
class VideoXL2(Backend):
    label = "Video-XL-2 (DTS + chunked prefill)"
    paper = "Video-XL-2: Towards Very Long-Video Understanding Through Task-Aware KV Sparsification (Qin et al., 2025)"
    paper_url = "https://arxiv.org/abs/2506.19225"
    description = ("Every 4 frames fused into one 24×24 map (DTS), projected and 2×2 average-pooled: 144 tokens per "
                   "group after a \"Time t s:\" marker. Prefilled block by block (each block sees a few previous "
                   "ones); after prefill only the blocks the question is about keep full KV.")
    about = (
        'Frames are grouped by 4 (the last frame repeated to fill a group) and fused into one 24×24 map, '
        'projected and 2×2 average-pooled: 144 tokens per 4 frames, each group after a `Time t s:` marker. The '
        'video is prefilled block by block (a block sees itself, a few previous blocks, the prefix and the '
        'markers); after prefill only the blocks the question is about keep full KV, the others are pooled. '
        'Quirks kept: the fusion module reads a raw reshape (its "time" axis runs over channels), as the released '
        'weights require; its temporal attention uses the query at the key position. Without the Video-XL-2 '
        'weights the fusion is parameter-free and labelled so.'
    )
    Params = VideoXL2Params

    def num_tokens(self, num_frames: int, grid: int, params: VideoXL2Params) -> int:
        return math.ceil(num_frames / params.group_size) * TOKENS_PER_GROUP

    def compress(self, features: FrameFeatures, question: str, ops: ModelOps,
                 params: VideoXL2Params) -> VisualTokens:
        module = choose_fusion(ops, params)
        group, frames = params.group_size, features.num_frames
        source = padded_frame_index(frames, group)
        step = CHUNK_GROUPS * group
        tokens = torch.cat([
            self._group_tokens(features.patches[source[start : start + step]], features.grid, group, module, ops)
            for start in range(0, source.numel(), step)
        ])
        groups, per_group, dim = tokens.shape
        spans = group_frame_span(frames, group)
        group_of_token = torch.arange(groups).repeat_interleave(per_group)
        block_of_frame = np.arange(frames) // group // params.block_groups
        return VisualTokens(
            embeds=tokens.reshape(groups * per_group, dim),
            frame_span=spans[group_of_token],
            markers=[(g * per_group, marker_text(features.timestamps[int(spans[g, 0])])) for g in range(groups)],
            block=group_of_token // params.block_groups,
            plan=ChunkedPlan(prev_blocks=params.prev_blocks, kv_topk=params.kv_topk, kv_pool=params.kv_pool),
            frame_marks={"block": block_of_frame.astype(np.float64)},
            notes=[PARAMETER_FREE_NOTE] if module is None else [],
        )

    @staticmethod
    def _group_tokens(patches: torch.Tensor, grid: int, group: int, module: DTSAutoencoder | None,
                      ops: ModelOps) -> torch.Tensor:
        """Padded frames' patches (group·G, grid², C) → (G, 144, D_llm): resize, fuse, project, 2×2 average pool."""
        maps = resize_maps(patches.to(ops.device), grid)
        fused = parameter_free_fusion(maps, group) if module is None else learned_fusion(module, maps)
        return average_pool_2x(ops.project(fused.to(ops.dtype)))

    def prefill_marks(self, tokens: VisualTokens, seq: Sequence, result: PrefillResult,
                      num_frames: int) -> dict[str, np.ndarray]:
        """Per-frame marks only known after prefill: "relevance" of the frame's block to the question and, with
        bi-granularity KV on, "dense" (the frame's block kept full KV in most layers)."""
        from engine.kv_plans import dense_frame_mask, frame_relevance

        marks = {"relevance": frame_relevance(result, seq, tokens, num_frames)}
        if result.dense_blocks:
            marks["dense"] = dense_frame_mask(result, tokens, num_frames)
        return marks
