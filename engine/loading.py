"""One loading path for every preset: hub id → local snapshot, local directory, or a just-built tiny checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration
from transformers.utils import logging as hf_logging

from engine.attention import enable_arena_attention
from engine.checkpoints import detect_layout
from engine.errors import ModelUnavailable
from engine.model_configs import byte_tokenizer, llava_config
from engine.presets import PRESETS, Preset

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py", "tokenizer*", "*.bin"]
TINY_VERSION = "tiny-v1"

hf_logging.disable_progress_bar()


@dataclass
class LoadedModel:
    """A loaded checkpoint and what the engine needs to feed it."""

    model: nn.Module
    tokenizer: object
    chat_template: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    name: str
    random_weights: bool
    device: torch.device
    dtype: torch.dtype
    vision_feature_layer: int = -1
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def grid(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size


def default_device() -> torch.device:
    name = os.environ.get("FRAME_ARENA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_root() -> Path:
    return Path(os.environ.get("FRAME_ARENA_CACHE", Path.home() / ".cache" / "frame_arena"))


def build_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA-OneVision checkpoint (weights, tokenizer, template, preprocessing) to `directory`."""
    tokenizer = byte_tokenizer()
    config = llava_config(
        "tiny", len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(tokenizer.chat_template)
    size = config.vision_config.image_size
    preprocessing = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": size, "width": size}}
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    return directory


def _tiny_directory() -> Path:
    directory = cache_root() / TINY_VERSION
    if not (directory / "config.json").is_file():
        build_tiny_checkpoint(directory)
    return directory


def _snapshot(preset: Preset) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(preset.repo_id, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as err:  # any hub/offline/network failure means the same thing to the user
        raise ModelUnavailable(
            f"Preset '{preset.name}' needs the checkpoint {preset.repo_id}, which is not in the local Hugging Face "
            f"cache and could not be downloaded ({type(err).__name__}). On a machine with internet run "
            f"`hf download {preset.repo_id}` (or unset HF_HUB_OFFLINE), or pass a local checkpoint directory."
        ) from err


def _read_preprocessing(directory: Path, vision_image_size: int) -> tuple[int, tuple, tuple]:
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = directory / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            size = cfg.get("size") or {}
            side = size.get("height") or size.get("shortest_edge") or vision_image_size
            return int(side), tuple(cfg.get("image_mean", (0.5,) * 3)), tuple(cfg.get("image_std", (0.5,) * 3))
    return vision_image_size, (0.5,) * 3, (0.5,) * 3


def _read_chat_template(directory: Path, tokenizer) -> str:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ModelUnavailable(f"{directory} has no chat template (chat_template.jinja/.json or in the tokenizer).")


def load_directory(
    directory: Path, name: str, random_weights: bool, device: torch.device, device_map: str | dict | None = None
) -> LoadedModel:
    """Load any supported checkpoint directory; `device_map="auto"` shards a model too big for one GPU."""
    layout = detect_layout(directory)
    dtype = default_dtype(device)
    model, extras, overrides = layout.load(directory, dtype, device_map or str(device))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return _finish(model, tokenizer, directory, name, random_weights, device, dtype, extras, overrides)


def _finish(model, tokenizer, directory, name, random_weights, device, dtype, extras, overrides) -> LoadedModel:
    model.eval().requires_grad_(False)
    enable_arena_attention(model)
    for module in extras.values():
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size, mean, std = _read_preprocessing(directory, model.config.vision_config.image_size) if directory else (
        model.config.vision_config.image_size, (0.5,) * 3, (0.5,) * 3)
    template = overrides.get("chat_template") or (
        _read_chat_template(directory, tokenizer) if directory else tokenizer.chat_template)
    return LoadedModel(
        model=model, tokenizer=tokenizer, chat_template=template, image_size=size, image_mean=mean, image_std=std,
        name=name, random_weights=random_weights, device=device, dtype=dtype,
        vision_feature_layer=overrides.get("vision_feature_layer", model.config.vision_feature_layer),
        extra_modules=extras,
    )


def _build_random(preset: Preset, device: torch.device) -> LoadedModel:
    tokenizer = byte_tokenizer()
    config = llava_config(
        preset.shape, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
        tokenizer.convert_tokens_to_ids("<video>"),
    )
    dtype = default_dtype(device)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    return _finish(model, tokenizer, None, preset.name, True, device, dtype, {}, {})


def load_model(name_or_path: str, device: str | None = None, device_map: str | dict | None = None) -> LoadedModel:
    """Load a preset by name, or a checkpoint directory by path. Raises ModelUnavailable with a how-to message."""
    target = torch.device(device) if device else default_device()
    device_map = device_map or os.environ.get("FRAME_ARENA_DEVICE_MAP")
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        if preset.kind == "tiny":
            return load_directory(_tiny_directory(), preset.name, True, target)
        if preset.kind == "random":
            return _build_random(preset, target)
        return load_directory(_snapshot(preset), preset.name, False, target, device_map)
    directory = Path(name_or_path)
    if not directory.is_dir():
        raise ModelUnavailable(f"'{name_or_path}' is neither a preset ({', '.join(PRESETS)}) nor a directory.")
    return load_directory(directory, directory.name, False, target, device_map)
