"""Chunk-based prefill equals a dense L×L mask built from the Video-XL-2 definition; bi-granularity KV keeps exactly
the chosen blocks dense, pools the others 4× (markers kept) and re-runs the question over the mixed cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlavaOnevisionForConditionalGeneration

from engine.kv_plans import BigranularResult, apply_bigranular_kv, block_relevance, video_blocks
from engine.loading import cache_root
from engine.prefill import chunked_prefill, dense_prefill
from engine.sequence import MARKER, PREFIX, VISUAL
from engine.types import ChunkedPlan, VisualTokens

QUESTION = "Which block shows the red ball?"
PER_GROUP = 8


@pytest.fixture(scope="module")
def reference_model(tiny_engine):
    """The same tiny checkpoint in plain transformers with eager attention (accepts a custom 4D additive mask)."""
    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        cache_root() / "tiny-v1", attn_implementation="eager").eval()


def video_tokens(num_groups: int, block_groups: int, prev_blocks: int = 3, kv_topk: int = -1, seed: int = 0,
                 per_group: int = PER_GROUP) -> VisualTokens:
    """Groups of `per_group` random visual tokens, each after a "Time t s:" marker, `block_groups` groups a block."""
    generator = torch.Generator().manual_seed(seed)
    count = num_groups * per_group
    group = torch.arange(count) // per_group
    return VisualTokens(
        embeds=torch.randn(count, 64, generator=generator),
        frame_span=torch.stack([group, group], dim=1),
        markers=[(g * per_group, f"Time {float(g)}s:") for g in range(num_groups)],
        block=group // block_groups,
        plan=ChunkedPlan(prev_blocks=prev_blocks, kv_topk=kv_topk, kv_pool=4),
    )


def definition_mask(seq, prev_blocks: int) -> torch.Tensor:
    """(L, L) visibility straight from the definition: a visual token sees the prefix, every earlier marker, its own
    block and the `prev_blocks` blocks before it; prefix, marker and question rows see everything; all causal."""
    kind, block = seq.kind, seq.block
    always = (kind == PREFIX) | (kind == MARKER)
    window = (block[None, :] >= block[:, None] - prev_blocks) & (block[None, :] <= block[:, None])
    visual_rows_see = always[None, :] | (window & (kind == VISUAL)[None, :])
    visible = torch.where((kind == VISUAL)[:, None], visual_rows_see, True)
    return visible & torch.ones(seq.length, seq.length, dtype=torch.bool).tril()


def reference_forward(model, seq, visible: torch.Tensor):
    """transformers' own Qwen2 forward over the whole sequence with `visible` as a 4D additive mask."""
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
    out = model.model.language_model(inputs_embeds=seq.embeds[None], attention_mask=additive,
                                     position_ids=torch.arange(seq.length)[None], use_cache=True)
    return model.lm_head(out.last_hidden_state[0, -1]), out.past_key_values


@pytest.mark.parametrize("num_groups,block_groups", [(2, 2), (7, 2), (12, 2), (9, 4)])
@pytest.mark.parametrize("prev_blocks", [0, 1, 3])
def test_chunked_prefill_equals_the_dense_definition_mask(tiny_engine, reference_model, num_groups, block_groups,
                                                          prev_blocks):
    tokens = video_tokens(num_groups, block_groups, prev_blocks, seed=num_groups * 10 + prev_blocks)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    runner = tiny_engine.ops.runner
    with torch.inference_mode():
        result = chunked_prefill(runner, seq, tokens.plan)
        ours = runner.logits(result.last_hidden)
        theirs, cache = reference_forward(reference_model, seq, definition_mask(seq, prev_blocks))
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    for layer in range(runner.num_layers):
        keys, values = result.cache.layer_kv(layer)
        torch.testing.assert_close(keys, cache.layers[layer].keys, atol=1e-4, rtol=0)
        torch.testing.assert_close(values, cache.layers[layer].values, atol=1e-4, rtol=0)


def test_the_block_window_matters(tiny_engine):
    """Sanity of the comparison above: with blocks beyond the window the K/V differ from plain causal prefill by
    well over its tolerance."""
    tokens = video_tokens(12, 2, prev_blocks=0, seed=3)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    runner = tiny_engine.ops.runner
    with torch.inference_mode():
        chunked = chunked_prefill(runner, seq, tokens.plan).cache.layer_kv(runner.num_layers - 1)[0]
        dense = dense_prefill(runner, seq).cache.layer_kv(runner.num_layers - 1)[0]
    assert (chunked - dense).abs().max() > 1e-3


def prefilled(tiny_engine, num_groups: int, block_groups: int, kv_topk: int, seed: int = 0):
    tokens = video_tokens(num_groups, block_groups, kv_topk=kv_topk, seed=seed)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    with torch.inference_mode():
        result = chunked_prefill(tiny_engine.ops.runner, seq, tokens.plan)
    return tokens, seq, result


def expected_dense(result, seq, topk: int) -> list[set[int]]:
    """Per layer: first and last block plus the top-k by the question's attention summed over visual positions."""
    blocks = video_blocks(seq).tolist()
    out = []
    for scores in result.probe.mean_rows:
        relevance = {b: float(scores[(seq.kind == VISUAL) & (seq.block == b)].sum()) for b in blocks}
        top = sorted(blocks, key=lambda b: -relevance[b])[:topk]
        out.append({blocks[0], blocks[-1], *top})
    return out


@pytest.mark.parametrize("kv_topk", [0, 1, 2])
def test_exactly_the_chosen_blocks_stay_dense(tiny_engine, kv_topk):
    tokens, seq, result = prefilled(tiny_engine, num_groups=10, block_groups=2, kv_topk=kv_topk, seed=kv_topk)
    expected = expected_dense(result, seq, kv_topk)
    with torch.inference_mode():
        mixed = apply_bigranular_kv(tiny_engine.ops.runner, seq, tokens.plan, result)
    assert isinstance(mixed, BigranularResult)
    for layer, dense in enumerate(mixed.dense_blocks):
        assert set(dense.tolist()) == expected[layer]
        positions, spans = mixed.cache.positions(layer), mixed.cache.spans(layer)
        for block in video_blocks(seq).tolist():
            visual = ((seq.kind == VISUAL) & (seq.block == block)).nonzero().flatten()
            held = torch.isin(positions, visual)
            if block in expected[layer]:
                assert torch.equal(positions[held], visual) and (spans[held] == 1).all()
            else:
                assert (spans[held] == 4).all() and held.sum() == visual.numel() // 4
        markers = (seq.kind == MARKER).nonzero().flatten()
        assert torch.isin(markers, positions).all()


def test_cache_length_per_layer_follows_the_formula(tiny_engine):
    tokens, seq, result = prefilled(tiny_engine, num_groups=9, block_groups=2, kv_topk=1, seed=5)
    with torch.inference_mode():
        mixed = apply_bigranular_kv(tiny_engine.ops.runner, seq, tokens.plan, result)
    prefix = int((seq.kind == PREFIX).sum())
    markers = int((seq.kind == MARKER).sum())
    question = seq.length - seq.question_start
    for layer, dense in enumerate(mixed.dense_blocks):
        groups_per_block = {b: 0 for b in video_blocks(seq).tolist()}
        for g in range(9):
            groups_per_block[g // 2] += 1
        visual = sum(n * (PER_GROUP if b in dense.tolist() else PER_GROUP // 4) for b, n in groups_per_block.items())
        assert mixed.cache.lengths[layer] == prefix + markers + visual + question


def test_pooled_entries_are_the_mean_of_four_originals(tiny_engine):
    tokens, seq, result = prefilled(tiny_engine, num_groups=8, block_groups=2, kv_topk=0, seed=6)
    originals = [tuple(t.clone() for t in result.cache.layer_kv(layer)) for layer in range(result.cache.num_layers)]
    with torch.inference_mode():
        mixed = apply_bigranular_kv(tiny_engine.ops.runner, seq, tokens.plan, result)
    checked = 0
    for layer in range(mixed.cache.num_layers):
        keys, values = mixed.cache.layer_kv(layer)
        for entry in (mixed.cache.spans(layer) == 4).nonzero().flatten().tolist():
            first = int(mixed.cache.positions(layer)[entry])
            window = slice(first, first + 4)
            assert (seq.kind[window] == VISUAL).all() and len(set(seq.block[window].tolist())) == 1
            torch.testing.assert_close(keys[:, :, entry], originals[layer][0][:, :, window].mean(dim=2))
            torch.testing.assert_close(values[:, :, entry], originals[layer][1][:, :, window].mean(dim=2))
            checked += 1
    assert checked > 0


def test_the_question_is_rerun_against_the_mixed_cache(tiny_engine, reference_model):
    """With kv_topk = 0 every layer keeps the same blocks, so transformers can replay the question over the same
    mixed K/V (original positions) and must give the same logits."""
    tokens, seq, result = prefilled(tiny_engine, num_groups=8, block_groups=2, kv_topk=0, seed=7)
    runner = tiny_engine.ops.runner
    with torch.inference_mode():
        dense_logits = runner.logits(result.last_hidden)
        mixed = apply_bigranular_kv(runner, seq, tokens.plan, result)
        question = seq.length - seq.question_start
        cache = DynamicCache()
        for layer in range(runner.num_layers):
            keys, values = mixed.cache.layer_kv(layer)
            cache.update(keys[:, :, :-question].clone(), values[:, :, :-question].clone(), layer)
        past = cache.get_seq_length()
        out = reference_model.model.language_model(
            inputs_embeds=seq.embeds[seq.question_start:][None], past_key_values=cache,
            position_ids=torch.arange(seq.question_start, seq.length)[None],
            cache_position=torch.arange(past, past + question), use_cache=True)
        theirs = reference_model.lm_head(out.last_hidden_state[0, -1]).float()
        ours = runner.logits(mixed.last_hidden)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - dense_logits).abs().max() > 1e-4
    assert mixed.next_position == seq.length


def test_topk_over_all_blocks_changes_nothing(tiny_engine):
    tokens, seq, result = prefilled(tiny_engine, num_groups=6, block_groups=2, kv_topk=3, seed=8)
    before = result.last_hidden.clone()
    with torch.inference_mode():
        mixed = apply_bigranular_kv(tiny_engine.ops.runner, seq, tokens.plan, result)
    torch.testing.assert_close(mixed.last_hidden, before, atol=1e-5, rtol=0)
    assert all(length == seq.length for length in mixed.cache.lengths)


def test_relevance_is_the_question_attention_per_block(tiny_engine):
    _, seq, result = prefilled(tiny_engine, num_groups=6, block_groups=2, kv_topk=1, seed=9)
    blocks = video_blocks(seq)
    relevance = block_relevance(result.probe, seq, blocks)
    assert relevance.shape == (tiny_engine.ops.runner.num_layers, blocks.numel())
    visual_share = torch.stack([s[seq.kind == VISUAL].sum() for s in result.probe.mean_rows])
    torch.testing.assert_close(relevance.sum(dim=1), visual_share, atol=1e-5, rtol=0)
