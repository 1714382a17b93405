"""Text and table views of a run: per-backend stats line, the shared video line, the summary table, token budgets."""

from __future__ import annotations

from typing import Any

import pandas as pd

from backends.registry import get_backend, list_backends
from engine.types import Answer, StageProbe
from ui.figures import MEMORY_KIND, SHARED_STAGES
from ui.run import VideoReady

SUMMARY_COLUMNS = ["method", "frames", "visual tokens", "% of uniform", "prompt", "new", "seconds", "peak MiB",
                   "memory counter", "answer"]


def uniform_tokens(num_frames: int, grid: int) -> int | None:
    """Visual tokens the `uniform` baseline spends on `num_frames` frames (None if it is not registered)."""
    if "uniform" not in list_backends():
        return None
    baseline = get_backend("uniform")
    return int(baseline.num_tokens(num_frames, grid, baseline.make_params()))


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def ratio_text(tokens: int, baseline: int | None) -> str:
    return "" if not baseline else f"{100 * tokens / baseline:.0f}% of uniform's {baseline:,}"


def own_stages(answer: Answer) -> list[StageProbe]:
    return [s for s in answer.stages if s.name not in SHARED_STAGES]


def peak(answer: Answer) -> StageProbe:
    return max(answer.stages, key=lambda s: s.peak_bytes)


def stats_markdown(answer: Answer, baseline_tokens: int | None) -> str:
    """Frames, visual tokens (and their share of uniform's), this backend's stage times, peak memory and its
    counter, then the backend's own notes (e.g. that a learned module was replaced by a parameter-free one)."""
    ratio = ratio_text(answer.num_visual_tokens, baseline_tokens)
    top = peak(answer)
    times = " · ".join(f"{s.name} {s.seconds:.2f} s" for s in own_stages(answer))
    lines = [
        f"**{answer.num_frames} frames → {answer.num_visual_tokens:,} visual tokens**"
        + (f" ({ratio})" if ratio else ""),
        f"{times} · peak {_mib(top.peak_bytes)} at {top.name} ({MEMORY_KIND.get(top.memory_kind, top.memory_kind)})",
    ]
    lines += [f"*{note}*" for note in answer.notes]
    return "  \n".join(lines)


def video_markdown(video: VideoReady) -> str:
    """The video as sampled, and the decode/encode cost every method shares."""
    meta = video.meta
    times = video.timestamps
    span = f"{times[0]:.1f}–{times[-1]:.1f} s" if len(times) else "none"
    stages = " · ".join(f"{s.name} {s.seconds:.2f} s" for s in video.stages)
    return (f"**{meta.path_name}** · {meta.duration_s:.1f} s · {meta.width}×{meta.height} · "
            f"{len(times)} frames sampled ({span}) · {stages} — decoded and encoded once, shared by every method")


def summary_table(answers: list[tuple[str, Answer]], baseline: dict[int, int | None]) -> pd.DataFrame:
    """One row per backend; `baseline` maps a frame count to uniform's token count for it."""
    rows: list[list[Any]] = []
    for label, a in answers:
        base = baseline.get(a.num_frames)
        top = peak(a)
        rows.append([
            label, a.num_frames, a.num_visual_tokens, round(100 * a.num_visual_tokens / base, 1) if base else None,
            a.prompt_tokens, a.new_tokens, round(sum(s.seconds for s in own_stages(a)), 2),
            round(top.peak_bytes / 2**20), MEMORY_KIND.get(top.memory_kind, top.memory_kind),
            a.text if len(a.text) <= 120 else a.text[:117] + "…",
        ])
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def budget_markdown(backends: list[str], num_frames: int, grid: int, params: dict[str, dict[str, Any]]) -> str:
    """Visual tokens each chosen backend will spend on `num_frames` frames, before anything runs."""
    if not backends:
        return "Choose at least one method."
    baseline = uniform_tokens(num_frames, grid)
    parts = []
    for name in backends:
        backend = get_backend(name)
        try:
            count = backend.num_tokens(num_frames, grid, backend.make_params(params.get(name)))
        except (TypeError, ValueError) as err:
            parts.append(f"{backend.label}: invalid parameters ({err})")
            continue
        ratio = f" ({100 * count / baseline:.0f}%)" if baseline and name != "uniform" else ""
        parts.append(f"{backend.label} **{count:,}**{ratio}")
    return f"Visual tokens at {num_frames} frames: " + " · ".join(parts)
