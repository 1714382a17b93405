"""The needle-in-a-haystack panel: a generated haystack with a coloured square at a chosen depth, every chosen method
asked its colour; reports correctness, attention mass on the needle and its rank (bench/needle.py does the grid)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from backends.registry import get_backend
from bench.needle import PALETTE, Needle, haystack_clip, needle_stats, score_answer
from engine.api import Engine, Prepared
from ui.errors import user_errors
from ui.handlers import backend_color
from ui.rate_limit import client_address

COLUMNS = ["method", "answer", "correct", "attention on needle", "needle rank", "needle frames / sampled"]


def needle_rows(engine: Engine, backends: list[str], needle: Needle, duration_s: float, frames: int,
                max_new_tokens: int = 16) -> tuple[list[list[Any]], dict[str, np.ndarray], np.ndarray, tuple]:
    """Run every backend on one in-memory haystack; table rows, attention per backend, timestamps, needle span."""
    clip, hay = haystack_clip(needle, duration_s=duration_s, fps=max(frames, 1) / duration_s)
    prepared = Prepared(clip, engine.encode(clip), [])
    rows, curves = [], {}
    for name in backends:
        answer = engine.answer(prepared, name, needle.question, max_new_tokens=max_new_tokens)
        stats = needle_stats(answer.frame_attention, clip.timestamps, hay.span)
        curves[name] = answer.frame_attention
        rank = "not sampled" if stats.rank is None else f"#{stats.rank}"
        rows.append([get_backend(name).label, answer.text, "yes" if score_answer(answer.text, needle.accepted,
                     needle.rejected) else "no", f"{100 * stats.mass:.1f}%", rank,
                     f"{stats.needle_frames} / {stats.frames}"])
    return rows, curves, clip.timestamps, hay.span


def needle_figure(curves: dict[str, np.ndarray], timestamps: np.ndarray, span: tuple[float, float]) -> go.Figure:
    """Every method's attention over time with the needle's time span shaded."""
    fig = go.Figure()
    fig.add_vrect(x0=span[0], x1=span[1], fillcolor="gold", opacity=0.35, line_width=0, annotation_text="needle")
    for name, attention in curves.items():
        fig.add_scatter(x=timestamps, y=attention, mode="lines+markers", name=get_backend(name).label,
                        line={"color": backend_color(name)})
    fig.update_layout(height=320, margin={"l": 40, "r": 10, "t": 30, "b": 40}, xaxis_title="time (s)",
                      yaxis_title="attention", yaxis_tickformat=".0%")
    return fig


def build_needle_panel(runtime: Any, names: list[str], concurrency_id: str, default_frames: int,
                       max_frames: int, hops: int) -> None:
    """The panel's controls and wiring; call inside the page's Blocks."""
    with gr.Accordion("Needle-in-a-haystack test", open=False, elem_id="needle"):
        gr.Markdown("A generated haystack with a coloured square shown for a few seconds at the chosen depth. "
                    "Each method is asked the square's colour; the table says whether it answered right, how much "
                    "of its attention fell on the needle's frames, and where the best needle frame ranks.")
        with gr.Row():
            length = gr.Slider(10, 3600, value=120, step=10, label="Haystack length (s)")
            depth = gr.Slider(0, 1, value=0.5, step=0.05, label="Needle depth (0 = start, 1 = end)")
            colour = gr.Dropdown(sorted(PALETTE), value="red", label="Needle colour")
            frames = gr.Slider(4, max_frames, value=min(default_frames, max_frames), step=4, label="Sampled frames")
        chosen = gr.CheckboxGroup([(get_backend(n).label, n) for n in names], value=names[:2], label="Methods")
        start = gr.Button("Run needle test", variant="primary")
        table = gr.Dataframe(headers=COLUMNS, interactive=False)
        plot = gr.Plot(show_label=False)

        def run(http: gr.Request, length_s: float, depth_value: float, colour_name: str, frame_count: int,
                backends: list[str]):
            chosen = [name for name in names if name in (backends or [])]
            if not chosen:
                raise gr.Error("Please choose at least one method.")
            if colour_name not in PALETTE:
                raise gr.Error(f"Unknown colour; choose one of {', '.join(sorted(PALETTE))}.")
            runtime.limiter.check(client_address(http, hops))
            needle = Needle(color=colour_name, depth=min(1.0, max(0.0, float(depth_value))))
            frame_count = min(max(1, int(frame_count)), max_frames)
            length_s = min(max(10.0, float(length_s)), 3600.0)
            rows, curves, stamps, span = needle_rows(runtime.engine, chosen, needle, length_s, frame_count)
            return rows, needle_figure(curves, stamps, span)

        start.click(user_errors(run), [length, depth, colour, frames, chosen], [table, plot], api_name="needle",
                    concurrency_id=concurrency_id)
