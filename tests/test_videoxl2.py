"""`videoxl2` on constructed features: DTS token layout (144 per group, LAST-frame padding, markers, blocks), the
raw-reshape quirk, both fusions, the learned module's checkpoint names, and the original checkpoint layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from backends.dts_fusion import (
    DTSAutoencoder,
    TimeStridedConv,
    learned_fusion,
    parameter_free_fusion,
    reference_time_axis,
    relative_attention,
)
from backends.registry import get_backend
from backends.videoxl2 import PARAMETER_FREE_NOTE, padded_frame_index, resize_maps
from engine.api import Engine, Prepared
from engine.checkpoints import detect_layout
from engine.errors import ModelUnavailable, UserFacingError
from engine.kv_plans import dense_frame_mask, frame_relevance
from engine.loading import build_tiny_checkpoint, load_directory
from engine.model_configs import byte_tokenizer
from engine.prefill import prefill
from engine.types import ChunkedPlan, Clip, FrameFeatures, Sampling, VideoMeta

QUESTION = "When does the ball appear?"
VISION_DIM, LLM_DIM, GRID = 64, 32, 27


class FakeOps:
    """ModelOps over fixed random pieces: a Linear projector, hashed text embeddings, an optional fusion module."""

    def __init__(self, fusion: nn.Module | None = None) -> None:
        torch.manual_seed(0)
        self.projector = nn.Linear(VISION_DIM, LLM_DIM)
        self.table = torch.randn(256, LLM_DIM)
        self.modules = {"dts_fusion": fusion} if fusion is not None else {}
        self.grid, self.vision_heads = GRID, 4
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.projector(vision_features)

    def image_newline(self) -> torch.Tensor:
        return torch.zeros(LLM_DIM)

    def embed_text(self, text: str) -> torch.Tensor:
        return self.table[torch.tensor(list(text.encode()))]

    def question_attention(self, tokens: torch.Tensor, question: str) -> torch.Tensor:
        return torch.full((tokens.shape[0],), 1.0 / tokens.shape[0])

    def extra_module(self, name: str) -> nn.Module | None:
        return self.modules.get(name)


def features(num_frames: int, timestamps=None, seed: int = 0, values: torch.Tensor | None = None) -> FrameFeatures:
    patches = values if values is not None else torch.randn(num_frames, GRID * GRID, VISION_DIM,
                                                           generator=torch.Generator().manual_seed(seed))
    stamps = np.arange(num_frames, dtype=float) if timestamps is None else np.asarray(timestamps, dtype=float)
    return FrameFeatures(patches=patches, grid=GRID, timestamps=stamps, cache_key=f"f{num_frames}-{seed}")


def compress(feats: FrameFeatures, ops: FakeOps | None = None, **overrides):
    backend = get_backend("videoxl2")
    return backend.compress(feats, QUESTION, ops or FakeOps(), backend.make_params(overrides))


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5, 8, 13])
def test_144_tokens_per_group_of_four_and_the_count_is_known_up_front(num_frames):
    backend = get_backend("videoxl2")
    tokens = compress(features(num_frames))
    groups = math.ceil(num_frames / 4)
    assert tokens.num_tokens == groups * 144 == backend.num_tokens(num_frames, GRID, backend.make_params())
    assert [index for index, _ in tokens.markers] == [144 * g for g in range(groups)]
    assert tokens.embeds.shape == (groups * 144, LLM_DIM)


@pytest.mark.parametrize("num_frames,expected", [(1, [0, 0, 0, 0]), (2, [0, 1, 1, 1]), (4, [0, 1, 2, 3]),
                                                 (6, [0, 1, 2, 3, 4, 5, 5, 5])])
def test_padding_repeats_the_last_frame(num_frames, expected):
    assert padded_frame_index(num_frames, 4).tolist() == expected


def test_a_padded_group_is_the_last_frame_alone_and_points_at_it():
    """Frames 4 and 5 of a 6-frame clip fill group 1 as [4, 5, 5, 5]: with frames 4 and 5 identical, the fused map is
    that frame, projected and pooled; provenance of group 1 is (4, 5), never a padding slot."""
    patches = torch.randn(6, GRID * GRID, VISION_DIM)
    patches[5] = patches[4]
    tokens = compress(features(6, values=patches), fusion="parameter-free")
    alone = FakeOps().project(resize_maps(patches[4:5], GRID).permute(0, 2, 3, 1).reshape(1, 576, VISION_DIM))
    pooled = F.avg_pool2d(alone.view(1, 24, 24, LLM_DIM).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(144, -1)
    torch.testing.assert_close(tokens.embeds[144:], pooled, atol=1e-5, rtol=1e-5)
    assert tokens.frame_span[:144].unique(dim=0).tolist() == [[0, 3]]
    assert tokens.frame_span[144:].unique(dim=0).tolist() == [[4, 5]]


def test_groups_are_independent_of_how_many_are_fused_at_once():
    feats = features(100, seed=4)
    whole = compress(feats)
    tail = compress(features(4, values=feats.patches[96:]))
    assert whole.num_tokens == 25 * 144
    torch.testing.assert_close(whole.embeds[24 * 144 :], tail.embeds)


def test_markers_name_each_group_by_its_first_frame_time_rounded_to_a_tenth():
    stamps = [0.0, 0.9, 1.7, 2.6, 4.04, 5.0, 6.0, 7.0, 12.96, 13.5]
    tokens = compress(features(10, timestamps=stamps))
    assert tokens.markers == [(0, "Time 0.0s:"), (144, "Time 4.0s:"), (288, "Time 13.0s:")]


def test_block_ids_plan_and_frame_marks():
    tokens = compress(features(40), block_groups=4, prev_blocks=3, kv_topk=2, kv_pool=4)
    group = torch.arange(tokens.num_tokens) // 144
    assert torch.equal(tokens.block, group // 4)
    assert tokens.plan == ChunkedPlan(prev_blocks=3, kv_topk=2, kv_pool=4)
    np.testing.assert_array_equal(tokens.frame_marks["block"], np.arange(40) // 16)
    assert torch.equal(tokens.block, torch.tensor([0] * 576 + [1] * 576 + [2] * 288))


def test_resize_is_bilinear_with_half_pixel_centres_in_float32():
    """A horizontal ramp stays a ramp sampled at (i + ½)·27/24 − ½ (align_corners False; True would give i·26/23)."""
    ramp = torch.arange(GRID, dtype=torch.float32).repeat(GRID, 1).reshape(1, GRID * GRID, 1).expand(1, -1, 2)
    resized = resize_maps(ramp.contiguous(), GRID)
    expected = (torch.arange(24) + 0.5) * 27 / 24 - 0.5
    torch.testing.assert_close(resized[0, 0], expected.repeat(24, 1))
    low = torch.randn(2, GRID * GRID, 3).bfloat16()
    assert torch.equal(resize_maps(low, GRID), resize_maps(low.float(), GRID).bfloat16())


def test_raw_reshape_puts_frame_f_in_channels_288f_onwards():
    """With 1152 channels, the autoencoder's "time" axis of channel c reads channels 4c … 4c+3 of frame c // 288."""
    frames = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 1152, 24, 24).contiguous()
    layout = reference_time_axis(frames)
    assert layout.shape == (2, 1152, 4, 24, 24)
    for g in range(2):
        for f in range(4):
            assert (layout[g, 288 * f : 288 * (f + 1)] == 4 * g + f).all()
    channel_ids = torch.arange(1152, dtype=torch.float32)[None, :, None, None].expand(4, 1152, 24, 24).contiguous()
    reshaped = reference_time_axis(channel_ids)
    c = torch.arange(1152)
    for t in range(4):
        assert torch.equal(reshaped[0, :, t, 0, 0], ((4 * c + t) % 1152).float())


def test_the_learned_module_sees_the_raw_reshape_of_padded_resized_frames():
    module = DTSAutoencoder(VISION_DIM).eval()
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    feats = features(6, seed=3)
    tokens = compress(feats, FakeOps(module), fusion="learned")
    padded = resize_maps(feats.patches, GRID)[torch.tensor([0, 1, 2, 3, 4, 5, 5, 5])]
    torch.testing.assert_close(seen[0], padded.contiguous().view(2, VISION_DIM, 4, 24, 24))
    assert tokens.num_tokens == 288 and tokens.notes == []


def test_parameter_free_fusion_averages_agreement_and_favours_the_odd_frame():
    base = torch.randn(1, 8, 3, 3)
    same = base.expand(4, -1, -1, -1).contiguous()
    torch.testing.assert_close(parameter_free_fusion(same)[0], base[0].flatten(1).T)
    odd = same.clone()
    odd[2, :, 1, 1] = -base[0, :, 1, 1]
    fused = parameter_free_fusion(odd)[0].view(3, 3, 8)
    plain_mean = odd.mean(0)[:, 1, 1]
    assert torch.dot(fused[1, 1], odd[2, :, 1, 1]) > torch.dot(plain_mean, odd[2, :, 1, 1])
    torch.testing.assert_close(fused[0, 0], base[0, :, 0, 0])


def test_fusion_choice_and_its_label():
    module = DTSAutoencoder(VISION_DIM).eval()
    assert compress(features(4)).notes == [PARAMETER_FREE_NOTE]
    assert compress(features(4), FakeOps(module)).notes == []
    assert compress(features(4), FakeOps(module), fusion="parameter-free").notes == [PARAMETER_FREE_NOTE]
    with pytest.raises(ModelUnavailable):
        compress(features(4), fusion="learned")
    with pytest.raises(UserFacingError):
        compress(features(6), FakeOps(module), group_size=3, fusion="learned")
    assert compress(features(6), group_size=3, fusion="parameter-free").num_tokens == 2 * 144
    assert compress(features(6), FakeOps(module), group_size=3).notes == [PARAMETER_FREE_NOTE]
    with pytest.raises(UserFacingError):
        get_backend("videoxl2").make_params({"fusion": "median"})


def reference_fusion_keys() -> dict[str, tuple[int, ...]]:
    """`model.sae.*` names and shapes of the public checkpoint (sae.py / sae_utils.py), for C channels = 1152."""
    c, keys = 1152, {"temporal_encoding": (4, 1152)}
    for i in (0, 3):
        keys |= {f"encoder.{i}.norm.weight": (c,), f"encoder.{i}.norm.bias": (c,)}
        for name in ("q", "k", "v", "proj_out"):
            keys |= {f"encoder.{i}.{name}.weight": (c, c, 1, 1, 1), f"encoder.{i}.{name}.bias": (c,)}
    for i in (1, 4):
        keys |= {f"encoder.{i}.norm.weight": (c,), f"encoder.{i}.norm.bias": (c,),
                 f"encoder.{i}.qkv.weight": (3 * c, c, 1), f"encoder.{i}.qkv.bias": (3 * c,),
                 f"encoder.{i}.relative_position_k.embeddings_table": (129, c),
                 f"encoder.{i}.relative_position_v.embeddings_table": (129, c),
                 f"encoder.{i}.proj_out.weight": (c, c, 1), f"encoder.{i}.proj_out.bias": (c,)}
    for i in (2, 5):
        keys |= {f"encoder.{i}.conv.weight": (c, c, 3, 3, 3), f"encoder.{i}.conv.bias": (c,)}
    return keys


def test_learned_module_names_match_the_public_checkpoint():
    with torch.device("meta"):
        module = DTSAutoencoder(1152)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == reference_fusion_keys()


def test_learned_module_halves_time_twice_and_keeps_space():
    module = DTSAutoencoder(VISION_DIM).eval()
    with torch.no_grad():
        assert module(torch.randn(3, VISION_DIM, 4, 24, 24)).shape == (3, VISION_DIM, 1, 24, 24)
        conv = TimeStridedConv(32)
        assert conv(torch.randn(1, 32, 4, 5, 5)).shape == (1, 32, 2, 5, 5)
        assert learned_fusion(module, torch.randn(8, VISION_DIM, 24, 24)).shape == (2, 576, VISION_DIM)


def test_temporal_attention_key_term_uses_the_key_position_query_and_reversed_distance():
    """k = 0 and v = one-hot time, so the output is the attention matrix: w[i, j] ∝ exp(C^-¼ q_j · table[i − j])."""
    torch.manual_seed(1)
    channels, length = 4, 3
    q = torch.randn(1, channels, length)
    v = torch.zeros(1, channels, length)
    v[0, :length, :length] = torch.eye(length)
    table = torch.randn(2 * length - 1, channels)
    distance = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    table_k = table[distance + length - 1]
    out = relative_attention(q, torch.zeros_like(q), v, table_k, torch.zeros(length, length, channels))
    weights = out[0, :length].T
    logits = torch.empty(length, length)
    for i in range(length):
        for j in range(length):
            logits[i, j] = channels**-0.25 * q[0, :, j] @ table[(i - j) + length - 1]
    torch.testing.assert_close(weights, logits.softmax(dim=-1))
    standard = torch.stack([channels**-0.25 * table_k[i] @ q[0, :, i] for i in range(length)]).softmax(dim=-1)
    assert not torch.allclose(weights, standard, atol=1e-3)


def make_clip(num_frames: int, seed: int = 0) -> Clip:
    frames = np.random.RandomState(seed).randint(0, 255, (num_frames, 32, 32, 3), dtype=np.uint8)
    meta = VideoMeta("synthetic", num_frames / 2, 2.0, num_frames, 32, 32, 0, "synthetic")
    stamps = np.arange(num_frames) / 2.0
    return Clip(frames, stamps, np.arange(num_frames), meta, f"xl2-{seed}", Sampling(max_frames=num_frames))


def test_end_to_end_on_the_tiny_engine(tiny_engine):
    clip = make_clip(36)
    prepared = Prepared(clip, tiny_engine.encode(clip), [])
    backend = get_backend("videoxl2")
    dense = tiny_engine.answer(prepared, "videoxl2", QUESTION, {"kv_topk": -1}, max_new_tokens=3)
    mixed = tiny_engine.answer(prepared, "videoxl2", QUESTION, {"kv_topk": 0}, max_new_tokens=3)
    assert dense.num_visual_tokens == backend.num_tokens(36, tiny_engine.ops.grid, backend.make_params()) == 9 * 144
    assert mixed.extras["kv_bytes"] < dense.extras["kv_bytes"]
    assert mixed.notes == [PARAMETER_FREE_NOTE]
    np.testing.assert_array_equal(mixed.frame_marks["block"], np.arange(36) // 16)
    assert mixed.frame_attention.sum() == pytest.approx(1.0, abs=1e-4)

    tokens = tiny_engine.compress("videoxl2", prepared.features, QUESTION, {"kv_topk": 0})
    seq = tiny_engine.ops.sequence(tokens, QUESTION)
    with torch.inference_mode():
        result = prefill(tiny_engine.ops.runner, seq, tokens.plan)
    np.testing.assert_array_equal(dense_frame_mask(result, tokens), (np.arange(36) // 16 != 1).astype(float))
    relevance = frame_relevance(result, seq, tokens)
    assert relevance.shape == (36,) and len(np.unique(relevance[:16])) == 1
    marks = backend.prefill_marks(tokens, seq, result, 36)
    assert set(marks) == {"dense", "relevance"}


# --- the original BAAI/Video-XL-2 checkpoint layout ---------------------------------------------------------------

def original_checkpoint(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Tiny random weights under the names Video-XL-2 saves (Qwen2 LM, SigLIP under vision_tower.vision_tower, the
    mlp2x_gelu projector, the SAE, the unused text_mlp), and its config.json fields."""
    torch.manual_seed(seed)
    vocab = len(byte_tokenizer())
    text = Qwen2Config(vocab_size=vocab, hidden_size=LLM_DIM, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=VISION_DIM, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=1, image_size=54, patch_size=2, vision_use_head=False)
    tensors = dict(Qwen2ForCausalLM(text).state_dict())
    tower = SiglipVisionModel(vision).state_dict()  # saved by transformers 4.x: always under "vision_model."
    tensors |= {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
                for k, v in tower.items()}
    projector = nn.Sequential(nn.Linear(VISION_DIM, LLM_DIM), nn.GELU(), nn.Linear(LLM_DIM, LLM_DIM))
    tensors |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    tensors |= {f"model.sae.{k}": v for k, v in DTSAutoencoder(VISION_DIM).state_dict().items()}
    tensors |= {f"model.text_mlp.{k}": v for k, v in nn.Sequential(nn.Linear(LLM_DIM, LLM_DIM)).state_dict().items()}
    config = {"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "vocab_size": vocab,
              "hidden_size": LLM_DIM, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu",
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": VISION_DIM, "mm_patch_merge_type": "unires", "mm_resampler_type": "spatial_pool",
              "mm_spatial_pool_mode": "average", "mm_spatial_pool_stride": 2, "freeze_sae": False}
    return {k: v.contiguous() for k, v in tensors.items()}, config


def write_checkpoint(directory, tensors: dict, config: dict):
    """Two shards plus the index json, as the hub repository stores it."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / file))
        weight_map |= {k: file for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    byte_tokenizer().save_pretrained(directory)
    return directory


def engine_name(original: str, nested_vision: bool) -> str:
    """Where each original weight must land in LlavaOnevisionForConditionalGeneration (transformers 5 naming; some
    5.x releases keep SigLIP's own "vision_model." level)."""
    vision = "model.vision_tower.vision_model." if nested_vision else "model.vision_tower."
    for old, new in (("model.vision_tower.vision_tower.vision_model.", vision),
                     ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")):
        if original.startswith(old):
            return new + original[len(old):]
    return original if original == "lm_head.weight" else "model.language_model." + original[len("model."):]


def test_the_original_checkpoint_loads_through_the_layout(tmp_path):
    tensors, config = original_checkpoint()
    directory = write_checkpoint(tmp_path / "Video-XL-2", tensors, config)
    assert detect_layout(directory).name == "videoxl2"
    assert detect_layout(build_tiny_checkpoint(tmp_path / "llava-ov")).name == "llava-hf"
    loaded = load_directory(directory, "videoxl2-tiny", False, torch.device("cpu"))
    state = loaded.model.state_dict()
    nested = "model.vision_tower.vision_model.post_layernorm.weight" in state
    into_model = {k: v for k, v in tensors.items() if not k.startswith(("model.sae.", "model.text_mlp."))}
    mapped = {engine_name(k, nested): v for k, v in into_model.items()}
    assert set(state) == set(mapped) | {"model.image_newline"}
    for name, value in mapped.items():
        assert torch.equal(state[name], value), name
    assert (state["model.image_newline"] == 0).all()
    fusion = loaded.extra_modules["dts_fusion"]
    for name, value in fusion.state_dict().items():
        assert torch.equal(value, tensors[f"model.sae.{name}"]), name
    assert loaded.grid == 27 and loaded.vision_feature_layer == -1

    engine = Engine(loaded)
    clip = make_clip(8)
    answer = engine.answer(Prepared(clip, engine.encode(clip), []), "videoxl2", QUESTION, max_new_tokens=2)
    assert answer.notes == [] and answer.num_visual_tokens == 288


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_checkpoint_that_does_not_match_is_refused(tmp_path, change):
    tensors, config = original_checkpoint()
    if change == "missing":
        tensors.pop("model.layers.1.mlp.up_proj.weight")
    else:
        tensors["model.some_new_module.weight"] = torch.zeros(2)
    directory = write_checkpoint(tmp_path / change, tensors, config)
    with pytest.raises(ModelUnavailable):
        load_directory(directory, "broken", False, torch.device("cpu"))
