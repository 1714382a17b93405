"""Named model presets: real checkpoints by hub id, a tiny random model, and real-size random models for benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PRESET = "llava-ov-0.5b"


@dataclass(frozen=True)
class Preset:
    """`kind`: "hub" loads `repo_id` through the layout's loader; "tiny" builds a small random checkpoint on disk and
    loads it through the same path; "random" builds a real-size model from `shape` with random weights."""

    name: str
    kind: Literal["hub", "tiny", "random"]
    description: str
    repo_id: str | None = None
    shape: str | None = None

    @property
    def random_weights(self) -> bool:
        return self.kind != "hub"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", "tiny", "Tiny random LLaVA-OneVision (27×27 patches, 4-layer LLM); offline, answers are noise."),
        Preset("llava-ov-0.5b", "hub", "LLaVA-OneVision Qwen2 0.5B",
               repo_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        Preset("llava-ov-7b", "hub", "LLaVA-OneVision Qwen2 7B", repo_id="llava-hf/llava-onevision-qwen2-7b-ov-hf"),
        Preset("videoxl2-7b", "hub", "Video-XL-2 (Qwen2.5 7B, learned DTS fusion)", repo_id="BAAI/Video-XL-2"),
        Preset("vilamp-7b", "hub", "ViLAMP (LLaVA-Qwen 7B, learned DFM)", repo_id="orange-sk/ViLAMP-llava-qwen"),
        Preset("random-0.5b", "random", "LLaVA-OneVision 0.5B shapes, random weights (benchmarks)", shape="0.5b"),
        Preset("random-7b", "random", "LLaVA-OneVision 7B shapes, random weights (benchmarks)", shape="7b"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
