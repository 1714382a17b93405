"""The plain dataclasses that flow through the pipeline: Clip → FrameFeatures → VisualTokens → Answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """How frames are sampled from a video: `fps` per second, at most `max_frames` (uniform when capped)."""

    fps: float = 1.0
    max_frames: int = 64
    max_fps: float = 4.0


@dataclass(frozen=True)
class VideoMeta:
    path_name: str
    duration_s: float
    avg_fps: float
    num_frames: int
    width: int
    height: int
    rotation: int
    decoder: str


@dataclass
class Clip:
    """Sampled frames (uint8, T×H×W×3, upright), their PTS timestamps in seconds and the source's metadata."""

    frames: np.ndarray
    timestamps: np.ndarray
    frame_indices: np.ndarray
    meta: VideoMeta
    content_hash: str
    sampling: Sampling

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class FrameFeatures:
    """The vision tower's per-frame patch features (T × P × D_vision), before the projector."""

    patches: torch.Tensor
    grid: int
    timestamps: np.ndarray
    cache_key: str

    @property
    def num_frames(self) -> int:
        return int(self.patches.shape[0])


@dataclass(frozen=True)
class DensePlan:
    """Plain causal prefill (in sequence chunks of bounded size)."""

    kind: Literal["dense"] = "dense"


@dataclass(frozen=True)
class ChunkedPlan:
    """Video-XL-2 chunked prefill: visual tokens see their block, `prev_blocks` earlier blocks, the prefix, markers.

    `kv_topk` ≥ 0 turns on bi-granularity KV after prefill: the prefix, the first and last video blocks and the
    `kv_topk` most question-relevant blocks stay dense; every other block's visual KV is average-pooled `kv_pool`×.
    """

    prev_blocks: int = 3
    kv_topk: int = -1
    kv_pool: int = 4
    kind: Literal["chunked"] = "chunked"


@dataclass(frozen=True)
class TokenDropPlan:
    """PyramidDrop-style: from layer `layers[i]` on (ranked by that layer's attention), keep `ratios[i]` of the
    original visual tokens."""

    layers: tuple[int, ...]
    ratios: tuple[float, ...]
    uniform_first: bool = False
    kind: Literal["drop"] = "drop"


PrefillPlan = DensePlan | ChunkedPlan | TokenDropPlan


@dataclass
class VisualTokens:
    """What a backend hands the LLM.

    `embeds` (N × D_llm) in sequence order; `frame_span[i] = (first, last)` sampled-frame indices token i stands for
    (-1, -1 for none); `block[i]` the prefill block of token i (ChunkedPlan); `markers` are (token index, text):
    the text goes right before that token; `frame_marks` are the backend's own per-frame values for the UI.
    """

    embeds: torch.Tensor
    frame_span: torch.Tensor
    markers: list[tuple[int, str]] = field(default_factory=list)
    block: torch.Tensor | None = None
    plan: PrefillPlan = field(default_factory=DensePlan)
    frame_marks: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class StageProbe:
    """Wall time and memory of one pipeline stage; `memory_kind` says which counter the bytes come from."""

    name: str
    seconds: float
    peak_bytes: int
    memory_kind: Literal["cuda_peak", "cpu_rss"]


@dataclass
class Answer:
    text: str
    backend: str
    frame_attention: np.ndarray
    token_attention: np.ndarray
    stages: list[StageProbe]
    num_frames: int
    num_visual_tokens: int
    prompt_tokens: int
    new_tokens: int
    frame_marks: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict[str, object] = field(default_factory=dict)
