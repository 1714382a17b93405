"""HiCo: bipartite soft matching (schedule, metric, weighted merge, order), the backend's counts/provenance/plan,
and the video-level drop inside the engine checked against an independent flash_rank_drop."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from backends.hico import HiCo, HiCoParams, frame_survivors, pad_to_clips
from backends.registry import get_backend
from backends.tome import apply_matching, bipartite_match, head_metric, merge_schedule, merge_tokens
from engine.types import DensePlan, FrameFeatures, TokenDropPlan

QUESTION = "What happens in the video?"
VISION_DIM, LLM_DIM, HEADS = 64, 32, 4


class FakeOps:
    """A ModelOps stand-in: the projector is a fixed random Linear."""

    grid = 27
    vision_heads = HEADS
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.projector = torch.nn.Linear(VISION_DIM, LLM_DIM)

    @torch.no_grad()
    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.projector(vision_features)

    def image_newline(self) -> torch.Tensor:
        return torch.zeros(LLM_DIM)

    def embed_text(self, text: str) -> torch.Tensor:
        return torch.zeros(len(text), LLM_DIM)

    def question_attention(self, tokens: torch.Tensor, question: str) -> torch.Tensor:
        return torch.full((tokens.shape[0],), 1.0 / tokens.shape[0])

    def extra_module(self, name: str) -> None:
        return None


def features(num_frames: int, grid: int = 27, seed: int = 0) -> FrameFeatures:
    patches = torch.randn(num_frames, grid * grid, VISION_DIM, generator=torch.Generator().manual_seed(seed))
    return FrameFeatures(patches=patches, grid=grid, timestamps=np.arange(num_frames, dtype=float), cache_key="k")


def compress(num_frames: int, grid: int = 27, **overrides):
    backend = HiCo()
    params = backend.make_params(overrides)
    return backend.compress(features(num_frames, grid), QUESTION, FakeOps(), params), backend, params


# ---- the matching itself -------------------------------------------------------------------------------------


def test_schedule_is_the_documented_one_for_a_4_frame_siglip_clip():
    assert merge_schedule(4 * 729, 64) == [1458, 729, 364, 182, 91, 28]


@pytest.mark.parametrize("count,target", [(2916, 64), (2916, 100), (1000, 999), (37, 5), (64, 64), (10, 64)])
def test_schedule_halves_until_the_rest_fits_in_one_step(count, target):
    steps = merge_schedule(count, target)
    remaining = count
    for i, r in enumerate(steps):
        assert 0 < r <= remaining // 2
        last = i == len(steps) - 1
        assert r == (remaining - target if last else remaining // 2)
        remaining -= r
    assert remaining == min(count, target)
    assert (steps == []) == (count <= target)


def test_identical_tokens_merge_to_themselves():
    vector = torch.tensor([0.3, -1.2, 2.0, 0.7])
    result = merge_tokens(vector.expand(1, 12, 4).clone(), target=3, heads=2)
    torch.testing.assert_close(result.tokens, vector.expand(1, 3, 4))
    assert result.sizes.sum() == 12


def test_duplicated_pairs_come_back_unchanged_with_size_two():
    distinct = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    pairs = distinct.repeat_interleave(2, dim=0)[None]
    result = merge_tokens(pairs, target=4, heads=1)
    torch.testing.assert_close(result.tokens[0], distinct)
    assert result.sizes.tolist() == [[2.0] * 4]


def test_sizes_are_carried_so_the_second_step_weights_by_them():
    e0, o1, e2 = torch.tensor([1.0, 0.1]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, -0.1])
    o3, e4, o5 = torch.tensor([0.8, 0.6]), torch.tensor([0.1, 1.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([e0, o1, e2, o3, e4, o5])[None]
    assert merge_schedule(6, 2) == [3, 1]
    result = merge_tokens(x, target=2, heads=1)
    # Step 1: e0, e2 → o1 (size 3), e4 → o5 (size 2). Step 2: (e0+e2+o1) is closer to o3 than (e4+o5) is.
    expected_unmerged = (e4 + o5) / 2
    expected_merged = (e0 + e2 + o1 + o3) / 4  # size-weighted; the mean of the two means would be different
    torch.testing.assert_close(result.tokens[0], torch.stack([expected_unmerged, expected_merged]))
    assert result.sizes.tolist() == [[2.0, 4.0]]
    assert result.owner.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_output_order_unmerged_evens_by_score_then_all_odds_in_order():
    o1, o3, o5 = torch.eye(3)
    e0 = torch.tensor([0.6, 0.8, 0.0])      # best score 0.80 (o3)
    e2 = torch.tensor([0.95, 0.0, 0.312])   # best score 0.95 (o1)
    e4 = torch.tensor([0.0, 0.3, 0.954])    # best score 0.954 (o5): merges
    x = torch.stack([e0, o1, e2, o3, e4, o5])[None]
    match = bipartite_match(x, r=1)
    merged, sizes = apply_matching(x, torch.ones(1, 6), match)
    expected = torch.stack([e2, e0, o1, o3, (e4 + o5) / 2])
    torch.testing.assert_close(merged[0], expected)
    assert sizes.tolist() == [[1.0, 1.0, 1.0, 1.0, 2.0]]


def test_similarity_is_averaged_over_the_vision_heads():
    e0 = torch.tensor([1.0, 0.0, 1.0, 0.0])   # head mean (1, 0)
    o1 = torch.tensor([3.0, 0.0, -1.0, 0.0])  # head mean (1, 0): cosine 1 per heads, 0.45 plain
    e2 = torch.tensor([0.0, 1.0, 0.0, 1.0])
    o3 = torch.tensor([1.0, 0.2, 1.0, 0.2])   # cosine 0.98 both ways
    x = torch.stack([e0, o1, e2, o3])[None]
    torch.testing.assert_close(head_metric(x, 2)[0], torch.stack([x[0, :, :2], x[0, :, 2:]]).mean(0))
    by_heads = merge_tokens(x, target=3, heads=2).tokens[0]
    plain = merge_tokens(x, target=3, heads=1).tokens[0]
    torch.testing.assert_close(by_heads, torch.stack([e2, (e0 + o1) / 2, o3]))
    torch.testing.assert_close(plain, torch.stack([e2, o1, (e0 + o3) / 2]))


def test_merged_tokens_are_the_size_weighted_means_of_their_sources():
    x = torch.randn(3, 4 * 49, 8, generator=torch.Generator().manual_seed(1))
    result = merge_tokens(x, target=20, heads=2)
    assert result.tokens.shape == (3, 20, 8)
    for clip in range(3):
        counts = torch.bincount(result.owner[clip], minlength=20)
        assert counts.tolist() == result.sizes[clip].long().tolist()
        means = torch.zeros(20, 8).index_add(0, result.owner[clip], x[clip]) / counts[:, None]
        torch.testing.assert_close(result.tokens[clip], means)


# ---- the backend -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5, 8, 9])
def test_token_count_is_64_per_clip_of_4_and_known_up_front(num_frames):
    tokens, backend, params = compress(num_frames)
    assert tokens.num_tokens == math.ceil(num_frames / 4) * 64
    assert backend.num_tokens(num_frames, 27, params) == tokens.num_tokens
    assert tokens.embeds.shape[1] == LLM_DIM


@pytest.mark.parametrize("grid,num_frames,per_frame", [(3, 6, 16), (27, 7, 8), (5, 4, 5)])
def test_token_count_other_grids_and_targets(grid, num_frames, per_frame):
    tokens, backend, params = compress(num_frames, grid, tokens_per_frame=per_frame)
    per_clip = min(4 * grid * grid, 4 * per_frame)
    assert tokens.num_tokens == math.ceil(num_frames / 4) * per_clip == backend.num_tokens(num_frames, grid, params)


def test_merging_runs_before_the_projector():
    feats = features(4, grid=5)
    ops = FakeOps()
    tokens = HiCo().compress(feats, QUESTION, ops, HiCoParams(tokens_per_frame=5))
    merged = merge_tokens(feats.patches.reshape(1, 100, VISION_DIM), 20, HEADS).tokens[0]
    torch.testing.assert_close(tokens.embeds, ops.project(merged))


def test_last_clip_is_padded_with_the_last_frame():
    patches = torch.arange(6.0)[:, None, None].expand(6, 2, 3)
    clips = pad_to_clips(patches, 4)
    assert clips.shape == (2, 8, 3)
    assert clips[1, :, 0].tolist() == [4, 4, 5, 5, 5, 5, 5, 5]


def test_every_token_stands_for_its_clips_frames():
    tokens, _, _ = compress(6)
    assert tokens.frame_span[:64].tolist() == [[0, 3]] * 64
    assert tokens.frame_span[64:].tolist() == [[4, 5]] * 64
    assert tokens.markers == [] and tokens.block is None


def test_frame_marks_show_where_a_clips_tokens_went():
    patches = torch.randn(8, 729, VISION_DIM, generator=torch.Generator().manual_seed(2))
    patches[1:4] = torch.randn(VISION_DIM)  # frames 1-3: one flat colour; frame 0 keeps detailed content
    feats = FrameFeatures(patches=patches, grid=27, timestamps=np.arange(8.0), cache_key="k")
    tokens = HiCo().compress(feats, QUESTION, FakeOps(), HiCoParams())
    effective, size = tokens.frame_marks["effective_tokens"], tokens.frame_marks["merge_size"]
    assert effective.shape == size.shape == (8,)
    assert effective.sum() == pytest.approx(tokens.num_tokens)
    assert effective[:4].sum() == pytest.approx(64)
    # Bipartite matching can at most halve a run of duplicates per step, so flat frames still keep tokens, but fewer
    # than the detailed frame, and theirs are far larger.
    assert effective[0] > effective[1:4].max()
    assert size[1:4].min() > 10 * size[0]


def test_frame_marks_count_padding_copies_for_the_last_frame():
    tokens, _, _ = compress(5)
    assert tokens.frame_marks["effective_tokens"].shape == (5,)
    assert tokens.frame_marks["effective_tokens"][4] == pytest.approx(64, rel=1e-5)


def test_plan_is_the_authors_drop_schedule_scaled_to_the_model():
    from engine.prefill import scaled_layers

    tokens, _, _ = compress(4)
    assert tokens.plan == TokenDropPlan(layers=(8, 16, 24), ratios=(0.5, 0.25, 0.125), uniform_first=False)
    assert scaled_layers(tokens.plan.layers, 28, 28) == [8, 16, 24]
    assert scaled_layers(tokens.plan.layers, 28, 24) == [7, 14, 21]
    assert compress(4, drop=False)[0].plan == DensePlan()
    single = compress(4, drop_layers="24", drop_ratios="0.5", uniform_first=True)[0].plan
    assert single == TokenDropPlan(layers=(24,), ratios=(0.5,), uniform_first=True)


def test_mismatched_drop_layers_and_ratios_are_refused():
    with pytest.raises(ValueError, match="keep ratios"):
        HiCo().make_params({"drop_layers": "24", "drop_ratios": "0.5,0.25,0.125"})
    assert HiCo().make_params({"drop": False, "drop_layers": "24"}).drop is False


def test_survivors_per_frame_spread_over_spans():
    span = torch.tensor([[0, 1], [2, 2], [-1, -1], [0, 2]])
    counts = frame_survivors([torch.arange(4), torch.tensor([1, 3])], span, 3)
    np.testing.assert_allclose(counts, [[0.5 + 1 / 3, 0.5 + 1 / 3, 1 + 1 / 3], [1 / 3, 1 / 3, 1 + 1 / 3]])


def test_registered_and_params_declared_for_the_ui():
    backend = get_backend("hico")
    assert isinstance(backend, HiCo)
    params = backend.make_params()
    assert (params.tokens_per_frame, params.clip_frames, params.drop) == (16, 4, True)


# ---- through the engine (tiny preset) --------------------------------------------------------------------------


def tiny_features(engine, num_frames: int, seed: int = 0):
    from engine.types import Clip, Sampling, VideoMeta

    frames = np.random.RandomState(seed).randint(0, 255, (num_frames, 48, 64, 3), dtype=np.uint8)
    meta = VideoMeta("synthetic", float(num_frames), 1.0, num_frames, 64, 48, 0, "synthetic")
    clip = Clip(frames, np.arange(num_frames, dtype=float), np.arange(num_frames), meta, f"hico-{seed}",
                Sampling(max_frames=num_frames))
    return clip, engine.encode(clip)


def test_answer_through_the_engine_with_dropping(tiny_engine):
    from engine.api import Prepared

    clip, feats = tiny_features(tiny_engine, 6)
    answer = tiny_engine.answer(Prepared(clip, feats, []), "hico", QUESTION, max_new_tokens=4)
    assert answer.num_visual_tokens == HiCo().num_tokens(6, tiny_engine.loaded.grid, HiCoParams()) == 128
    assert answer.frame_attention.shape == (6,)
    assert answer.frame_attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert set(answer.frame_marks) == {"effective_tokens", "merge_size", "surviving_tokens_first_stage",
                                       "surviving_tokens_last_stage"}
    # 128 tokens → 64 after the first drop and 16 after the last, shared over the 6 real frames (+2 padding copies).
    assert answer.frame_marks["surviving_tokens_first_stage"].sum() == pytest.approx(64)
    assert answer.frame_marks["surviving_tokens_last_stage"].sum() == pytest.approx(16)


def test_drop_keeps_the_planned_share_of_the_original_tokens(tiny_engine):
    from engine.prefill import prefill

    _, feats = tiny_features(tiny_engine, 6, seed=1)
    tokens = tiny_engine.compress("hico", feats, QUESTION)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    with torch.inference_mode():
        result = prefill(tiny_engine.ops.runner, seq, tokens.plan)
    assert [len(s) for s in result.survivors] == [128, 64, 32, 16]
    for before, after in pairwise(result.survivors):
        assert set(after.tolist()) <= set(before.tolist())
    per_frame = frame_survivors(result.survivors, tokens.frame_span, 6)
    np.testing.assert_allclose(per_frame.sum(axis=1), [128, 64, 32, 16], rtol=1e-6)


@pytest.fixture(scope="module")
def eager_model(tiny_engine):
    from transformers import LlavaOnevisionForConditionalGeneration

    from engine.loading import cache_root

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        cache_root() / "tiny-v1", attn_implementation="eager").eval()


def flash_rank_drop_reference(model, embeds: torch.Tensor, visual: torch.Tensor, drop_at: list[int],
                              ratios: list[float], uniform_first: bool, prompt_length: int | None = None
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """VideoChat-Flash's forward with dropping, written independently of the engine: before layer L (in `drop_at`)
    layer L's attention from the LAST prompt token ranks the visual tokens, the top int(ratio · N) of the original
    N survive (kept in order), and layer L on runs on the survivors at recomputed (compacted) positions. Rows after
    `prompt_length` are generated tokens: they do not take part in the ranking (the reference ranks at prefill)."""
    query = (prompt_length or embeds.shape[0]) - 1
    lm = model.model.language_model
    hidden = embeds[None]
    rows = torch.arange(embeds.shape[0])
    n_visual = int(visual.sum())
    survivors = [rows[visual]]
    for index, layer in enumerate(lm.layers):
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = lm.rotary_emb(hidden, positions)
        if index in drop_at:
            stage = drop_at.index(index)
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            shape = (1, hidden.shape[1], -1, attn.head_dim)
            q = attn.q_proj(normed).view(shape).transpose(1, 2)
            k = attn.k_proj(normed).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
            row = int((rows == query).nonzero())
            raw = q[0, :, row : row + 1] @ k[0, :, : row + 1].transpose(1, 2) * attn.scaling
            scores = raw.softmax(-1).mean(0)[0]
            vis_rows = visual[rows].nonzero().flatten()
            keep = int(n_visual * ratios[stage])
            if uniform_first and stage == 0:
                top = torch.linspace(0, len(vis_rows) - 1, keep, dtype=torch.long)
            else:
                top = scores[vis_rows].topk(keep).indices.sort().values
            mask = ~visual[rows]
            mask[vis_rows[top]] = True
            rows, hidden = rows[mask], hidden[:, mask]
            survivors.append(rows[visual[rows]])
            positions = torch.arange(hidden.shape[1])[None]
            cos, sin = lm.rotary_emb(hidden, positions)
        length = hidden.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=positions)
    logits = model.lm_head(lm.norm(hidden[0, -1]))
    return logits, survivors


@pytest.mark.parametrize("uniform_first", [False, True])
def test_drop_prefill_matches_flash_rank_drop(tiny_engine, eager_model, uniform_first):
    from engine.prefill import prefill, scaled_layers
    from engine.sequence import VISUAL

    _, feats = tiny_features(tiny_engine, 8, seed=3)
    tokens = tiny_engine.compress("hico", feats, QUESTION, {"uniform_first": uniform_first})
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    runner = tiny_engine.ops.runner
    drop_at = scaled_layers(tokens.plan.layers, 28, runner.num_layers)
    with torch.inference_mode():
        result = prefill(runner, seq, tokens.plan)
        ours = runner.logits(result.last_hidden)
        theirs, survivors = flash_rank_drop_reference(eager_model, seq.embeds, seq.kind == VISUAL, drop_at,
                                                      list(tokens.plan.ratios), uniform_first)
    assert [s.tolist() for s in result.survivors] == [seq.visual_index[s].tolist() for s in survivors]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def test_generation_after_dropping_matches_flash_rank_drop(tiny_engine, eager_model):
    """Greedy decoding on the dropped cache equals re-running the reference on the growing sequence (decode
    positions shift with the compaction, as the reference's position_ids - dropped)."""
    from engine.prefill import prefill, scaled_layers
    from engine.sequence import VISUAL

    _, feats = tiny_features(tiny_engine, 4, seed=4)
    tokens = tiny_engine.compress("hico", feats, QUESTION)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    runner = tiny_engine.ops.runner
    drop_at = scaled_layers(tokens.plan.layers, 28, runner.num_layers)
    embeds, visual = seq.embeds, seq.kind == VISUAL
    with torch.inference_mode():
        result = prefill(runner, seq, tokens.plan)
        logits = runner.logits(result.last_hidden)
        for step in range(3):
            token = int(logits.argmax())
            expected, _ = flash_rank_drop_reference(eager_model, embeds, visual, drop_at, list(tokens.plan.ratios),
                                                    False, prompt_length=seq.length)
            torch.testing.assert_close(logits, expected.float(), atol=1e-4, rtol=0)
            embeds = torch.cat([embeds, runner.embed([token])])
            visual = torch.cat([visual, torch.tensor([False])])
            hidden = runner.run(runner.embed([token]), torch.tensor([seq.length + step]), result.cache,
                                range(runner.num_layers))
            logits = runner.logits(hidden[-1])
