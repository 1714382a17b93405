"""ViLAMP: DKS (greedy, coverage, K, gap filling, blocked similarity rows), DFM (anchors and their quirk, weights),
the backend's sequence (counts, order, provenance, marks), the original-layout checkpoint loader, and the engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backends.registry import get_backend
from backends.vilamp import ViLAMP, ViLAMPParams
from backends.vilamp_dfm import DFMProjection, anchor_frames, dfm_weights, merge_frames
from backends.vilamp_dks import SummarySimilarity, fill_gaps, greedy_keyframes, select_keyframes, unchosen_runs
from engine.errors import ModelUnavailable, UserFacingError
from engine.types import DensePlan, FrameFeatures

QUESTION = "Where is the red ball?"
VISION_DIM, LLM_DIM, GRID = 48, 32, 27
PER_KEYFRAME = 14 * 14


class FakeOps:
    """A ModelOps stand-in: projector = a fixed random Linear; the question "looks at" a planted direction.

    `question_attention` is a softmax of each token's dot product with the question's embedding, so a frame
    whose summary points along the question embedding gets the most attention, as a real LLM's probe would.
    """

    grid = GRID
    vision_heads = 4
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, dfm: torch.nn.Module | None = None, identity: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.projector = torch.nn.Linear(VISION_DIM, LLM_DIM).requires_grad_(False)
        self.projector.weight.copy_(torch.randn(LLM_DIM, VISION_DIM, generator=generator) / VISION_DIM**0.5)
        self.projector.bias.copy_(0.1 * torch.randn(LLM_DIM, generator=generator))
        if identity:
            # Projected features = the first LLM_DIM vision channels: lets a test plant features in LLM space.
            self.projector.weight.zero_()
            self.projector.weight[:, :LLM_DIM] = torch.eye(LLM_DIM)
            self.projector.bias.zero_()
        self.question_direction = torch.randn(LLM_DIM, generator=generator)
        self.dfm = dfm
        self.attention_calls = 0

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.projector(vision_features.float())

    def image_newline(self) -> torch.Tensor:
        return torch.full((LLM_DIM,), 7.0)

    def embed_text(self, text: str) -> torch.Tensor:
        return self.question_direction.repeat(max(len(text.split()), 1), 1)

    def question_attention(self, tokens: torch.Tensor, question: str) -> torch.Tensor:
        self.attention_calls += 1
        return torch.softmax(tokens.float() @ self.embed_text(question).mean(0), dim=0)

    def extra_module(self, name: str) -> torch.nn.Module | None:
        return self.dfm if name == "dfm" else None


def random_features(num_frames: int, seed: int = 0, grid: int = GRID) -> FrameFeatures:
    patches = torch.randn(num_frames, grid * grid, VISION_DIM, generator=torch.Generator().manual_seed(seed))
    return FrameFeatures(patches=patches, grid=grid, timestamps=np.arange(num_frames, dtype=float), cache_key="k")


def run(features: FrameFeatures, ops: FakeOps | None = None, **overrides):
    backend = ViLAMP()
    params = backend.make_params(overrides)
    return backend.compress(features, QUESTION, ops or FakeOps(), params), backend, params


def dense_cosine(summaries: torch.Tensor) -> torch.Tensor:
    normed = summaries / summaries.norm(dim=-1, keepdim=True)
    return normed @ normed.T


# ---- DKS: the greedy ------------------------------------------------------------------------------------------


def test_planted_relevant_frame_is_chosen_first():
    summaries = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    f2t = torch.rand(50, generator=torch.Generator().manual_seed(2)) * 0.5
    f2t[37] = 1.0
    chosen = greedy_keyframes(f2t, SummarySimilarity(summaries).row, k=8, f2t_threshold=0.2, f2f_threshold=0.85)
    assert chosen[0] == 37


def test_near_duplicates_of_a_chosen_frame_are_covered_not_chosen():
    generator = torch.Generator().manual_seed(3)
    summaries = torch.randn(40, 16, generator=generator)
    duplicates = [11, 12, 13, 30]
    summaries[duplicates] = summaries[10] + 0.01 * torch.randn(len(duplicates), 16, generator=generator)
    f2t = torch.linspace(0.3, 0.9, 40)
    f2t[10], f2t[duplicates] = 1.0, 0.99  # the duplicates are the next most relevant frames
    chosen = greedy_keyframes(f2t, SummarySimilarity(summaries).row, k=10, f2t_threshold=0.2, f2f_threshold=0.85)
    assert chosen[0] == 10
    assert not set(duplicates) & set(chosen)
    rows = dense_cosine(summaries)
    for a in chosen:  # no chosen frame is similar (> 0.85) to an earlier chosen one
        for b in chosen[: chosen.index(a)]:
            assert rows[a, b] <= 0.85


def test_greedy_stops_at_first_score_strictly_below_threshold_and_equal_is_eligible():
    summaries = torch.eye(6)  # all mutually orthogonal: no coverage
    f2t = torch.tensor([0.9, 0.2, 0.1999, 0.5, 0.05, 0.3])
    chosen = greedy_keyframes(f2t, SummarySimilarity(summaries).row, k=32, f2t_threshold=0.2, f2f_threshold=0.85)
    assert chosen == [0, 3, 5, 1]


def test_greedy_honours_k():
    summaries = torch.eye(20)
    chosen = greedy_keyframes(torch.linspace(1, 0.5, 20), SummarySimilarity(summaries).row, k=5,
                              f2t_threshold=0.2, f2f_threshold=0.85)
    assert chosen == [0, 1, 2, 3, 4]


# ---- DKS: gap filling -----------------------------------------------------------------------------------------


def test_gap_filling_worked_example_from_design():
    filled = fill_gaps(np.zeros(300, dtype=bool), 32)
    assert np.flatnonzero(filled).tolist() == list(range(10, 291, 10)) + [297, 298, 299]


@pytest.mark.parametrize("num_frames,k,chosen", [
    (300, 32, []), (300, 32, [5, 150]), (1000, 32, [0, 999]), (33, 32, [3]), (10, 32, [2]), (500, 1, []),
    (64, 32, list(range(0, 64, 2))), (10_000, 32, [17, 5000, 9998]),
])
def test_gap_filling_always_gives_min_k_n_keyframes_and_keeps_the_chosen(num_frames, k, chosen):
    selected = np.zeros(num_frames, dtype=bool)
    selected[chosen] = True
    filled = fill_gaps(selected, k)
    assert filled.sum() == min(k, num_frames)
    assert filled[chosen].all()


def test_gap_filling_spreads_evenly_over_each_gap():
    selected = np.zeros(200, dtype=bool)
    selected[[0, 100]] = True
    filled = np.flatnonzero(fill_gaps(selected, 12))
    # Gaps 1..99 and 101..199 (99 frames each), 10 free slots: D = 17 is the smallest with 2·(ceil(99/D) − 1) ≤ 10
    # (D = 16 needs 12), so 5 per gap at step ceil(99/6) = 17 after each gap's start, none left for the end.
    assert filled.tolist() == [0, 18, 35, 52, 69, 86, 100, 118, 135, 152, 169, 186]


def test_unchosen_runs_are_maximal():
    assert unchosen_runs(np.array([1, 0, 0, 1, 1, 0], dtype=bool)) == [(1, 2), (5, 5)]
    assert unchosen_runs(np.zeros(4, dtype=bool)) == [(0, 3)]
    assert unchosen_runs(np.ones(3, dtype=bool)) == []


def test_nothing_relevant_gives_evenly_spaced_keyframes():
    summaries = torch.randn(300, 8, generator=torch.Generator().manual_seed(4))
    selection = select_keyframes(torch.full((300,), 0.1), SummarySimilarity(summaries).row, 32, 0.2, 0.85)
    assert selection.greedy.size == 0
    assert selection.keyframes.tolist() == list(range(10, 291, 10)) + [297, 298, 299]


# ---- DKS: similarity rows on demand ---------------------------------------------------------------------------


def test_blocked_similarity_rows_equal_the_dense_matrix():
    summaries = torch.randn(37, 12, generator=torch.Generator().manual_seed(5))
    rows = SummarySimilarity(summaries, block=5)
    dense = dense_cosine(summaries)
    for j in (0, 17, 36):
        torch.testing.assert_close(rows.row(j), dense[j], atol=1e-5, rtol=0)


def test_ten_thousand_frames_ask_only_for_the_chosen_rows():
    """Memory: N·D for the normalised summaries plus one N-vector per chosen frame (≤ K), never N×N."""
    summaries = torch.randn(10_000, 16, generator=torch.Generator().manual_seed(6))
    similarity = SummarySimilarity(summaries, block=1024)
    asked: list[int] = []

    def row(j: int) -> torch.Tensor:
        asked.append(j)
        out = similarity.row(j)
        assert out.shape == (10_000,)
        return out

    f2t = torch.rand(10_000, generator=torch.Generator().manual_seed(7))
    selection = select_keyframes(f2t, row, 32, 0.2, 0.85)
    assert len(selection.keyframes) == 32
    assert asked == selection.greedy.tolist() and len(asked) <= 32


# ---- DFM --------------------------------------------------------------------------------------------------------


def test_anchor_quirk_compares_leading_frames_with_themselves_and_segment_i_with_frame_i():
    anchors = anchor_frames(np.array([3, 7, 12]), 15, quirk=True)
    assert anchors.tolist() == [0, 1, 2] + [0] * 4 + [1] * 5 + [2] * 3


def test_anchor_corrected_variant_uses_the_keyframes():
    anchors = anchor_frames(np.array([3, 7, 12]), 15, quirk=False)
    assert anchors.tolist() == [3, 3, 3] + [3] * 4 + [7] * 5 + [12] * 3


def test_dfm_weights_favour_patches_that_differ_from_the_keyframe():
    generator = torch.Generator().manual_seed(8)
    anchor = torch.randn(1, 49, LLM_DIM, generator=generator)
    frame = anchor.clone()
    changed = [5, 20, 33]
    frame[0, changed] = torch.randn(len(changed), LLM_DIM, generator=generator)
    query = torch.zeros(LLM_DIM)  # no query preference: only the keyframe term decides
    query[0] = 1e-6
    weights = dfm_weights(frame, anchor, query, tau=0.05)[0]
    assert weights[changed].sum() > 0.99
    unchanged = [i for i in range(49) if i not in changed]
    assert weights[changed].min() > weights[unchanged].max()
    merged = merge_frames(frame, anchor, query, tau=0.05)
    torch.testing.assert_close(merged.tokens[0], (weights[:, None] * frame[0]).sum(0))
    assert 0 <= merged.entropy[0] < 0.5


def test_dfm_weights_favour_patches_relevant_to_the_query():
    generator = torch.Generator().manual_seed(9)
    frame = torch.randn(1, 49, LLM_DIM, generator=generator)
    query = torch.randn(LLM_DIM, generator=generator)
    frame[0, 12] = 3 * query
    merged = merge_frames(frame, frame, query, tau=0.01)  # compared with itself: only relevance decides
    torch.testing.assert_close(merged.tokens[0], frame[0, 12], atol=1e-3, rtol=1e-3)


def test_dfm_with_a_large_temperature_is_the_patch_mean():
    frame = torch.randn(2, 49, LLM_DIM, generator=torch.Generator().manual_seed(10))
    merged = merge_frames(frame, frame.flip(0), torch.ones(LLM_DIM), tau=1e6)
    torch.testing.assert_close(merged.tokens, frame.mean(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged.entropy, torch.ones(2), atol=1e-6, rtol=0)


def test_learned_dfm_uses_its_projections_and_temperature():
    torch.manual_seed(11)
    module = DFMProjection(LLM_DIM, LLM_DIM)
    with torch.no_grad():
        module.tau.fill_(0.5)
    frame, anchor = torch.randn(3, 49, LLM_DIM), torch.randn(3, 49, LLM_DIM)
    query = torch.randn(LLM_DIM)
    merged = merge_frames(frame, anchor, query, tau=123.0, module=module)
    with torch.no_grad():
        score = (torch.cosine_similarity(module.linear_iq(frame), module.linear_q(query)[None, None], dim=-1)
                 - torch.cosine_similarity(module.linear_ik(frame), module.linear_k(anchor), dim=-1)) / 0.5
    expected = (torch.softmax(score, dim=-1)[..., None] * frame).sum(1)
    torch.testing.assert_close(merged.tokens, expected, atol=1e-5, rtol=1e-4)


# ---- the backend --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames,k", [(40, 32), (100, 8), (5, 32), (32, 32), (1, 4)])
def test_token_count_is_k_keyframes_plus_one_per_other_frame_plus_newline(num_frames, k):
    tokens, backend, params = run(random_features(num_frames), k=k)
    keep = min(k, num_frames)
    assert tokens.num_tokens == keep * PER_KEYFRAME + (num_frames - keep) + 1
    assert tokens.num_tokens == backend.num_tokens(num_frames, GRID, params)
    assert tokens.frame_marks["keyframe"].sum() == keep
    assert isinstance(tokens.plan, DensePlan)


def test_sequence_is_in_time_order_with_keyframes_expanded_in_place():
    tokens, _, _ = run(random_features(60), k=6)
    is_key = tokens.frame_marks["keyframe"].astype(bool)
    expected = []
    for frame in range(60):
        expected += [frame] * (PER_KEYFRAME if is_key[frame] else 1)
    span = tokens.frame_span
    assert span[:-1, 0].tolist() == expected
    assert torch.equal(span[:-1, 0], span[:-1, 1])
    assert span[-1].tolist() == [-1, -1]
    torch.testing.assert_close(tokens.embeds[-1], torch.full((LLM_DIM,), 7.0))


def test_keyframe_tokens_are_the_projected_bilinear_pooled_frame():
    from backends.uniform import bilinear_pool_2x

    features, ops = random_features(20), FakeOps()
    tokens, _, _ = run(features, ops, k=3)
    first_key = int(np.flatnonzero(tokens.frame_marks["keyframe"])[0])
    start = int((tokens.frame_span[:, 0] == first_key).nonzero()[0])
    expected = bilinear_pool_2x(ops.project(features.patches[first_key : first_key + 1]), GRID)[0]
    torch.testing.assert_close(tokens.embeds[start : start + PER_KEYFRAME], expected)


def test_merged_tokens_follow_the_reference_anchor_quirk():
    """Quirk: frames before keyframe 0 are merged against themselves, frames after keyframe i against frame i of the
    video; corrected: against keyframe 0 and keyframe i."""
    features, ops = random_features(30, seed=12), FakeOps()
    query = ops.embed_text(QUESTION).mean(0)
    differing = 0
    for quirk in (True, False):
        tokens, _, params = run(features, ops, k=3, keyframe_quirk=quirk)
        keyframes = np.flatnonzero(tokens.frame_marks["keyframe"])
        for frame in sorted(set(range(30)) - set(keyframes.tolist())):
            segment = int(np.searchsorted(keyframes, frame, side="right")) - 1
            if quirk:
                anchor = frame if segment < 0 else segment
            else:
                anchor = int(keyframes[max(segment, 0)])
            differing += quirk and anchor != (int(keyframes[max(segment, 0)]))
            own, other = ops.project(features.patches[[frame]]), ops.project(features.patches[[anchor]])
            index = int((tokens.frame_span[:, 0] == frame).nonzero()[0])
            torch.testing.assert_close(tokens.embeds[index], merge_frames(own, other, query, params.tau).tokens[0])
    assert differing > 0  # the two variants were told apart


def test_frame_planted_to_match_the_question_becomes_a_keyframe():
    ops = FakeOps(identity=True)
    features = random_features(80, seed=13)
    features.patches[:, :, :LLM_DIM] *= 0.1
    features.patches[57, :, :LLM_DIM] += ops.question_direction  # every patch of frame 57 points at the question
    tokens, _, _ = run(features, ops, k=4)
    assert tokens.frame_marks["f2t"].argmax() == 57
    assert tokens.frame_marks["f2t"][57] == 1.0
    assert tokens.frame_marks["relevance_keyframe"][57] == 1.0
    assert tokens.frame_marks["keyframe"][57] == 1.0


def test_marks_have_one_value_per_frame_and_entropy_only_for_merged_frames():
    tokens, _, _ = run(random_features(25), k=5)
    for values in tokens.frame_marks.values():
        assert values.shape == (25,)
    key = tokens.frame_marks["keyframe"].astype(bool)
    entropy = tokens.frame_marks["dfm_entropy"]
    assert (entropy[key] == 0).all() and ((entropy[~key] > 0) & (entropy[~key] <= 1)).all()
    assert set(np.flatnonzero(tokens.frame_marks["relevance_keyframe"])) <= set(np.flatnonzero(key))


def test_notes_say_parameter_free_without_the_checkpoint_module_and_learned_with_it():
    tokens, _, _ = run(random_features(10), k=2)
    assert any("parameter-free DFM" in note for note in tokens.notes)
    tokens, _, _ = run(random_features(10), FakeOps(dfm=DFMProjection(LLM_DIM, 512)), k=2)
    assert not any("parameter-free DFM" in note for note in tokens.notes)
    assert any("512-d CLIP" in note for note in tokens.notes)
    with pytest.raises(ModelUnavailable):
        run(random_features(10), k=2, dfm="learned")


def test_params_are_validated():
    for bad in ({"k": 0}, {"tau": 0.0}, {"dfm": "magic"}):
        with pytest.raises(UserFacingError):
            ViLAMPParams(**bad)


def test_registered_with_reference_defaults():
    backend = get_backend("vilamp")
    params = backend.make_params()
    assert (params.k, params.f2t_threshold, params.f2f_threshold, params.keyframe_quirk) == (32, 0.2, 0.85, True)
    assert backend.num_tokens(600, GRID, params) == 32 * 196 + 568 + 1


# ---- the original-layout checkpoint ----------------------------------------------------------------------------

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=72, intermediate_size=80, num_hidden_layers=2, num_attention_heads=1, image_size=54,
              patch_size=2)
QUERY_DIM = 16


def original_name(hf_name: str) -> str:
    """The LLaVA-NeXT/ViLAMP name of a transformers LlavaOnevision parameter (spelled out from the reference)."""
    replacements = (
        ("model.language_model.", "model."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    )
    for new, old in replacements:
        if hf_name.startswith(new):
            return old + hf_name[len(new):]
    return hf_name


def write_vilamp_checkpoint(directory, seed: int = 0):
    """A tiny random ViLAMP checkpoint in the ORIGINAL layout: llava_qwen config.json, two safetensors shards with an
    index, original key names, the SigPooling weights and a CLIP frame-selector tensor that must be skipped."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from engine.model_configs import byte_tokenizer

    tokenizer = byte_tokenizer()
    text = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, **TEXT)
    vision = SiglipVisionConfig(vision_use_head=False, **VISION)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=1,
                                  video_token_id=2, vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    source = LlavaOnevisionForConditionalGeneration(config).eval()
    state = {original_name(k): v.contiguous() for k, v in source.state_dict().items()}
    dfm = DFMProjection(TEXT["hidden_size"], QUERY_DIM)
    with torch.no_grad():
        dfm.tau.fill_(0.03)
    state.update({f"model.composer_projector.{k}": v.contiguous() for k, v in dfm.state_dict().items()})
    state["model.frame_selector.model.text_model.embeddings.token_embedding.weight"] = torch.randn(10, QUERY_DIM)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(directory / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = dict(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", vocab_size=len(tokenizer),
               rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=4096, tie_word_embeddings=False,
               hidden_act="silu", mm_vision_tower="google/siglip-so400m-patch14-384", mm_hidden_size=72,
               mm_projector_type="mlp2x_gelu", mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear",
               mm_vision_select_layer=-2, activate_frame_selector=True, frame_selector_type="SeqFrameSelector",
               f2f_thrd=0.85, f2t_thrd=0.2, max_frame_num=32, composer_type="sig_pooling",
               composer_proj_dim=QUERY_DIM, torch_dtype="bfloat16", **TEXT)
    (directory / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(directory)
    return source, dfm


@pytest.fixture(scope="module")
def vilamp_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vilamp-ckpt")
    source, dfm = write_vilamp_checkpoint(directory)
    return directory, source, dfm


def test_layout_is_detected_from_the_original_config(vilamp_checkpoint):
    from engine.checkpoints import detect_layout

    directory, _, _ = vilamp_checkpoint
    assert detect_layout(directory).name == "vilamp"


def test_original_checkpoint_loads_every_tensor_where_it_belongs(vilamp_checkpoint):
    from engine.loading import load_directory

    directory, source, dfm = vilamp_checkpoint
    loaded = load_directory(directory, "vilamp-tiny", False, torch.device("cpu"))
    model_state, source_state = loaded.model.state_dict(), source.state_dict()
    assert set(model_state) == set(source_state)
    for name in source_state:
        torch.testing.assert_close(model_state[name], source_state[name], atol=0, rtol=0, msg=name)
    loaded_dfm = loaded.extra_modules["dfm"]
    for name, value in dfm.state_dict().items():
        torch.testing.assert_close(loaded_dfm.state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert loaded_dfm.query_dim == QUERY_DIM and float(loaded_dfm.tau) == pytest.approx(0.03)
    vision = loaded.model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (72, 2, 54, 2)
    assert loaded.grid == GRID and loaded.vision_feature_layer == -1
    assert not loaded.model.config.text_config.tie_word_embeddings


def test_a_missing_tensor_is_a_clear_error(vilamp_checkpoint, tmp_path):
    import shutil

    from engine.checkpoints.vilamp import load

    directory, _, _ = vilamp_checkpoint
    for item in directory.iterdir():
        shutil.copy(item, tmp_path / item.name)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = "model.mm_projector.2.bias"
    shard = index["weight_map"][victim]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / shard))
    del tensors[victim]
    save_file(tensors, str(tmp_path / shard))
    with pytest.raises(ModelUnavailable, match="linear_2.bias"):
        load(tmp_path, torch.float32, "cpu")


def test_layout_chat_template_is_the_reference_qwen_1_5_prompt():
    from engine.checkpoints.llava_original import QWEN_1_5_TEMPLATE as CHAT_TEMPLATE
    from engine.sequence import render_prompt

    before, after = render_prompt(CHAT_TEMPLATE, QUESTION)
    # llava/conversation.py conv_qwen (CHATML), with "<image>\n{question}" as the user message.
    reference = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                 f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert before + "<image>" + after == reference


# ---- through the engine ---------------------------------------------------------------------------------------


def test_tiny_engine_answers_with_vilamp(tiny_engine):
    from tests.test_engine import make_clip, prepare

    clip = make_clip(40, seed=3)
    answer = tiny_engine.answer(prepare(tiny_engine, clip), "vilamp", QUESTION, params={"k": 4}, max_new_tokens=3)
    backend = get_backend("vilamp")
    expected = backend.num_tokens(40, tiny_engine.loaded.grid, backend.make_params({"k": 4}))
    assert answer.num_visual_tokens == expected == 4 * 196 + 36 + 1
    assert answer.frame_marks["keyframe"].sum() == 4
    assert answer.frame_attention.shape == (40,)
    # Every visual token but the trailing newline stands for a frame, so the frames get all the rest.
    newline_share = float(answer.token_attention[-1])
    assert math.isclose(float(answer.frame_attention.sum()), 1.0 - newline_share, rel_tol=1e-4)


def test_vilamp_checkpoint_runs_with_its_learned_dfm(vilamp_checkpoint):
    from engine.api import Engine
    from engine.loading import load_directory
    from tests.test_engine import make_clip

    directory, _, _ = vilamp_checkpoint
    engine = Engine(load_directory(directory, "vilamp-tiny", False, torch.device("cpu")))
    tokens = engine.compress("vilamp", engine.encode(make_clip(12, seed=4)), QUESTION, {"k": 3})
    assert tokens.num_tokens == 3 * 196 + 9 + 1
    assert not any("parameter-free DFM" in note for note in tokens.notes)
    assert any(f"{QUERY_DIM}-d CLIP" in note for note in tokens.notes)
