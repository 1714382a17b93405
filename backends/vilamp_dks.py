"""ViLAMP's differential keyframe selection (DKS): a relevance-ordered greedy with similarity coverage, then even
gap filling so that exactly min(K, N) frames are keyframes.

Reference: steven-ccq/ViLAMP, `llava/model/multimodal_resampler/frame_selector.py`
(`SeqFrameSelector.forward`, `SeqFrameSelector.distribute_frames`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SimilarityRow = Callable[[int], torch.Tensor]


class SummarySimilarity:
    """Cosine similarity between frame summaries, one row at a time.

    Holds only the L2-normalised summaries (N × D); `row(j)` is computed over column blocks of `block` frames, so
    10,000 frames never build the N × N matrix: memory is N·D for the summaries plus N per requested row, and the
    greedy asks for at most K rows.
    """

    def __init__(self, summaries: torch.Tensor, block: int = 4096) -> None:
        self.normed = F.normalize(summaries.float(), dim=-1)
        self.block = block

    @property
    def num_frames(self) -> int:
        return int(self.normed.shape[0])

    def row(self, j: int) -> torch.Tensor:
        """cos(summary j, summary i) for every frame i (length N)."""
        anchor = self.normed[j]
        return torch.cat([chunk @ anchor for chunk in self.normed.split(self.block)])


@dataclass(frozen=True)
class KeyframeSelection:
    """`greedy`: frames chosen by relevance, in the order chosen; `keyframes`: all keyframes, ascending."""

    greedy: np.ndarray
    keyframes: np.ndarray

    def mask(self, num_frames: int) -> np.ndarray:
        out = np.zeros(num_frames, dtype=bool)
        out[self.keyframes] = True
        return out


def greedy_keyframes(f2t: torch.Tensor, similarity_row: SimilarityRow, k: int, f2t_threshold: float,
                     f2f_threshold: float) -> list[int]:
    """Frames in descending f2t: stop at the first score strictly below the threshold or after `k` choices; skip
    frames already covered; choosing j covers every frame with f2f[j, ·] > `f2f_threshold`."""
    num_frames = int(f2t.shape[0])
    visited = torch.zeros(num_frames, dtype=torch.bool)
    order = torch.sort(f2t.float().cpu(), descending=True, stable=True)
    chosen: list[int] = []
    for score, frame in zip(order.values.tolist(), order.indices.tolist(), strict=True):
        if len(chosen) >= k or score < f2t_threshold:
            break
        if visited[frame]:
            continue
        chosen.append(frame)
        visited[frame] = True
        visited |= similarity_row(frame).cpu() > f2f_threshold
    return chosen


def unchosen_runs(selected: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs (start, end inclusive) of unselected frames."""
    runs, start = [], None
    for i, taken in enumerate(selected.tolist()):
        if not taken and start is None:
            start = i
        elif taken and start is not None:
            runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(selected) - 1))
    return runs


def _spacing(gaps: list[tuple[int, int]], free: int, num_frames: int) -> int:
    """The smallest D in [1, N] with Σ_gaps (ceil(len/D) − 1) ≤ free (binary search, as the reference)."""

    def needed(d: int) -> int:
        return sum(math.ceil((end - start + 1) / d) - 1 for start, end in gaps)

    low, high = 1, max(num_frames, 1)
    while low < high:
        mid = (low + high) // 2
        if needed(mid) <= free:
            high = mid
        else:
            low = mid + 1
    return low


def fill_gaps(selected: np.ndarray, k: int) -> np.ndarray:
    """Spread the K − chosen free slots evenly over the gaps between chosen frames; leftovers go to the END.

    In a gap of length L, with D from `_spacing`, k' = ceil(L/D) − 1 frames at start + step·(i+1),
    step = ceil(L/(k'+1)) — so a gap's first frame is never picked by the spacing. Slots the spacing leaves over are
    filled from the last frame of the video backwards (the reference's order; N=300, K=32, nothing chosen →
    10, 20, …, 290, 297, 298, 299).
    """
    out = selected.astype(bool).copy()
    free = k - int(out.sum())
    if free <= 0:
        return out
    gaps = unchosen_runs(out)
    spacing = _spacing(gaps, free, len(out))
    placed = 0
    for start, end in gaps:
        length = end - start + 1
        count = math.ceil(length / spacing) - 1
        if count <= 0:
            continue
        step = math.ceil(length / (count + 1))
        # step·count < length always holds for this D, so positions stay inside the gap (no clamping needed).
        out[[start + step * (i + 1) for i in range(count)]] = True
        placed += count
    remaining = free - placed
    for start, end in reversed(gaps):
        for pos in range(end, start - 1, -1):
            if remaining == 0:
                return out
            if not out[pos]:
                out[pos] = True
                remaining -= 1
    return out


def select_keyframes(f2t: torch.Tensor, similarity_row: SimilarityRow, k: int, f2t_threshold: float,
                     f2f_threshold: float) -> KeyframeSelection:
    """DKS: the relevance greedy, then gap filling; always min(K, N) keyframes."""
    chosen = greedy_keyframes(f2t, similarity_row, k, f2t_threshold, f2f_threshold)
    selected = np.zeros(int(f2t.shape[0]), dtype=bool)
    selected[chosen] = True
    filled = fill_gaps(selected, k)
    return KeyframeSelection(greedy=np.asarray(chosen, dtype=np.int64), keyframes=np.flatnonzero(filled))
