"""Plotly figures of a run: attention over time with the backend's own marks, cost per stage, and the overlay."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from engine.types import Answer

PALETTE = qualitative.Plotly
MARK_SYMBOLS = ("star", "diamond", "triangle-up", "square", "x")
SHARED_STAGES = ("decode", "encode")
LEGEND = {"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"}
TITLE_FONT = {"size": 13}
MEMORY_KIND = {"cuda_peak": "CUDA allocator peak", "cpu_rss": "process RSS (CPU)"}


def backend_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def usable_marks(marks: dict[str, np.ndarray], num_frames: int) -> dict[str, np.ndarray]:
    """The marks holding one number per sampled frame (anything else cannot be drawn on the time axis)."""
    out = {}
    for name, values in marks.items():
        array = np.asarray(values, dtype=np.float64)
        if array.ndim == 1 and array.shape[0] == num_frames:
            out[name] = array
    return out


def is_binary(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 0 and bool(np.isin(finite, (0.0, 1.0)).all()) and bool((finite == 1).any())


def segment_boundaries(values: np.ndarray, timestamps: np.ndarray) -> list[float]:
    """Times between frames where a non-decreasing integer label (e.g. a prefill block id) changes."""
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)) or (np.diff(values) < 0).any():
        return []
    if len(np.unique(values)) < 2 or is_binary(values):
        return []
    change = np.nonzero(np.diff(values))[0]
    return [float((timestamps[i] + timestamps[i + 1]) / 2) for i in change]


def _normalised(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    low, high = finite.min(), finite.max()
    return (values - low) / (high - low) if high > low else np.where(np.isfinite(values), 0.5, np.nan)


def attention_figure(answer: Answer, timestamps: np.ndarray, color: str = PALETTE[0]) -> go.Figure:
    """Attention per sampled frame over time (hover: time and share), the backend's binary marks as symbols on the
    line, segment labels as dotted boundaries, and every per-frame mark as a strip below."""
    times = np.asarray(timestamps, dtype=np.float64)
    attention = np.asarray(answer.frame_attention, dtype=np.float64)
    marks = usable_marks(answer.frame_marks, len(times))
    rows = 2 if marks else 1
    plot_px, strip_px = 220, 22 * len(marks)
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        row_heights=[plot_px, strip_px] if rows == 2 else [1.0])
    fig.add_trace(go.Scatter(
        x=times, y=attention, mode="lines+markers", name="attention", line={"color": color}, showlegend=False,
        hovertemplate="%{x:.1f} s<br>attention %{y:.2%}<extra></extra>",
    ), row=1, col=1)
    binary = [name for name, values in marks.items() if is_binary(values)]
    for i, name in enumerate(binary):
        on = marks[name] == 1
        fig.add_trace(go.Scatter(
            x=times[on], y=attention[on], mode="markers", name=name,
            marker={"symbol": MARK_SYMBOLS[i % len(MARK_SYMBOLS)], "size": 12, "line": {"width": 1}},
            hovertemplate=f"%{{x:.1f}} s<br>{name}<br>attention %{{y:.2%}}<extra></extra>",
        ), row=1, col=1)
    for values in marks.values():
        for boundary in segment_boundaries(values, times):
            fig.add_vline(x=boundary, line={"dash": "dot", "width": 1, "color": "#888"}, row=1, col=1)
    if marks:
        names = list(marks)
        raw = np.stack([marks[n] for n in names])
        fig.add_trace(go.Heatmap(
            x=times, y=names, z=np.stack([_normalised(r) for r in raw]), customdata=raw, showscale=False,
            colorscale="Viridis", hovertemplate="%{y} at %{x:.1f} s: %{customdata:.3g}<extra></extra>",
        ), row=2, col=1)
    fig.update_yaxes(title_text="attention", tickformat=".1%", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="time (s)", row=rows, col=1)
    fig.update_layout(height=plot_px + strip_px + 110, margin={"l": 10, "r": 10, "t": 70, "b": 10},
                      legend=LEGEND, showlegend=bool(binary),
                      title={"text": "Attention over time", "font": TITLE_FONT, "x": 0, "y": 0.98, "yanchor": "top"})
    return fig


def cost_figure(answer: Answer) -> go.Figure:
    """Seconds and memory per stage; decode and encode are shared by every backend of the run."""
    names = [s.name for s in answer.stages]
    colors = ["#b0b0b0" if n in SHARED_STAGES else "#4c78a8" for n in names]
    kinds = sorted({MEMORY_KIND.get(s.memory_kind, s.memory_kind) for s in answer.stages})
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time (s)", "memory (MiB)"), horizontal_spacing=0.15)
    hover_shared = ["shared by every method" if n in SHARED_STAGES else "this method" for n in names]
    fig.add_trace(go.Bar(x=names, y=[s.seconds for s in answer.stages], marker_color=colors, customdata=hover_shared,
                         hovertemplate="%{x}: %{y:.2f} s (%{customdata})<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[s.peak_bytes / 2**20 for s in answer.stages], marker_color=colors,
                         customdata=hover_shared,
                         hovertemplate="%{x}: %{y:,.0f} MiB (%{customdata})<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text=", ".join(kinds), title_font_size=11, row=1, col=2)
    fig.update_layout(height=290, showlegend=False, margin={"l": 10, "r": 10, "t": 60, "b": 10},
                      title={"text": "Time and memory per stage", "font": TITLE_FONT, "x": 0})
    fig.update_annotations(font_size=12)
    return fig


def overlay_figure(answers: list[tuple[str, Answer, str]], timestamps: np.ndarray) -> go.Figure:
    """Every backend's attention over time on one axis; `answers` are (label, answer, color)."""
    fig = go.Figure()
    for label, answer, color in answers:
        fig.add_trace(go.Scatter(
            x=np.asarray(timestamps, dtype=np.float64), y=answer.frame_attention, mode="lines+markers", name=label,
            line={"color": color}, hovertemplate=f"{label}<br>%{{x:.1f}} s<br>attention %{{y:.2%}}<extra></extra>",
        ))
    fig.update_layout(height=360, margin={"l": 10, "r": 10, "t": 70, "b": 10}, xaxis_title="time (s)",
                      title={"text": "Attention over time, all methods", "font": TITLE_FONT, "x": 0},
                      yaxis_title="attention", yaxis_tickformat=".1%", yaxis_rangemode="tozero", legend=LEGEND)
    return fig
