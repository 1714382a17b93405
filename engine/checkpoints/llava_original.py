"""Original LLaVA-NeXT `llava_qwen` checkpoints (the layout Video-XL-2 and ViLAMP both save), loaded key by key into
transformers' LlavaOnevisionForConditionalGeneration without trust_remote_code.

Shared keys: `model.embed_tokens|layers|norm.*` and `lm_head.weight` (Qwen2), `model.vision_tower.vision_tower.
vision_model.*` (SigLIP, saved without its last layer and head), `model.mm_projector.{0,2}.*` (mlp2x_gelu) and
`model.image_newline`. A layout adds its own extra module by key prefix and names the keys it skips.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from engine.errors import ModelUnavailable

INDEX_FILE = "model.safetensors.index.json"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_LAYERS = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
LANGUAGE_KEY = re.compile(r"^model\.(embed_tokens|layers|norm)\.")
ALWAYS_SKIPPED = ("model.vision_resampler.",)  # the identity resampler: nothing to load
# Where each part lives in the engine model is found by a parameter it must hold, since transformers 5.x releases
# differ in nesting (some keep SigLIP's own "vision_model." level).
ENGINE_ANCHORS = {"language": "embed_tokens.weight", "vision": "embeddings.patch_embedding.weight",
                  "projector": "linear_1.weight", "newline": "image_newline"}
SIGLIP_SO400M_HEAD_DIM = 72  # 1152 / 16: the only tower the references build; config.json names it by hub id only
SO400M_DEPTH = 27  # a whole so400m tower; the references always run it without its last layer
QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = 151655, 151654  # unused by the engine, which passes embeddings, not ids
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "bos_token_id", "eos_token_id",
)
# Qwen2/2.5 release values, for the rare config.json that leaves a field out (Qwen2Config's own rope_theta differs).
QWEN2_DEFAULTS = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                  "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False}

# The references' "qwen_1_5" conversation (LLaVA-NeXT conv_qwen, ChatML): the default system turn, then the visual
# placeholder, "\n" and the question in the user turn.
QWEN_1_5_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class OriginalCheckpoint:
    """An original checkpoint directory: its config.json, and each tensor key's shard and shape (headers only)."""

    directory: Path
    config: dict
    files: dict[str, Path]
    shapes: dict[str, list[int]]


def shard_files(directory: Path, label: str) -> list[Path]:
    """The safetensors shards, from the index when there is one."""
    index = directory / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in names]
        absent = [path.name for path in files if not path.is_file()]
        if absent:
            raise ModelUnavailable(f"{label} layout: {directory} lacks the shards its index names, e.g. {absent[:3]}.")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(f"{label} layout: {directory} has no .safetensors weights.")
    return files


def read_checkpoint(directory: Path, label: str) -> OriginalCheckpoint:
    """config.json plus every tensor's shard and shape, read from the shard headers (not trusted from the index)."""
    files, shapes = {}, {}
    for path in shard_files(directory, label):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                files[key] = path
                shapes[key] = list(handle.get_slice(key).get_shape())
    config = json.loads((directory / "config.json").read_text())
    return OriginalCheckpoint(directory=directory, config=config, files=files, shapes=shapes)


def _shape(checkpoint: OriginalCheckpoint, key: str, label: str) -> list[int]:
    if key not in checkpoint.shapes:
        raise ModelUnavailable(f"{label} layout: the checkpoint lacks {key}.")
    return checkpoint.shapes[key]


def siglip_heads(hidden: int) -> int:
    """so400m's 72-d heads when the width allows, else 64-d heads, else one head (only tiny test towers get here)."""
    for head_dim in (SIGLIP_SO400M_HEAD_DIM, 64):
        if hidden % head_dim == 0:
            return hidden // head_dim
    return 1


def siglip_config(checkpoint: OriginalCheckpoint, label: str) -> SiglipVisionConfig:
    """The SigLIP tower from its weight shapes (the original config.json does not describe it)."""
    hidden, _, patch, _ = _shape(checkpoint, VISION_PREFIX + "embeddings.patch_embedding.weight", label)
    positions = _shape(checkpoint, VISION_PREFIX + "embeddings.position_embedding.weight", label)[0]
    layer_key = re.compile(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.")
    layers = {int(match.group(1)) for key in checkpoint.shapes if (match := layer_key.match(key))}
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=_shape(checkpoint, VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight", label)[0],
        num_hidden_layers=max(layers) + 1 if layers else 0,
        num_attention_heads=siglip_heads(hidden),
        image_size=math.isqrt(positions) * patch,
        patch_size=patch,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def feature_layer(vision: SiglipVisionConfig) -> int:
    """The references drop SigLIP's last layer and use the last remaining hidden state (before post_layernorm):
    -1 of a tower saved already shortened, -2 of a whole 27-layer so400m tower."""
    return -2 if vision.num_hidden_layers == SO400M_DEPTH else -1


def qwen2_config(config: dict) -> Qwen2Config:
    """The Qwen2 language model from a `llava_qwen` config.json's own fields."""
    # LLaVA-NeXT's LlavaQwenForCausalLM sets rope_scaling to None, so it is not carried over.
    fields = QWEN2_DEFAULTS | {key: config[key] for key in QWEN2_FIELDS if key in config}
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    return Qwen2Config(**fields)


def llava_config(checkpoint: OriginalCheckpoint, label: str) -> LlavaOnevisionConfig:
    """A LlavaOnevisionConfig equivalent to the original config.json and vision tower."""
    projector = checkpoint.config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ModelUnavailable(f"{label} layout: projector {projector!r} is not the 2-layer GELU MLP "
                               f"LLaVA-OneVision uses.")
    vision, text = siglip_config(checkpoint, label), qwen2_config(checkpoint.config)
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=min(QWEN_IMAGE_PAD, text.vocab_size - 1),
        video_token_id=min(QWEN_VIDEO_PAD, text.vocab_size - 2),
        vision_feature_layer=feature_layer(vision),
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )


def single_device(device_map: str | dict, label: str) -> torch.device:
    """The one device a device_map names ("auto": CUDA when present); these layouts do not shard."""
    if isinstance(device_map, dict):
        raise ModelUnavailable(f"The {label} layout loads onto one device; a per-module device_map is not supported.")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def llava_part(key: str) -> tuple[str, str] | None:
    """(engine part, name under that part) for a shared original key; None when the key is not one of them."""
    if key == "lm_head.weight":
        return "top", key
    if key == "model.image_newline":
        return "newline", "image_newline"
    if key.startswith(VISION_PREFIX):
        return "vision", key[len(VISION_PREFIX):]
    for old, new in PROJECTOR_LAYERS.items():
        if key.startswith(old):
            return "projector", new + key[len(old):]
    if LANGUAGE_KEY.match(key):
        return "language", key[len("model."):]
    return None


def engine_prefixes(state: dict) -> dict[str, str]:
    """Engine part → its key prefix in the built model's state dict."""
    prefixes = {"top": ""}
    for part, anchor in ENGINE_ANCHORS.items():
        found = next((key[: -len(anchor)] for key in state if key.endswith(anchor)), None)
        if found is None:
            raise ModelUnavailable(f"The engine model has no parameter ending in {anchor}.")
        prefixes[part] = found
    return prefixes


def _route(key: str, skipped: tuple[str, ...], extras: dict[str, nn.Module]) -> tuple[str, str, str] | None:
    """(destination, part, name): destination "llava" or an extra module's key prefix; None = skipped.

    Raises KeyError for a key no part knows."""
    if key.startswith(ALWAYS_SKIPPED + skipped) or key.endswith("rotary_emb.inv_freq"):  # inv_freq: from config
        return None
    for prefix in extras:
        if key.startswith(prefix):
            return prefix, "", key[len(prefix):]
    part = llava_part(key)
    if part is None:
        raise KeyError(key)
    return ("llava",) + part


def _assign(tensors: dict[str, torch.Tensor], name: str, value: torch.Tensor, source: str, label: str) -> None:
    if name not in tensors:
        raise ModelUnavailable(f"{label} layout: checkpoint key {source!r} maps to {name!r}, which the model lacks.")
    if list(tensors[name].shape) != list(value.shape):
        raise ModelUnavailable(f"{label} layout: {source!r} has shape {list(value.shape)}; the model expects "
                               f"{list(tensors[name].shape)} for {name}.")
    tensors[name].copy_(value)


def _routes(checkpoint: OriginalCheckpoint, skipped: tuple[str, ...], extras: dict[str, nn.Module],
            label: str) -> dict[str, tuple[str, str, str] | None]:
    """Every checkpoint key's route, checked before any model is built so a foreign checkpoint fails fast."""
    routes, unknown = {}, []
    for key in checkpoint.shapes:
        try:
            routes[key] = _route(key, skipped, extras)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ModelUnavailable(f"{checkpoint.directory} does not match the {label} layout: {len(unknown)} checkpoint "
                               f"keys have no known place, e.g. {unknown[:3]}.")
    return routes


def _copy_tensors(checkpoint: OriginalCheckpoint, routes: dict, targets: dict[str, dict[str, torch.Tensor]],
                  prefixes: dict[str, str], label: str) -> dict[str, set[str]]:
    """Copy each routed tensor into its target, shard by shard; returns the names filled per destination."""
    loaded: dict[str, set[str]] = {destination: set() for destination in targets}
    for path in sorted(set(checkpoint.files.values())):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if routes.get(key) is None:
                    continue
                destination, part, name = routes[key]
                name = prefixes[part] + name if destination == "llava" else name
                _assign(targets[destination], name, handle.get_tensor(key), key, label)
                loaded[destination].add(name)
    return loaded


@torch.no_grad()
def load_original(
    checkpoint: OriginalCheckpoint, dtype: torch.dtype, device_map: str | dict, label: str, *,
    skipped: tuple[str, ...] = (), extras: dict[str, nn.Module] | None = None, zero_if_absent: tuple[str, ...] = (),
) -> nn.Module:
    """The engine model with every checkpoint tensor copied in; `extras` ({key prefix: module}) are moved to the
    device and filled in place. Refuses unknown keys, wrong shapes and missing weights (bar `zero_if_absent`)."""
    extras = extras or {}
    routes = _routes(checkpoint, skipped, extras, label)
    device = single_device(device_map, label)
    config = llava_config(checkpoint, label)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    for module in extras.values():
        module.to(device=device, dtype=dtype)
    targets = {"llava": dict(model.state_dict(keep_vars=True))}
    targets |= {prefix: dict(module.state_dict(keep_vars=True)) for prefix, module in extras.items()}
    prefixes = engine_prefixes(targets["llava"])
    loaded = _copy_tensors(checkpoint, routes, targets, prefixes, label)
    for key in zero_if_absent:
        part, name = llava_part(key)
        if prefixes[part] + name not in loaded["llava"]:
            targets["llava"][prefixes[part] + name].zero_()
            loaded["llava"].add(prefixes[part] + name)
    if config.tie_word_embeddings:
        loaded["llava"].add("lm_head.weight")
    for destination, expected in targets.items():
        missing = sorted(set(expected) - loaded[destination])
        if missing:
            raise ModelUnavailable(f"{checkpoint.directory} does not match the {label} layout: the checkpoint lacks "
                                   f"{len(missing)} weights of {destination}, e.g. {missing[:5]}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def engine_overrides(model: nn.Module) -> dict:
    """What the engine takes from the layout rather than the model config: feature layer and chat template."""
    return {"vision_feature_layer": model.config.vision_feature_layer, "chat_template": QWEN_1_5_TEMPLATE}
