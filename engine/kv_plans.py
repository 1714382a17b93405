"""Video-XL-2's bi-granularity KV: after a chunked prefill, per layer, the blocks the question is about keep full KV
and every other block keeps its visual KV average-pooled along the sequence (marker entries kept).

Reference: VectorSpaceLab/Video-XL, Video-XL-2 `w_chunk_bilevel/.../llava_qwen.py` (`forward`, `pooling_kvs`).
Differences, on purpose: the reference reads the relevant 8-frame units from files precomputed with an external
model (LanguageBind) and uses one selection for all layers; here relevance is the question's own attention in each
layer during prefill, so each layer picks its own top-k blocks. The reference re-runs the question at positions
renumbered to the mixed cache's length; layers differ in length here, so every entry keeps its original position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import AttentionProbe
from engine.kv_cache import ArenaCache
from engine.prefill import LayerRunner, PrefillResult, _run_question
from engine.sequence import MARKER, PREFIX, VISUAL, Sequence
from engine.types import ChunkedPlan, VisualTokens


@dataclass
class BigranularResult(PrefillResult):
    """A PrefillResult whose cache holds mixed-granularity KV; `block_relevance` is (layers × blocks), the
    question's attention summed over each block's visual positions, as used to pick the dense blocks."""

    block_relevance: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))


def video_blocks(seq: Sequence) -> torch.Tensor:
    """Sorted ids of the prefill blocks that hold visual tokens."""
    return torch.unique(seq.block[seq.kind == VISUAL])


def block_relevance(probe: AttentionProbe, seq: Sequence, blocks: torch.Tensor) -> torch.Tensor:
    """(layers × blocks): per layer, the question rows' mean attention summed over each block's visual positions."""
    visual = (seq.kind == VISUAL).nonzero().flatten()
    slot = torch.searchsorted(blocks, seq.block[visual])
    rows = []
    for scores in probe.mean_rows:
        per_block = torch.zeros(blocks.numel())
        if scores is not None:
            per_block.index_add_(0, slot, scores.detach().cpu().float()[visual])
        rows.append(per_block)
    return torch.stack(rows)


def choose_dense(relevance: torch.Tensor, blocks: torch.Tensor, topk: int) -> torch.Tensor:
    """The first and last video blocks plus the `topk` most relevant ones (the reference's [0, 1, last] ∪ selected,
    its index 0 being the prefix, which is never pooled here either)."""
    top = torch.topk(relevance, min(topk, blocks.numel())).indices
    chosen = torch.cat([blocks[:1], blocks[-1:], blocks[top]])
    return torch.unique(chosen)


def pooling_windows(seq: Sequence, pool: int) -> dict[int, torch.Tensor]:
    """Per block: (W × pool) positions of the windows its visual KV is averaged over.

    Windows run over consecutive visual tokens and never cross a marker or a block edge (the reference pools each
    group's tokens between two timestamps); a run's last len % pool tokens are dropped, as `avg_pool1d` does there.
    """
    visual = seq.kind == VISUAL
    positions = visual.nonzero().flatten()
    if positions.numel() == 0:
        return {}
    breaks = (positions[1:] != positions[:-1] + 1) | (seq.block[positions[1:]] != seq.block[positions[:-1]])
    starts = torch.cat([torch.tensor([0]), breaks.nonzero().flatten() + 1])
    ends = torch.cat([starts[1:], torch.tensor([positions.numel()])])
    windows: dict[int, list[torch.Tensor]] = {}
    for start, end in zip(starts.tolist(), ends.tolist()):
        usable = (end - start) // pool * pool
        run = positions[start : start + usable].view(-1, pool)
        windows.setdefault(int(seq.block[positions[start]]), []).append(run)
    return {block: torch.cat(runs) for block, runs in windows.items()}


def _kept_positions(seq: Sequence, dense: torch.Tensor) -> torch.Tensor:
    """Prefix, every marker, and the visual tokens of dense blocks (the video part only; the question is re-run)."""
    kind, block = seq.kind[: seq.question_start], seq.block[: seq.question_start]
    keep = (kind == PREFIX) | (kind == MARKER) | ((kind == VISUAL) & torch.isin(block, dense))
    return keep.nonzero().flatten()


def rebuild_layer(cache: ArenaCache, layer: int, seq: Sequence, dense: torch.Tensor,
                  windows: dict[int, torch.Tensor]) -> torch.Tensor:
    """Swap `layer`'s entries for the mixed set; returns the (W × pool) windows that were pooled."""
    keys, values = cache.layer_kv(layer)
    positions, spans = cache.positions(layer), cache.spans(layer)
    entry_of = torch.full((seq.length,), -1, dtype=torch.long)
    entry_of[positions.cpu()] = torch.arange(positions.numel())
    dense_ids = set(dense.tolist())
    sparse = [w for block, w in windows.items() if block not in dense_ids]
    pooled = torch.cat(sparse) if sparse else torch.zeros(0, 1, dtype=torch.long)
    keep = entry_of[_kept_positions(seq, dense)]
    members = entry_of[pooled]
    if (keep < 0).any() or (members < 0).any():
        raise ValueError("bi-granularity KV needs the full-resolution cache of a chunked prefill")
    device = keys.device
    keep, members = keep.to(device), members.to(device)
    batch, heads = keys.shape[:2]

    def mix(tensor: torch.Tensor) -> torch.Tensor:
        means = tensor[:, :, members.flatten()].view(batch, heads, *members.shape, tensor.shape[-1])
        return torch.cat([tensor[:, :, keep], means.float().mean(dim=3).to(tensor.dtype)], dim=2)

    new_pos = torch.cat([positions[keep], pooled[:, 0].to(positions.device)])
    new_span = torch.cat([spans[keep], torch.full((pooled.shape[0],), pooled.shape[1], device=spans.device)])
    order = new_pos.argsort().to(device)
    cache.replace_layer(layer, mix(keys)[:, :, order], mix(values)[:, :, order], new_pos[order.to(new_pos.device)],
                        new_span[order.to(new_span.device)])
    return pooled


def _spread_pooled(scores: torch.Tensor | None, pooled: torch.Tensor) -> None:
    """A pooled entry's attention, recorded at its first position, shared evenly by the tokens it stands for."""
    if scores is None or pooled.numel() == 0:
        return
    pooled = pooled.to(scores.device)
    share = scores[pooled[:, 0]] / pooled.shape[1]
    scores[pooled.flatten()] = share.repeat_interleave(pooled.shape[1])


def apply_bigranular_kv(runner: LayerRunner, seq: Sequence, plan: ChunkedPlan,
                        result: PrefillResult) -> PrefillResult:
    """Mix the cache's granularity per layer, drop the question's K/V and re-run the question over the mixed cache."""
    blocks = video_blocks(seq)
    if blocks.numel() == 0:
        return result
    cache = result.cache
    relevance = block_relevance(result.probe, seq, blocks)
    dense = [choose_dense(relevance[layer], blocks, plan.kv_topk) for layer in range(runner.num_layers)]
    windows = pooling_windows(seq, plan.kv_pool)
    cache.truncate([int((cache.positions(layer) < seq.question_start).sum()) for layer in range(cache.num_layers)])
    pooled = [rebuild_layer(cache, layer, seq, dense[layer], windows) for layer in range(cache.num_layers)]
    probe = AttentionProbe(runner.num_layers, seq.length, seq.question_start)
    hidden = _run_question(runner, seq, cache, probe)
    for layer, windows_pooled in enumerate(pooled):
        _spread_pooled(probe.mean_rows[layer], windows_pooled)
        _spread_pooled(probe.last_row[layer], windows_pooled)
    return BigranularResult(hidden[-1], cache, probe, result.next_position, survivors=result.survivors,
                            dense_blocks=dense, block_relevance=relevance)


def _block_of_frame(tokens: VisualTokens, num_frames: int) -> np.ndarray:
    """The (first) prefill block each sampled frame's tokens belong to; -1 for frames without tokens."""
    out = np.full(num_frames, -1)
    valid = tokens.frame_span[:, 0] >= 0
    spans = torch.unique(torch.cat([tokens.frame_span[valid], tokens.block[valid, None]], dim=1), dim=0)
    for first, last, block in spans.tolist():
        span = out[first : last + 1]
        span[span < 0] = block
    return out


def _num_frames(tokens: VisualTokens, num_frames: int | None) -> int:
    if num_frames is not None:
        return num_frames
    return int(tokens.frame_span.max()) + 1 if tokens.num_tokens else 0


def dense_frame_mask(result: PrefillResult, tokens: VisualTokens, num_frames: int | None = None) -> np.ndarray:
    """1 for frames whose block kept full KV in more than half of the layers, else 0 (per sampled frame)."""
    num_frames = _num_frames(tokens, num_frames)
    blocks = _block_of_frame(tokens, num_frames)
    if not result.dense_blocks:
        return np.ones(num_frames)
    votes = np.zeros(num_frames)
    for dense in result.dense_blocks:
        votes += np.isin(blocks, dense.cpu().numpy())
    return (votes > len(result.dense_blocks) / 2).astype(np.float64)


def frame_relevance(result: PrefillResult, seq: Sequence, tokens: VisualTokens,
                    num_frames: int | None = None) -> np.ndarray:
    """Each frame's block relevance (the question's attention to the block, mean over layers, blocks sum to 1)."""
    num_frames = _num_frames(tokens, num_frames)
    blocks = video_blocks(seq)
    relevance = getattr(result, "block_relevance", None)
    if relevance is None or relevance.numel() == 0:
        relevance = block_relevance(result.probe, seq, blocks)
    per_block = relevance.mean(dim=0)
    per_block = per_block / per_block.sum() if per_block.sum() > 0 else per_block
    frame_block = _block_of_frame(tokens, num_frames)
    slot = np.searchsorted(blocks.numpy(), frame_block)
    values = per_block.numpy()[np.clip(slot, 0, max(blocks.numel() - 1, 0))] if blocks.numel() else np.zeros(0)
    return np.where(frame_block >= 0, values, 0.0).astype(np.float64)
