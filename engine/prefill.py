"""Prefill plans as small functions over the language model's decoder layers and an ArenaCache.

Every plan ends by running the question as its own chunk with an AttentionProbe attached, so the video part
runs through SDPA/flash only, and returns the hidden state of the last question token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention import AttentionProbe, AttnSpec
from engine.kv_cache import ArenaCache
from engine.sequence import MARKER, PREFIX, QUESTION, VISUAL, Sequence
from engine.types import ChunkedPlan, DensePlan, PrefillPlan, TokenDropPlan

DEFAULT_CHUNK = 4096
# On CPU a later chunk needs an explicit causal mask, which SDPA runs slowly; memory is not the constraint there.
CPU_CHUNK = 1 << 17


def chunk_for(hidden: torch.Tensor) -> int:
    return DEFAULT_CHUNK if hidden.is_cuda else CPU_CHUNK


class LayerRunner:
    """The language model's pieces, run layer by layer (works on a model sharded across devices)."""

    def __init__(self, model: torch.nn.Module) -> None:
        language_model = model.model.language_model
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.embed_tokens = language_model.embed_tokens
        self.lm_head = model.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, ids: list[int]) -> torch.Tensor:
        weight = self.embed_tokens.weight
        return self.embed_tokens(torch.tensor(ids, dtype=torch.long, device=weight.device))

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, cache: ArenaCache, layers: range,
            key_index: torch.Tensor | None = None, full_rows: torch.Tensor | None = None,
            probe: AttentionProbe | None = None, rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run rows `hidden` (q × D) at original `positions` through `layers`, writing their K/V to `cache`.

        RoPE uses `rope_positions` when given, else `positions` less the layer's `cache.rope_shift`."""
        x = hidden[None]
        cache.write_positions = positions
        spec = AttnSpec(cache=cache, query_pos=positions, key_index=key_index, full_rows=full_rows, probe=probe)
        rotary: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for index in layers:
            layer = self.layers[index]
            device = layer.input_layernorm.weight.device
            x = x.to(device)
            shift = 0 if rope_positions is not None else cache.rope_shift[index]
            if shift not in rotary:
                rope = (positions - shift if rope_positions is None else rope_positions)[None].to(device)
                rotary[shift] = (*self.rotary(x, rope), rope)
            cos, sin, position_ids = (t.to(device) for t in rotary[shift])
            out = layer(x, attention_mask=spec, position_embeddings=(cos, sin), past_key_values=cache,
                        position_ids=position_ids)
            x = out[0] if isinstance(out, tuple) else out
        return x[0]

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        device = self.lm_head.weight.device
        return self.lm_head(self.norm(last_hidden.to(self.norm.weight.device)).to(device)).float()


@dataclass
class PrefillResult:
    last_hidden: torch.Tensor
    cache: ArenaCache
    probe: AttentionProbe
    next_position: int
    survivors: list[torch.Tensor] = field(default_factory=list)
    dense_blocks: list[torch.Tensor] = field(default_factory=list)


def _chunks(start: int, stop: int, size: int) -> list[range]:
    return [range(a, min(a + size, stop)) for a in range(start, stop, size)]


def _run_question(runner: LayerRunner, seq: Sequence, cache: ArenaCache, probe: AttentionProbe | None,
                  layers: range | None = None) -> torch.Tensor:
    rows = torch.arange(seq.question_start, seq.length)
    return runner.run(seq.embeds[rows], rows, cache, layers or range(runner.num_layers), probe=probe)


def dense_prefill(runner: LayerRunner, seq: Sequence, chunk: int | None = None) -> PrefillResult:
    """Plain causal prefill of prefix + video in chunks of `chunk` tokens, then the probed question."""
    chunk = chunk or chunk_for(seq.embeds)
    cache = ArenaCache(runner.num_layers, reserve=seq.length + 256)
    probe = AttentionProbe(runner.num_layers, seq.length, seq.question_start)
    everything = range(runner.num_layers)
    for rows in _chunks(0, seq.question_start, chunk):
        idx = torch.arange(rows.start, rows.stop)
        runner.run(seq.embeds[idx], idx, cache, everything)
    hidden = _run_question(runner, seq, cache, probe)
    return PrefillResult(hidden[-1], cache, probe, seq.length)


def scaled_layers(layers: tuple[int, ...], reference_depth: int, depth: int) -> list[int]:
    """Drop layers given for a `reference_depth`-layer model, mapped to one of `depth` layers."""
    scaled = sorted({min(depth - 1, max(0, round(layer * depth / reference_depth))) for layer in layers})
    return scaled


def _keep_visual(scores: torch.Tensor, visual_rows: torch.Tensor, count: int, uniform: bool) -> torch.Tensor:
    if uniform:
        # An integer linspace truncates, as the reference's 'uniform' stage does.
        picks = torch.linspace(0, visual_rows.numel() - 1, count, dtype=torch.long)
        return visual_rows[picks]
    top = torch.topk(scores[visual_rows], count).indices
    return visual_rows[top.sort().values]


def _run_kept(runner: LayerRunner, seq: Sequence, hidden: torch.Tensor, kept: torch.Tensor, cache: ArenaCache,
              layers: range, probe: AttentionProbe, chunk: int) -> torch.Tensor:
    """Run the surviving rows (original positions `kept`) through `layers` at compacted RoPE positions."""
    q_from = int((kept < seq.question_start).sum())
    rope = torch.arange(kept.numel())
    outputs = [runner.run(hidden[r.start:r.stop], kept[r.start:r.stop], cache, layers,
                          rope_positions=rope[r.start:r.stop]) for r in _chunks(0, q_from, chunk)]
    outputs.append(runner.run(hidden[q_from:], kept[q_from:], cache, layers, probe=probe,
                              rope_positions=rope[q_from:]))
    return torch.cat([o.to(hidden.device) for o in outputs])


def drop_prefill(runner: LayerRunner, seq: Sequence, plan: TokenDropPlan, reference_depth: int = 28,
                 chunk: int | None = None) -> PrefillResult:
    """VideoChat-Flash's `flash_rank_drop` (PyramidDrop): from each drop layer L on, only the top `ratios[i]` of the
    ORIGINAL visual tokens run, ranked by layer L's attention from the last prompt token over its whole input.
    Survivors continue at compacted RoPE positions, as the reference recomputes position ids after a drop."""
    chunk = chunk or chunk_for(seq.embeds)
    depth = runner.num_layers
    drop_at = scaled_layers(plan.layers, reference_depth, depth)[: len(plan.ratios)]
    cache = ArenaCache(depth, reserve=seq.length + 256)
    probe = AttentionProbe(depth, seq.length, seq.question_start)
    kept, hidden = torch.arange(seq.length), seq.embeds
    n_visual = int((seq.kind == VISUAL).sum())
    survivors = [seq.visual_index[seq.kind == VISUAL]]
    start = 0
    for stage, layer in enumerate(drop_at):
        hidden = _run_kept(runner, seq, hidden, kept, cache, range(start, layer), probe, chunk)
        # Only layer L's attention is needed to rank: run it on the full rows, forget its K/V, re-run it on the
        # survivors below (the reference computes that attention from layer L's q/k projections alone).
        _run_kept(runner, seq, hidden, kept, cache, range(layer, layer + 1), probe, chunk)
        cache.truncate([0 if index == layer else length for index, length in enumerate(cache.lengths)])
        kinds = seq.kind[kept]
        visual_rows = (kinds == VISUAL).nonzero().flatten()
        # int(), not round(): the reference keeps int(N · ratio) of the N original visual tokens.
        count = min(visual_rows.numel(), max(1, int(plan.ratios[stage] * n_visual)))
        scores = probe.last_row[layer][kept.to(probe.last_row[layer].device)].cpu()
        chosen = _keep_visual(scores, visual_rows, count, plan.uniform_first and stage == 0)
        keep_mask = kinds != VISUAL
        keep_mask[chosen] = True
        kept, hidden = kept[keep_mask], hidden[keep_mask.to(hidden.device)]
        survivors.append(seq.visual_index[kept[seq.kind[kept] == VISUAL]])
        for later in range(layer, depth):
            cache.rope_shift[later] = seq.length - kept.numel()
        start = layer
    hidden = _run_kept(runner, seq, hidden, kept, cache, range(start, depth), probe, chunk)
    return PrefillResult(hidden[-1], cache, probe, seq.length, survivors=survivors)


def chunk_key_index(seq: Sequence, block: int, prev_blocks: int, end: int) -> torch.Tensor:
    """Cache entries (= positions, before any compaction) a block's visual rows may see: the prefix, earlier markers,
    the previous `prev_blocks` blocks and the block itself."""
    kind, blocks = seq.kind[:end], seq.block[:end]
    visible = (kind == PREFIX) | (kind == MARKER) | ((blocks >= block - prev_blocks) & (blocks <= block))
    return visible.nonzero().flatten()


def chunked_prefill(runner: LayerRunner, seq: Sequence, plan: ChunkedPlan) -> PrefillResult:
    """Video-XL-2's chunk-based prefill through the KV cache (never an L×L mask); the question sees everything."""
    cache = ArenaCache(runner.num_layers, reserve=seq.length + 256)
    probe = AttentionProbe(runner.num_layers, seq.length, seq.question_start)
    everything = range(runner.num_layers)
    video = (seq.kind == VISUAL) | (seq.kind == MARKER)
    first_video = int(video.nonzero()[0]) if video.any() else seq.question_start
    prefix = torch.arange(0, first_video)
    if prefix.numel():
        runner.run(seq.embeds[prefix], prefix, cache, everything)
    # A block's markers and visual tokens are contiguous, so runs of equal block ids are the chunks.
    block_ids, counts = torch.unique_consecutive(seq.block[first_video : seq.question_start], return_counts=True)
    start = first_video
    for block, count in zip(block_ids.tolist(), counts.tolist()):
        rows = torch.arange(start, start + count)
        start = end = start + count
        key_index = chunk_key_index(seq, block, max(0, plan.prev_blocks), end)
        full_rows = (seq.kind[rows] == MARKER).nonzero().flatten()
        runner.run(seq.embeds[rows], rows, cache, everything, key_index=key_index, full_rows=full_rows)
    hidden = _run_question(runner, seq, cache, probe)
    return PrefillResult(hidden[-1], cache, probe, seq.length)


def prefill(runner: LayerRunner, seq: Sequence, plan: PrefillPlan) -> PrefillResult:
    if isinstance(plan, ChunkedPlan):
        result = chunked_prefill(runner, seq, plan)
        if plan.kv_topk >= 0:
            from engine.kv_plans import apply_bigranular_kv

            result = apply_bigranular_kv(runner, seq, plan, result)
        return result
    if isinstance(plan, TokenDropPlan):
        return drop_prefill(runner, seq, plan)
    if isinstance(plan, DensePlan):
        return dense_prefill(runner, seq)
    raise TypeError(f"unknown prefill plan {plan!r}")


__all__ = ["LayerRunner", "PrefillResult", "prefill", "QUESTION"]
