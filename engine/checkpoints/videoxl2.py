"""BAAI/Video-XL-2's original checkpoint (LLaVA-style `llava_qwen`), loaded into LlavaOnevisionForConditionalGeneration
plus the DTS fusion autoencoder as the extra module "dts_fusion", by key mapping, without trust_remote_code.

Original keys (VectorSpaceLab/Video-XL, Video-XL-2 `model/llava_arch.py`, `language_model/llava_qwen.py`,
`multimodal_encoder/siglip_encoder.py`): `model.embed_tokens|layers|norm.*` and `lm_head.weight` (Qwen2.5),
`model.vision_tower.vision_tower.vision_model.*` (SigLIP-so400m, saved with its last encoder layer already removed
and no head), `model.mm_projector.{0,2}.*` (mlp2x_gelu), `model.sae.*` (the DTS autoencoder),
`model.text_mlp.*` (trained, never used at inference) and optionally `model.image_newline`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from backends.dts_fusion import DTSAutoencoder
from engine.checkpoints.registry import CheckpointLayout, register_layout
from engine.errors import ModelUnavailable

VISION = "model.vision_tower.vision_tower.vision_model."
FUSION = "model.sae."
PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
UNUSED = ("model.text_mlp.", "model.vision_resampler.")  # text_mlp is trained but never called at inference
SIGLIP_HEAD_DIM = 72  # so400m: 1152 / 16 heads; config.json names the tower only by its hub id
SO400M_DEPTH = 27  # a full so400m tower: if one was saved whole, drop its last layer as the reference does
QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = 151655, 151654

# The reference's "qwen_1_5" conversation: ChatML with the default system turn, the video placeholder then "\n".
QWEN_1_5_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def is_videoxl2(config: dict) -> bool:
    """A LLaVA-Qwen config with Video-XL-2's marks: its SAE/DTS flag, its "unires" merge type, or its name."""
    if "mm_vision_tower" not in config or "composer_type" in config:  # composer_type: ViLAMP's layout
        return False
    names = " ".join(str(config.get(k, "")) for k in ("model_type", "architectures", "auto_map", "_name_or_path"))
    return "freeze_sae" in config or config.get("mm_patch_merge_type") == "unires" or "videoxl" in names.lower()


def tensor_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key → safetensors file, from the shard index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(f"{directory} has no .safetensors weights.")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), path))
    return out


def _shape(files: dict[str, Path], key: str) -> list[int]:
    if key not in files:
        raise ModelUnavailable(f"The Video-XL-2 checkpoint lacks {key}.")
    with safe_open(str(files[key]), framework="pt") as handle:
        return list(handle.get_slice(key).get_shape())


def vision_depth(files: dict[str, Path]) -> int:
    layers = {int(k[len(VISION):].split(".")[2]) for k in files if k.startswith(VISION + "encoder.layers.")}
    return max(layers) + 1 if layers else 0


def build_config(config: dict, files: dict[str, Path]) -> LlavaOnevisionConfig:
    """A LlavaOnevisionConfig from the Qwen2 fields of config.json and the vision tower's weight shapes."""
    hidden, _, patch, _ = _shape(files, VISION + "embeddings.patch_embedding.weight")
    positions = _shape(files, VISION + "embeddings.position_embedding.weight")[0]
    vision = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=_shape(files, VISION + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=vision_depth(files), num_attention_heads=max(1, hidden // SIGLIP_HEAD_DIM),
        image_size=math.isqrt(positions) * patch, patch_size=patch, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    vocab = int(config["vocab_size"])
    text = Qwen2Config(
        vocab_size=vocab, hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 1_000_000.0),
        hidden_act=config.get("hidden_act", "silu"), tie_word_embeddings=config.get("tie_word_embeddings", False),
        use_sliding_window=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=min(QWEN_IMAGE_PAD, vocab - 1), video_token_id=min(QWEN_VIDEO_PAD, vocab - 2),
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _prefix_of(state: dict, suffix: str) -> str:
    """Where the engine model keeps a submodule (transformers versions differ in nesting)."""
    for key in state:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ModelUnavailable(f"The engine model has no parameter ending in {suffix}.")


def key_map(state: dict) -> Callable[[str], tuple[str, str]]:
    """original key → ("model" | "fusion" | "unused", target key)."""
    language = _prefix_of(state, "embed_tokens.weight")
    vision = _prefix_of(state, "embeddings.patch_embedding.weight")
    projector = _prefix_of(state, "linear_1.weight")
    newline = _prefix_of(state, "image_newline") + "image_newline"

    def target(key: str) -> tuple[str, str]:
        if key.startswith(FUSION):
            return "fusion", key[len(FUSION):]
        if key.startswith(UNUSED) or key.endswith("rotary_emb.inv_freq"):
            return "unused", key
        if key.startswith(VISION):
            return "model", vision + key[len(VISION):]
        for old, new in PROJECTOR.items():
            if key.startswith(old):
                return "model", projector + new + key[len(old):]
        if key == "model.image_newline":
            return "model", newline
        if key == "lm_head.weight":
            return "model", key
        if key.startswith("model."):
            return "model", language + key[len("model."):]
        return "unknown", key

    return target


def _device_of(device_map: str | dict) -> torch.device:
    if isinstance(device_map, dict):
        raise ModelUnavailable("The Video-XL-2 checkpoint loads onto one device; sharding (a device map) is not "
                               "supported for it.")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def load_videoxl2(directory: Path, dtype: torch.dtype,
                  device_map: str | dict) -> tuple[nn.Module, dict[str, nn.Module], dict]:
    """Build the engine model from the original checkpoint; refuses any unmapped or missing weight."""
    config_json = json.loads((directory / "config.json").read_text())
    files = tensor_files(directory)
    config = build_config(config_json, files)
    device = _device_of(device_map)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    state = model.state_dict()
    target = key_map(state)
    fusion_state, loaded, unknown = {}, set(), []
    by_file: dict[Path, list[str]] = {}
    for key, path in files.items():
        by_file.setdefault(path, []).append(key)
    with torch.no_grad():
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for key in keys:
                    kind, name = target(key)
                    if kind == "fusion":
                        fusion_state[name] = handle.get_tensor(key)
                    elif kind == "model" and name in state:
                        value = handle.get_tensor(key)
                        if value.shape != state[name].shape:
                            raise ModelUnavailable(f"{key} has shape {list(value.shape)}; the engine model expects "
                                                   f"{list(state[name].shape)} for {name}.")
                        state[name].copy_(value)
                        loaded.add(name)
                    elif kind != "unused":
                        unknown.append(key)
    newline = target("model.image_newline")[1]
    if newline not in loaded:
        # Only "unpad" merge types create it in the reference; video never uses it there, so zeros are honest.
        state[newline].zero_()
        loaded.add(newline)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(state) - loaded)
    if missing or unknown:
        raise ModelUnavailable(f"{directory} does not match the Video-XL-2 layout: missing {missing[:5]}, "
                               f"unexpected {unknown[:5]}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    if "temporal_encoding" not in fusion_state:
        raise ModelUnavailable(f"{directory} has no DTS fusion weights (model.sae.*).")
    fusion = DTSAutoencoder(int(fusion_state["temporal_encoding"].shape[1]))
    try:
        fusion.load_state_dict(fusion_state, strict=True)
    except RuntimeError as err:
        raise ModelUnavailable(f"{directory}: the DTS fusion weights do not match the module ({err}).") from err
    fusion.to(device=device, dtype=dtype)
    feature_layer = -2 if config.vision_config.num_hidden_layers == SO400M_DEPTH else -1
    return model, {"dts_fusion": fusion}, {"vision_feature_layer": feature_layer, "chat_template": QWEN_1_5_TEMPLATE}


LAYOUT = register_layout(CheckpointLayout(name="videoxl2", detect=is_videoxl2, load=load_videoxl2))
