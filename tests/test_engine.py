"""The shared engine on the tiny model: exactness against transformers, caching, probes, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from engine.api import Engine, Prepared, check_question, frame_attention
from engine.errors import ModelUnavailable, QuestionError
from engine.loading import build_tiny_checkpoint, cache_root, load_model
from engine.prefill import dense_prefill, prefill
from engine.preprocess import preprocess_frames
from engine.types import Clip, Sampling, VideoMeta

QUESTION = "What is drawn in the frames?"


def make_clip(num_frames: int, seed: int = 0, content_hash: str = "clip") -> Clip:
    frames = np.random.RandomState(seed).randint(0, 255, (num_frames, 48, 64, 3), dtype=np.uint8)
    meta = VideoMeta("synthetic", float(num_frames), 1.0, num_frames, 64, 48, 0, "synthetic")
    stamps = np.arange(num_frames, dtype=float)
    return Clip(frames, stamps, np.arange(num_frames), meta, content_hash, Sampling(max_frames=num_frames))


@pytest.fixture(scope="module")
def reference_model():
    """The same tiny checkpoint loaded by plain transformers with eager attention."""
    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        cache_root() / "tiny-v1", attn_implementation="eager"
    ).eval()


def reference_inputs(engine: Engine, clip: Clip, question: str) -> dict:
    loaded = engine.loaded
    pixels = preprocess_frames(clip.frames, loaded.image_size, loaded.image_mean, loaded.image_std,
                               torch.device("cpu"), torch.float32)[None]
    prefix, suffix = engine.ops.prompt_ids(question)
    grid = loaded.grid
    n_video = clip.num_frames * ((grid + 1) // 2) ** 2 + 1
    ids = prefix + [loaded.model.config.video_token_id] * n_video + suffix
    return {"input_ids": torch.tensor([ids]), "pixel_values_videos": pixels}


def prepare(engine: Engine, clip: Clip) -> Prepared:
    return Prepared(clip, engine.encode(clip), [])


def test_uniform_first_token_logits_equal_transformers(tiny_engine, reference_model):
    clip = make_clip(6)
    tokens = tiny_engine.compress("uniform", tiny_engine.encode(clip), QUESTION)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    with torch.inference_mode():
        ours = tiny_engine.ops.runner.logits(prefill(tiny_engine.ops.runner, seq, tokens.plan).last_hidden)
        theirs = reference_model(**reference_inputs(tiny_engine, clip, QUESTION)).logits[0, -1]
    assert seq.length == reference_inputs(tiny_engine, clip, QUESTION)["input_ids"].shape[1]
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)


def test_greedy_answer_equals_transformers_generate(tiny_engine, reference_model):
    clip = make_clip(3, seed=1)
    answer = tiny_engine.answer(prepare(tiny_engine, clip), "uniform", QUESTION, max_new_tokens=6)
    inputs = reference_inputs(tiny_engine, clip, QUESTION)
    with torch.inference_mode():
        out = reference_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    stop = {tiny_engine.loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    expected = []
    for token in new_ids:
        if token in stop:
            break
        expected.append(token)
    assert answer.new_tokens == len(expected)
    assert answer.text == tiny_engine.loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_probe_equals_eager_attention_weights(tiny_engine, reference_model):
    clip = make_clip(2, seed=2)
    tokens = tiny_engine.compress("uniform", tiny_engine.encode(clip), QUESTION)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    with torch.inference_mode():
        result = dense_prefill(tiny_engine.ops.runner, seq, chunk=100)
        out = reference_model(**reference_inputs(tiny_engine, clip, QUESTION), output_attentions=True)
    for layer, weights in enumerate(out.attentions):
        expected = weights[0, :, seq.question_start:, :].mean(dim=(0, 1))
        torch.testing.assert_close(result.probe.mean_rows[layer], expected.float(), atol=1e-5, rtol=1e-4)


def test_chunk_size_does_not_change_the_prefill(tiny_engine):
    tokens = tiny_engine.compress("uniform", tiny_engine.encode(make_clip(3, seed=3)), QUESTION)
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    runner = tiny_engine.ops.runner
    with torch.inference_mode():
        whole = dense_prefill(runner, seq, chunk=10_000).last_hidden
        pieces = dense_prefill(runner, seq, chunk=97).last_hidden
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=1e-5)


def test_second_question_and_backend_reuse_encoded_features(tiny_engine):
    calls = []
    hook = tiny_engine.loaded.model.model.vision_tower.embeddings.register_forward_hook(
        lambda *args: calls.append(1))
    try:
        clip = make_clip(4, seed=4, content_hash="reuse-test")
        first = tiny_engine.encode(clip)
        assert len(calls) == 1
        again = tiny_engine.encode(make_clip(4, seed=4, content_hash="reuse-test"))
        prepared = Prepared(clip, again, [])
        tiny_engine.answer(prepared, "uniform", "first question?", max_new_tokens=2)
        tiny_engine.answer(prepared, "uniform", "second question?", max_new_tokens=2)
        assert again is first
        assert len(calls) == 1
        tiny_engine.encode(make_clip(4, seed=4, content_hash="another-file"))
        assert len(calls) == 2
    finally:
        hook.remove()


def test_attention_sums_to_one_and_maps_to_frames(tiny_engine):
    clip = make_clip(5, seed=5)
    answer = tiny_engine.answer(prepare(tiny_engine, clip), "uniform", QUESTION, max_new_tokens=1)
    assert answer.token_attention.shape == (answer.num_visual_tokens,)
    assert answer.token_attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert answer.frame_attention.shape == (5,)
    newline_share = answer.token_attention[-1]
    assert answer.frame_attention.sum() == pytest.approx(1.0 - newline_share, abs=1e-5)
    assert [s.name for s in answer.stages] == ["compress", "prefill", "generate"]


def test_frame_attention_spreads_a_token_over_its_span():
    scores = torch.tensor([0.6, 0.4])
    span = torch.tensor([[0, 2], [3, 3]])
    np.testing.assert_allclose(frame_attention(scores, span, 4), [0.2, 0.2, 0.2, 0.4], atol=1e-6)


@pytest.mark.parametrize("question", ["", "   ", "x" * 5000])
def test_bad_questions_are_refused(question):
    with pytest.raises(QuestionError):
        check_question(question)


def test_a_saved_checkpoint_directory_loads_through_the_same_path(tmp_path, tiny_engine):
    directory = build_tiny_checkpoint(tmp_path / "ckpt", seed=7)
    loaded = load_model(str(directory), device="cpu")
    assert loaded.random_weights is False and loaded.grid == 27
    reference = LlavaOnevisionForConditionalGeneration.from_pretrained(directory)
    for (name, ours), (_, theirs) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(ours, theirs), name
    assert not torch.equal(loaded.model.lm_head.weight, tiny_engine.loaded.model.lm_head.weight)


def test_offline_hub_preset_gives_a_how_to_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    with pytest.raises(ModelUnavailable) as info:
        load_model("llava-ov-0.5b", device="cpu")
    message = str(info.value)
    assert "llava-ov-0.5b" in message and "hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in message

