"""Answers as plain JSON-ready dicts and as a text table (CLI, export, benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.types import Answer


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def answer_to_dict(answer: Answer, timestamps: np.ndarray | None = None) -> dict[str, Any]:
    """Everything a researcher needs to reproduce or plot one backend's answer."""
    return {
        "backend": answer.backend,
        "text": answer.text,
        "num_frames": answer.num_frames,
        "num_visual_tokens": answer.num_visual_tokens,
        "prompt_tokens": answer.prompt_tokens,
        "new_tokens": answer.new_tokens,
        "timestamps": _plain(timestamps) if timestamps is not None else None,
        "frame_attention": _plain(answer.frame_attention),
        "stages": [
            {"name": s.name, "seconds": s.seconds, "peak_bytes": s.peak_bytes, "memory_kind": s.memory_kind}
            for s in answer.stages
        ],
        "frame_marks": {k: _plain(v) for k, v in answer.frame_marks.items()},
        "notes": list(answer.notes),
        "extras": {k: _plain(v) for k, v in answer.extras.items()},
    }


def stage_table(answers: list[Answer]) -> str:
    """One row per (backend, stage): seconds and memory, then token counts per backend."""
    lines = [f"{'backend':<10} {'stage':<9} {'seconds':>9} {'memory MB':>10}  memory kind"]
    for answer in answers:
        for s in answer.stages:
            lines.append(f"{answer.backend:<10} {s.name:<9} {s.seconds:>9.3f} {s.peak_bytes / 2**20:>10.1f}  "
                         f"{s.memory_kind}")
    lines.append("")
    lines.append(f"{'backend':<10} {'frames':>7} {'visual tokens':>14} {'prompt tokens':>14} {'new tokens':>11}")
    for a in answers:
        lines.append(f"{a.backend:<10} {a.num_frames:>7} {a.num_visual_tokens:>14} {a.prompt_tokens:>14} "
                     f"{a.new_tokens:>11}")
    return "\n".join(lines)
