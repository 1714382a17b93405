"""Bipartite soft matching (ToMe, Bolya et al. 2023) as VideoChat-Flash's HiCo runs it: pure tensor functions.

Everything works on a batch of independent token sets, (B, p, C); B is the number of clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed per step to go from `num_tokens` to `target`: half of them while the rest is more than half,
    then exactly the rest (2916 → 64: 1458, 729, 364, 182, 91, 28). Empty when there is nothing to merge."""
    if target < 1:
        raise ValueError(f"the merge target must be at least 1 token, got {target}")
    steps: list[int] = []
    remaining = num_tokens
    while remaining > target:
        if remaining - target <= remaining // 2:
            steps.append(remaining - target)
            break
        steps.append(remaining // 2)
        remaining -= remaining // 2
    return steps


def head_metric(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, p, C) → (B, p, C / heads): the channels split as the vision tower's heads, averaged over the heads."""
    batch, count, channels = tokens.shape
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} heads")
    return tokens.reshape(batch, count, heads, channels // heads).mean(dim=2)


@dataclass
class Matching:
    """One matching step: per batch row, the even tokens left alone (best match first), the even tokens merged
    (`src`, indices among the even tokens) and the odd token each is merged into (`dst`, among the odd tokens)."""

    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def bipartite_match(metric: torch.Tensor, r: int) -> Matching:
    """Match every even-position token to its most cosine-similar odd-position token; the `r` best pairs merge."""
    count = metric.shape[1]
    if not 0 < r <= count // 2:
        raise ValueError(f"cannot merge {r} pairs out of {count} tokens")
    # The reference divides by the plain norm (NaN for a zero vector); the floor only guards that case.
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    best, best_odd = scores.max(dim=-1)
    # Stable sort: ties (identical tokens) go by position, so the result does not depend on the device's argsort.
    order = best.sort(dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    return Matching(unmerged=order[:, r:], src=src, dst=best_odd.gather(1, src))


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def apply_matching(tokens: torch.Tensor, sizes: torch.Tensor, match: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the matched pairs by size-weighted mean. Returns (tokens, sizes) in the reference's order: the unmerged
    even tokens in descending match score, then every odd token in its original order."""
    weighted = tokens * sizes[..., None]
    even, odd = weighted[:, ::2], weighted[:, 1::2]
    even_sizes, odd_sizes = sizes[:, ::2], sizes[:, 1::2]
    dst = match.dst[..., None]
    odd = odd.scatter_add(1, dst.expand(-1, -1, odd.shape[-1]), _gather_rows(even, match.src))
    odd_sizes = odd_sizes.scatter_add(1, match.dst, even_sizes.gather(1, match.src))
    merged = torch.cat([_gather_rows(even, match.unmerged), odd], dim=1)
    new_sizes = torch.cat([even_sizes.gather(1, match.unmerged), odd_sizes], dim=1)
    return merged / new_sizes[..., None], new_sizes


def new_positions(count: int, match: Matching) -> torch.Tensor:
    """(B, count): where each token before the step ends up after it (merged tokens: their destination's place)."""
    batch, kept_even = match.unmerged.shape
    rows = torch.arange(batch, device=match.src.device)[:, None]
    out = torch.empty(batch, count, dtype=torch.long, device=match.src.device)
    odd = torch.arange(count // 2, device=out.device)
    out[:, 1::2] = kept_even + odd
    out[rows, 2 * match.unmerged] = torch.arange(kept_even, device=out.device)
    out[rows, 2 * match.src] = kept_even + match.dst
    return out


@dataclass
class MergeResult:
    """`tokens` (B, target, C); `sizes` (B, target): how many input tokens each stands for; `owner` (B, p): the
    output token every input token ended up in."""

    tokens: torch.Tensor
    sizes: torch.Tensor
    owner: torch.Tensor


def merge_tokens(tokens: torch.Tensor, target: int, heads: int) -> MergeResult:
    """Repeated bipartite soft matching down to `target` tokens per batch row; the similarity is recomputed from the
    merged tokens at every step, sizes are carried across steps (VideoChat-Flash `ToMe16_mlp_hd64.merge_tokens`)."""
    batch, count, _ = tokens.shape
    sizes = torch.ones(batch, count, dtype=tokens.dtype, device=tokens.device)
    owner = torch.arange(count, device=tokens.device).expand(batch, count)
    for r in merge_schedule(count, target):
        match = bipartite_match(head_metric(tokens, heads), r)
        owner = new_positions(tokens.shape[1], match).gather(1, owner)
        tokens, sizes = apply_matching(tokens, sizes, match)
    return MergeResult(tokens=tokens, sizes=sizes, owner=owner)
