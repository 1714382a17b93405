"""Which moments of a video to sample, and which decoded frames show them.

Pure numpy, no engine imports at run time: the decode worker process imports this without loading torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.types import Sampling

# Float noise in duration × rate (0.3 s × 10 fps = 3.0000000000000004) must not add a frame.
_COUNT_SLACK = 1e-6
# Target times and frame times come from different arithmetic; a frame this close counts as "at" the target.
_TIME_SLACK_S = 1e-6


def sample_rate(duration_s: float, sampling: Sampling) -> float:
    """Frames per second actually used: `fps`, raised toward `max_fps` for short videos, lowered to cap the count."""
    if not sampling.fps > 0 or sampling.max_frames < 1:
        raise ValueError(f"invalid sampling {sampling}: fps must be > 0 and max_frames ≥ 1")
    if duration_s * sampling.fps > sampling.max_frames:
        return sampling.max_frames / duration_s
    # Video-XL-2's loader: a short video is sampled faster (up to max_fps) so it still fills the frame budget.
    return max(sampling.fps, min(sampling.max_fps, sampling.max_frames / duration_s))


def sample_times(duration_s: float, sampling: Sampling) -> np.ndarray:
    """Target times in seconds from the video's start: k / rate for k = 0, 1, … while < duration, ≤ max_frames.

    When `fps` would exceed `max_frames`, the rate becomes max_frames / duration, i.e. `max_frames` times spread
    uniformly over the whole video. A video with no measurable duration (a single frame) gives [0.0].
    """
    if not math.isfinite(duration_s):
        raise ValueError(f"duration must be finite, got {duration_s}")
    if duration_s <= 0:
        return np.zeros(1)
    rate = sample_rate(duration_s, sampling)
    count = min(sampling.max_frames, max(1, math.ceil(duration_s * rate - _COUNT_SLACK)))
    return np.arange(count) / rate


def frames_at(times_s: np.ndarray, frame_times_s: np.ndarray) -> np.ndarray:
    """Indices of the frames on screen at `times_s` (the last frame whose PTS ≤ t), ascending and deduplicated.

    `frame_times_s` are the frames' presentation times, ascending. "On screen" rather than "nearest" so a sample
    never shows a moment that comes after its time stamp, which matters for variable-frame-rate files where one
    frame can be held for seconds; a time before the first frame maps to frame 0.
    """
    idx = np.searchsorted(frame_times_s, np.asarray(times_s) + _TIME_SLACK_S, side="right") - 1
    return np.unique(np.clip(idx, 0, len(frame_times_s) - 1))
