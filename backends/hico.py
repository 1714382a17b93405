"""`hico`: VideoChat-Flash / InternVideo2.5 HiCo — clip-level token merging, then video-level token dropping.

Clip level (parameter-free): the vision features of 4 consecutive frames, concatenated frame-major, are merged by
repeated bipartite soft matching (backends/tome.py) to 16 tokens per frame BEFORE the projector, as the authors'
`tome16_mlp_hd64` projector does. Video level: the backend asks the engine for a TokenDropPlan: inside the LLM, at
chosen layers, only the visual tokens the last prompt token attends most survive (the authors' `flash_rank_drop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from backends.base import Backend, ModelOps, Param
from backends.registry import register_backend
from backends.tome import merge_tokens
from engine.types import DensePlan, FrameFeatures, PrefillPlan, TokenDropPlan, VisualTokens

# Drop layers are given for the authors' 28-layer Qwen2-7B; the engine maps them to the loaded model's depth.
REFERENCE_DEPTH = 28
# Clips merged per batch: bounds the (clips × p/2 × p/2) similarity matrices of the first step (~8 MB per clip).
CLIPS_PER_BATCH = 16


def parse_list(text: str, kind: type) -> tuple:
    """"8,16,24" → (8, 16, 24)."""
    return tuple(kind(part) for part in text.replace(" ", "").split(",") if part)


@dataclass(frozen=True)
class HiCoParams:
    tokens_per_frame: int = field(default=16, metadata={"param": Param(
        label="Tokens per frame", minimum=1, maximum=64, step=1,
        help="Each clip is merged to this many tokens × its frames (the authors' checkpoints: 16).")})
    clip_frames: int = field(default=4, metadata={"param": Param(
        label="Frames per clip", minimum=1, maximum=16, step=1,
        help="Frames whose patches are merged together (the authors' mm_local_num_frames: 4).")})
    drop: bool = field(default=True, metadata={"param": Param(
        label="Video-level token dropping",
        help="Drop the least-attended visual tokens inside the LLM. The authors' evaluation wrapper "
             "(lmms-eval videochat_flash.py) ships with it off.")})
    drop_layers: str = field(default="8,16,24", metadata={"param": Param(
        label="Drop at layers (of 28)", choices=("8,16,24", "24", "16"),
        help="LLM layers (counted for a 28-layer model, scaled to the loaded one) from which fewer tokens run.")})
    drop_ratios: str = field(default="0.5,0.25,0.125", metadata={"param": Param(
        label="Keep ratios", choices=("0.5,0.25,0.125", "0.5", "0.25"),
        help="Share of the ORIGINAL visual tokens kept from each drop layer on; one ratio per layer.")})
    uniform_first: bool = field(default=False, metadata={"param": Param(
        label="Uniform first drop",
        help="The first drop keeps evenly spaced tokens instead of the most attended (the authors' "
             "'uniform0_attention').")})

    def __post_init__(self) -> None:
        layers, ratios = parse_list(self.drop_layers, int), parse_list(self.drop_ratios, float)
        if self.tokens_per_frame < 1 or self.clip_frames < 1:
            raise ValueError("tokens per frame and frames per clip must be at least 1")
        if self.drop and len(layers) != len(ratios):
            raise ValueError(f"{len(layers)} drop layers ({self.drop_layers}) need as many keep ratios, "
                             f"got {len(ratios)} ({self.drop_ratios})")
        if self.drop and not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"keep ratios must be in (0, 1], got {self.drop_ratios}")


def clip_tokens(grid: int, params: HiCoParams) -> int:
    """Tokens one clip is merged to: the target, or all its patches when it has fewer."""
    return min(params.clip_frames * grid * grid, params.tokens_per_frame * params.clip_frames)


def drop_plan(params: HiCoParams) -> PrefillPlan:
    if not params.drop:
        return DensePlan()
    return TokenDropPlan(layers=parse_list(params.drop_layers, int), ratios=parse_list(params.drop_ratios, float),
                         uniform_first=params.uniform_first)


def pad_to_clips(patches: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """(T, P, D) → (ceil(T / clip_frames), clip_frames · P, D), frame-major within a clip.

    The last clip is filled by repeating the last frame: the authors' sampler (video_utils.get_frame_indices) only
    hands their model whole clips and pads a short video with its last frame the same way.
    """
    frames, per_frame, dim = patches.shape
    clips = math.ceil(frames / clip_frames)
    missing = clips * clip_frames - frames
    if missing:
        patches = torch.cat([patches, patches[-1:].expand(missing, per_frame, dim)])
    return patches.reshape(clips, clip_frames * per_frame, dim)


def frame_merge_marks(owner: torch.Tensor, sizes: torch.Tensor, clip_frames: int, num_frames: int
                      ) -> dict[str, np.ndarray]:
    """Per sampled frame: `effective_tokens` = Σ over its patches of 1 / size of the token the patch ended in (how
    many of its clip's tokens the frame's content holds; a clip's frames sum to its token count) and `merge_size` =
    mean size of those tokens (large: its content was redundant). Padding copies count for the last frame."""
    clips, count = owner.shape
    per_frame = count // clip_frames
    size_of_patch = sizes.gather(1, owner).float().cpu()
    slot = torch.arange(clips * clip_frames).clamp_max(num_frames - 1)
    share = (1.0 / size_of_patch).view(clips * clip_frames, per_frame).sum(dim=1)
    size_sum = size_of_patch.view(clips * clip_frames, per_frame).sum(dim=1)
    patches = torch.full((clips * clip_frames,), float(per_frame))
    zeros = torch.zeros(num_frames)
    effective = zeros.index_add(0, slot, share)
    mean_size = zeros.index_add(0, slot, size_sum) / zeros.index_add(0, slot, patches)
    return {"effective_tokens": effective.numpy(), "merge_size": mean_size.numpy()}


def frame_survivors(survivors: list[torch.Tensor], frame_span: torch.Tensor, num_frames: int) -> np.ndarray:
    """(stages, T): visual tokens still in the LLM per frame after each drop stage (`PrefillResult.survivors`),
    each token counted in equal shares over the frames it stands for."""
    frames = torch.arange(num_frames)
    first, last = frame_span[:, 0:1], frame_span[:, 1:2]
    inside = ((frames >= first) & (frames <= last) & (first >= 0)).float()
    per_token = inside / inside.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.stack([per_token[kept.cpu()].sum(dim=0) for kept in survivors]).numpy()


@register_backend("hico")
class HiCo(Backend):
    label = "HiCo (VideoChat-Flash / InternVideo2.5)"
    paper = "VideoChat-Flash: Hierarchical Compression for Long-Context Video Modeling (Li et al., 2025)"
    paper_url = "https://arxiv.org/abs/2501.00574"
    description = ("Clips of 4 frames merged by token similarity (ToMe) to 16 tokens per frame before the projector; "
                   "inside the LLM the least-attended visual tokens are dropped at layers 8/16/24 (of 28).")
    about = (
        'Clips of 4 frames are merged by bipartite soft matching (ToMe, size-weighted) before the projector, down '
        'to 16 tokens per frame; inside the language model the least-attended visual tokens are dropped at chosen '
        "layers (PyramidDrop-style). Quirk kept: a clip's merged tokens come out as the unmerged tokens of one "
        "side in descending match score, then the other side's tokens in their original order, as the authors' "
        'code emits them.'
    )
    Params = HiCoParams

    def num_tokens(self, num_frames: int, grid: int, params: HiCoParams) -> int:
        return math.ceil(num_frames / params.clip_frames) * clip_tokens(grid, params)

    def prefill_marks(self, tokens: VisualTokens, seq: object, result: object, num_frames: int) -> dict:
        """"surviving_tokens_last_stage": visual tokens per frame still in the LLM after the last drop."""
        survivors = getattr(result, "survivors", None)
        if not survivors or len(survivors) < 2:
            return {}
        table = frame_survivors(survivors, tokens.frame_span, num_frames)
        return {"surviving_tokens_last_stage": table[-1], "surviving_tokens_first_stage": table[1]}

    def compress(self, features: FrameFeatures, question: str, ops: ModelOps, params: HiCoParams) -> VisualTokens:
        num_frames = features.num_frames
        clips = pad_to_clips(features.patches, params.clip_frames)
        target = params.tokens_per_frame * params.clip_frames
        merged, owners, sizes = [], [], []
        for start in range(0, clips.shape[0], CLIPS_PER_BATCH):
            # float32: the size-weighted sums and the similarity ranking should not depend on the tower's bf16.
            batch = clips[start : start + CLIPS_PER_BATCH].to(ops.device, torch.float32)
            result = merge_tokens(batch, target, ops.vision_heads)
            merged.append(result.tokens)
            owners.append(result.owner)
            sizes.append(result.sizes)
        tokens = torch.cat(merged)
        per_clip = tokens.shape[1]
        # No newline token after the video: the authors' video path runs with mm_newline_position "nothing".
        projected = ops.project(tokens.to(ops.dtype))
        embeds = projected.reshape(-1, projected.shape[-1])
        clip_of_token = torch.arange(tokens.shape[0]).repeat_interleave(per_clip)
        first = clip_of_token * params.clip_frames
        span = torch.stack([first, (first + params.clip_frames - 1).clamp_max(num_frames - 1)], dim=1)
        plan = drop_plan(params)
        notes = [("Clip merging is parameter-free (ToMe); the projector is the loaded model's, which was not trained "
                  "on merged tokens.")]
        if isinstance(plan, TokenDropPlan):
            notes.append(f"Visual tokens dropped inside the LLM from layers {params.drop_layers} of "
                         f"{REFERENCE_DEPTH} (scaled to the model), keeping {params.drop_ratios} of them.")
        return VisualTokens(
            embeds=embeds, frame_span=span, plan=plan, notes=notes,
            frame_marks=frame_merge_marks(torch.cat(owners).cpu(), torch.cat(sizes).cpu(), params.clip_frames,
                                          num_frames),
        )
