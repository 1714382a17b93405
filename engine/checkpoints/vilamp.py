"""The ViLAMP checkpoint (orange-sk/ViLAMP-llava-qwen): the original LLaVA-NeXT `llava_qwen` layout, mapped key by
key onto transformers' LlavaOnevisionForConditionalGeneration, plus the learned DFM module as extra "dfm".

Reference: steven-ccq/ViLAMP — `llava/model/language_model/llava_qwen.py` (LlavaQwenConfig fields),
`llava/model/llava_arch.py` (LlavaLongVideoMetaModel: vision_tower, mm_projector, frame_selector,
composer_projector, image_newline), `llava/model/multimodal_encoder/siglip_encoder.py` (SigLIP with its last layer
deleted and no head; features = last remaining hidden state) and `llava/model/multimodal_projector/builder.py`
(mlp2x_gelu projector, SigPooling). The CLIP frame selector (`model.frame_selector.model.*`) is not loaded: its
tokenizer is not part of the checkpoint, and keyframe relevance is computed from the LLM instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from backends.vilamp_dfm import DFMProjection
from engine.checkpoints.registry import CheckpointLayout, register_layout
from engine.errors import ModelUnavailable

INDEX_FILE = "model.safetensors.index.json"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
DFM_PREFIX = "model.composer_projector."
SKIPPED = (
    re.compile(r"^model\.frame_selector\."),  # ViLAMP's CLIP ViT-B/32 selector (see the module docstring)
    re.compile(r"^model\.vision_resampler\."),  # identity resampler; nothing to load
    re.compile(r"rotary_emb\.inv_freq$"),  # recomputed from the config
)
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "bos_token_id", "eos_token_id",
)
SIGLIP_SO400M_HEAD_DIM = 72  # 1152 / 16: the only tower the reference builds (its SigLipVisionConfig defaults)
SO400M_DEPTH = 27  # a whole so400m tower; the reference always runs it without its last layer
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647  # llava-hf's Qwen2 ids; the engine passes embeddings, not ids

# The reference's "qwen_1_5" conversation: system turn, then "<image>\n{question}" in the user turn.
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_vilamp_config(config: dict) -> bool:
    """A LLaVA-NeXT `llava_qwen` config carrying ViLAMP's selector/composer fields."""
    return config.get("model_type") == "llava_qwen" and "composer_type" in config and "f2f_thrd" in config


def map_key(name: str) -> tuple[str, str] | None:
    """(target, key) for a checkpoint key: target "llava" (the LlavaOnevision model) or "dfm"; None = skipped.

    Raises KeyError for a key this layout does not know."""
    if any(pattern.search(name) for pattern in SKIPPED):
        return None
    if name == "lm_head.weight":
        return "llava", name
    if name.startswith(DFM_PREFIX):
        return "dfm", name[len(DFM_PREFIX):]
    if name.startswith(VISION_PREFIX):
        return "llava", "model.vision_tower." + name[len(VISION_PREFIX):]
    projector = re.match(r"^model\.mm_projector\.([02])\.(weight|bias)$", name)
    if projector:
        layer = {"0": "linear_1", "2": "linear_2"}[projector.group(1)]
        return "llava", f"model.multi_modal_projector.{layer}.{projector.group(2)}"
    if name == "model.image_newline":
        return "llava", name
    if re.match(r"^model\.(embed_tokens|layers|norm)\.", name):
        return "llava", "model.language_model." + name[len("model."):]
    raise KeyError(name)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors shards, from the index when there is one."""
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(f"{directory} has no .safetensors weights (the ViLAMP layout needs them).")
    return files


def tensor_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Every key's shape, read from the shard headers without loading tensors."""
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    return shapes


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def vision_config(shapes: dict[str, list[int]]) -> SiglipVisionConfig:
    """The SigLIP tower's shapes from the weights (the reference's config.json does not describe it)."""
    patch = shapes[VISION_PREFIX + "embeddings.patch_embedding.weight"]
    positions = shapes[VISION_PREFIX + "embeddings.position_embedding.weight"][0]
    layer_key = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in shapes if (m := layer_key.match(k))}
    hidden = patch[0]
    heads = hidden // SIGLIP_SO400M_HEAD_DIM if hidden % SIGLIP_SO400M_HEAD_DIM == 0 else max(1, hidden // 64)
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        image_size=math.isqrt(positions) * patch[2],
        patch_size=patch[2],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def feature_layer(shapes: dict[str, list[int]]) -> int:
    """The reference deletes SigLIP's last layer and takes the last remaining hidden state (before post_layernorm):
    layer -1 of the tower as saved (already shortened), -2 if a whole 27-layer tower was saved."""
    return -2 if vision_config(shapes).num_hidden_layers == SO400M_DEPTH else -1


def llava_config(config: dict, shapes: dict[str, list[int]]) -> LlavaOnevisionConfig:
    """A LlavaOnevisionConfig equivalent to a ViLAMP `llava_qwen` config.json."""
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ModelUnavailable(f"ViLAMP layout: projector {config['mm_projector_type']!r} is not the 2-layer GELU MLP "
                               f"LLaVA-OneVision uses.")
    text_fields = {k: config[k] for k in QWEN2_FIELDS if k in config}
    tied = bool(config.get("tie_word_embeddings", False))
    text_fields["tie_word_embeddings"] = tied
    # The reference drops rope_scaling (LlavaQwenForCausalLM.__init__ sets it to None).
    text = Qwen2Config(**text_fields)
    return LlavaOnevisionConfig(
        vision_config=vision_config(shapes).to_dict(),
        text_config=text.to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_feature_layer=feature_layer(shapes),
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )


def _target_device(device_map: str | dict) -> torch.device:
    if isinstance(device_map, dict):
        raise ModelUnavailable("The ViLAMP layout loads onto one device; a per-module device_map is not supported.")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def _assign(tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor, source: str) -> None:
    if name not in tensors:
        raise ModelUnavailable(f"ViLAMP layout: checkpoint key {source!r} maps to {name!r}, which the model lacks.")
    if list(tensors[name].shape) != list(value.shape):
        raise ModelUnavailable(f"ViLAMP layout: {source!r} has shape {list(value.shape)}, the model expects "
                               f"{list(tensors[name].shape)}.")
    tensors[name].copy_(value)


@torch.no_grad()
def load(directory: Path, dtype: torch.dtype, device_map: str | dict) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Build the model from the converted config on the target device, then copy every tensor in by mapped name."""
    files = checkpoint_files(directory)
    shapes = tensor_shapes(files)
    raw = json.loads((directory / "config.json").read_text())
    unknown = []
    for key in shapes:
        try:
            map_key(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ModelUnavailable(f"ViLAMP layout: {len(unknown)} checkpoint keys have no known place, "
                               f"e.g. {unknown[:3]}.")
    device = _target_device(device_map)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(
            llava_config(raw, shapes), dtype=dtype, attn_implementation="sdpa")
    dfm = None
    if DFM_PREFIX + "linear_q.weight" in shapes:
        hidden, query_dim = shapes[DFM_PREFIX + "linear_q.weight"]
        dfm = DFMProjection(hidden, query_dim).to(device=device, dtype=dtype)
    targets = {"llava": dict(model.state_dict(keep_vars=True)), "dfm": dict(dfm.state_dict(keep_vars=True)) if dfm
               else {}}
    loaded: dict[str, set[str]] = {"llava": set(), "dfm": set()}
    for key, value in iter_tensors(files):
        mapped = map_key(key)
        if mapped is None:
            continue
        target, name = mapped
        _assign(targets[target], name, value, key)
        loaded[target].add(name)
    if model.config.text_config.tie_word_embeddings and "model.language_model.embed_tokens.weight" in loaded["llava"]:
        loaded["llava"].add("lm_head.weight")
    for target, expected in targets.items():
        missing = sorted(set(expected) - loaded[target])
        if missing:
            raise ModelUnavailable(f"ViLAMP layout: the checkpoint lacks {len(missing)} {target} weights, e.g. "
                                   f"{missing[:3]}.")
    extras = {"dfm": dfm} if dfm is not None else {}
    overrides = {"vision_feature_layer": model.config.vision_feature_layer, "chat_template": CHAT_TEMPLATE,
                 "spatial_pool_mode": raw.get("mm_spatial_pool_mode", "bilinear")}
    return model, extras, overrides


LAYOUT = register_layout(CheckpointLayout(name="vilamp", detect=is_vilamp_config, load=load))
