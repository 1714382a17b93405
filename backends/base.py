"""The backend interface: a backend turns FrameFeatures (+ question) into VisualTokens, nothing more."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch

from engine.types import FrameFeatures, VisualTokens


class ModelOps(Protocol):
    """What a backend may ask of the loaded model. Backends never load models themselves."""

    @property
    def grid(self) -> int:
        """Patches per side of the vision tower's square map (27 for SigLIP-so400m at 384 px)."""

    @property
    def vision_heads(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The multimodal projector: (..., D_vision) → (..., D_llm)."""

    def image_newline(self) -> torch.Tensor:
        """The learned newline embedding (D_llm) LLaVA-OneVision appends after a video."""

    def embed_text(self, text: str) -> torch.Tensor:
        """Token embeddings (n × D_llm) of `text` without special tokens."""

    def question_attention(self, tokens: torch.Tensor, question: str) -> torch.Tensor:
        """Attention of the templated question over `tokens` (N × D_llm), one score per token, summing to 1."""

    def extra_module(self, name: str) -> torch.nn.Module | None:
        """A checkpoint-specific module the preset loaded (e.g. "dts_fusion", "dfm"), or None."""


@dataclass(frozen=True)
class Param:
    """Metadata of one backend parameter, read by the UI to render a control."""

    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None


def param_field_info(params_cls: type) -> list[tuple[str, Any, Param]]:
    """(name, default, Param) for each field of a backend's frozen params dataclass."""
    out = []
    for f in fields(params_cls):
        meta = f.metadata.get("param") or Param(label=f.name)
        out.append((f.name, f.default, meta))
    return out


class Backend:
    """Base class: subclasses set the class attributes, a frozen `Params` dataclass, and implement two methods."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    paper_url: ClassVar[str] = ""
    description: ClassVar[str] = ""
    about: ClassVar[str] = ""  # what it does to the tokens and which of the authors' quirks it keeps (About panel)
    Params: ClassVar[type] = type(None)

    def num_tokens(self, num_frames: int, grid: int, params: Any) -> int:
        """Visual tokens this backend will hand the LLM for `num_frames` frames (markers not counted)."""
        raise NotImplementedError

    def compress(self, features: FrameFeatures, question: str, ops: ModelOps, params: Any) -> VisualTokens:
        raise NotImplementedError

    def prefill_marks(self, tokens: VisualTokens, seq: Any, result: Any, num_frames: int) -> dict[str, Any]:
        """Per-frame marks only known after prefill (dense blocks, surviving tokens); none by default."""
        return {}

    def make_params(self, overrides: dict[str, Any] | None = None) -> Any:
        """The params dataclass with `overrides` applied (unknown keys are an error)."""
        return self.Params(**(overrides or {}))
