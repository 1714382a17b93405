"""The engine's public API: decode → encode (cached) → compress → answer. The UI and the CLI call only this."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backends.registry import get_backend
from engine.encode import encode_clip
from engine.errors import QuestionError
from engine.feature_cache import FeatureCache
from engine.loading import LoadedModel, load_model
from engine.model_ops import LoadedModelOps, token_scores
from engine.prefill import prefill
from engine.probes import stage
from engine.types import Answer, Clip, FrameFeatures, Sampling, StageProbe, VisualTokens

MAX_QUESTION_CHARS = int(os.environ.get("FRAME_ARENA_MAX_QUESTION_CHARS", "2000"))
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_CAP = 1024


def _default_cache_bytes(device: torch.device) -> int:
    env = os.environ.get("FRAME_ARENA_FEATURE_CACHE_MB")
    if env:
        return int(env) << 20
    return (8 << 30) if device.type == "cuda" else (1 << 30)


def check_question(question: str) -> str:
    """The question stripped; QuestionError if empty or over the length cap."""
    text = (question or "").strip()
    if not text:
        raise QuestionError("Please type a question about the video.")
    if len(text) > MAX_QUESTION_CHARS:
        raise QuestionError(f"The question is {len(text)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    return text


def frame_attention(token_attention: torch.Tensor, frame_span: torch.Tensor, num_frames: int) -> np.ndarray:
    """Spread each visual token's score evenly over the frames it stands for."""
    out = torch.zeros(num_frames)
    valid = frame_span[:, 0] >= 0
    first, last = frame_span[valid, 0], frame_span[valid, 1]
    share = token_attention[valid] / (last - first + 1)
    for offset in range(int((last - first).max()) + 1 if valid.any() else 0):
        frames = first + offset
        inside = frames <= last
        out.index_add_(0, frames[inside], share[inside])
    return out.numpy()


@dataclass
class Prepared:
    """A decoded and encoded video, shared by every backend of one request."""

    clip: Clip
    features: FrameFeatures
    stages: list[StageProbe] = field(default_factory=list)


class Engine:
    """One loaded model per process, a feature cache, and the pipeline stages as methods."""

    def __init__(self, loaded: LoadedModel, cache_bytes: int | None = None, limits: Any = None):
        self.loaded = loaded
        self.ops = LoadedModelOps(loaded)
        self.features = FeatureCache(cache_bytes if cache_bytes is not None else _default_cache_bytes(loaded.device))
        self.limits = limits
        self.vision_calls = 0
        self.decode_calls = 0

    @classmethod
    def from_preset(cls, name: str, device: str | None = None, **kwargs: Any) -> Engine:
        return cls(load_model(name, device=device), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.ops.device

    def decode(self, path: str | os.PathLike, sampling: Sampling) -> Clip:
        # Imported here: the video libraries are not needed to run the model on features (GPU benchmarks).
        from engine.video import VideoLimits, load_clip

        self.decode_calls += 1
        return load_clip(path, sampling, self.limits or VideoLimits.from_env())

    def feature_key(self, clip: Clip) -> str:
        raw = f"{clip.content_hash}|{clip.sampling}|{clip.frames.shape}|{self.loaded.name}|{self.loaded.dtype}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def encode(self, clip: Clip) -> FrameFeatures:
        """The clip's vision features, from the cache when this video was already encoded with this model."""
        key = self.feature_key(clip)
        cached = self.features.get(key)
        if cached is not None:
            return cached
        self.vision_calls += 1
        patches = encode_clip(self.loaded, clip)
        features = FrameFeatures(patches=patches, grid=self.loaded.grid, timestamps=clip.timestamps, cache_key=key)
        self.features.put(features)
        return features

    def prepare_steps(self, path: str | os.PathLike, sampling: Sampling) -> Iterator[str | Prepared]:
        """Yield "decode", then "encode", as each stage starts, then the Prepared video."""
        stages: list[StageProbe] = []
        yield "decode"
        with stage("decode", self.device, stages):
            clip = self.decode(path, sampling)
        yield "encode"
        with stage("encode", self.device, stages):
            features = self.encode(clip)
        yield Prepared(clip, features, stages)

    def prepare(self, path: str | os.PathLike, sampling: Sampling) -> Prepared:
        """Decode and encode once; the result is shared by every backend of a request."""
        *_, prepared = self.prepare_steps(path, sampling)
        return prepared

    @torch.inference_mode()
    def compress(self, backend: str, features: FrameFeatures, question: str,
                 params: dict[str, Any] | None = None) -> VisualTokens:
        impl = get_backend(backend)
        return impl.compress(features, question, self.ops, impl.make_params(params))

    @torch.inference_mode()
    def answer_stream(self, prepared: Prepared, backend: str, question: str, params: dict[str, Any] | None = None,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Iterator[str | Answer]:
        """Yield the answer text as it grows, then the finished Answer."""
        question = check_question(question)
        max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_CAP))
        stages = list(prepared.stages)
        with stage("compress", self.device, stages):
            tokens = self.compress(backend, prepared.features, question, params)
        with stage("prefill", self.device, stages):
            seq = self.ops.sequence(tokens, question)
            result = prefill(self.ops.runner, seq, tokens.plan)
            logits = self.ops.runner.logits(result.last_hidden)
            marks = get_backend(backend).prefill_marks(tokens, seq, result, prepared.clip.num_frames)
        tokenizer = self.loaded.tokenizer
        stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None}
        ids: list[int] = []
        text = ""
        with stage("generate", self.device, stages):
            position = result.next_position
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token in stop_ids:
                    break
                ids.append(token)
                new_text = tokenizer.decode(ids, skip_special_tokens=True)
                if new_text != text and not new_text.endswith("\ufffd"):
                    text = new_text
                    yield text
                if len(ids) == max_new_tokens:
                    break
                pos = torch.tensor([position])
                hidden = self.ops.runner.run(self.ops.runner.embed([token]), pos, result.cache,
                                             range(self.ops.runner.num_layers))
                logits = self.ops.runner.logits(hidden[-1])
                position += 1
        text = tokenizer.decode(ids, skip_special_tokens=True)
        per_token = token_scores(result.probe, seq)
        yield Answer(
            text=text, backend=backend,
            frame_attention=frame_attention(per_token, tokens.frame_span, prepared.clip.num_frames),
            token_attention=per_token.numpy(), stages=stages, num_frames=prepared.clip.num_frames,
            num_visual_tokens=tokens.num_tokens, prompt_tokens=seq.length, new_tokens=len(ids),
            frame_marks={**tokens.frame_marks, **marks}, notes=list(tokens.notes),
            extras={"kv_bytes": result.cache.nbytes()},
        )

    def answer(self, prepared: Prepared, backend: str, question: str, params: dict[str, Any] | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Answer:
        final = None
        for event in self.answer_stream(prepared, backend, question, params, max_new_tokens):
            final = event
        return final

    def ask(self, path: str | os.PathLike, question: str, backends: list[str], sampling: Sampling | None = None,
            params: dict[str, dict[str, Any]] | None = None,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[Answer]:
        """Decode and encode once, then answer with every backend in turn."""
        check_question(question)
        prepared = self.prepare(path, sampling or Sampling())
        return [self.answer(prepared, name, question, (params or {}).get(name), max_new_tokens) for name in backends]
