"""Event handlers: plain functions from form values to output values (text, figures, tables, a file).

Outputs are keyed by name — (backend, slot) for a backend's column, a plain slot name for the shared views — and
ui/layout.py maps the keys to its components.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import gradio as gr
import psutil

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from engine.oom import RetryNotice
from engine.types import Sampling
from ui import figures, summary
from ui.record import build_record, write_export
from ui.run import Finished, Partial, RequestError, RunRequest, RunResult, Step, VideoReady, check_request
from ui.runtime import Runtime

ANSWER, STATS, ATTENTION, FRAMES, COST = "answer", "stats", "attention", "frames", "cost"
COLUMN_SLOTS = (ANSWER, STATS, ATTENTION, FRAMES, COST)
VIDEO_INFO, OVERLAY, TABLE, EXPORT = "video_info", "overlay", "table", "export"
SHARED_SLOTS = (VIDEO_INFO, OVERLAY, TABLE, EXPORT)
Key = str | tuple[str, str]
Progress = Callable[..., Any]


def make_request(video: str | None, question: str, backends: list[str] | None, fps: float, max_frames: float,
                 max_new_tokens: float, params: dict[str, dict[str, Any]] | None) -> RunRequest:
    """A RunRequest from raw form or API values (numbers may arrive as floats or None)."""
    if params is not None and not (isinstance(params, dict) and all(isinstance(v, dict) for v in params.values())):
        raise RequestError('`params` must map a method name to a dict of its parameters, e.g. {"vilamp": {"k": 16}}.')
    try:
        sampling = Sampling(fps=float(fps), max_frames=max(1, int(max_frames)))
        new_tokens = max(1, int(max_new_tokens))
    except (TypeError, ValueError, OverflowError):
        raise RequestError("Frames per second, max frames and max new tokens must be numbers.") from None
    if not 0 < sampling.fps < math.inf:
        raise RequestError("Frames per second must be a number above 0.")
    return RunRequest(video=video or "", question=question or "", backends=list(backends or []), sampling=sampling,
                      params=dict(params or {}), max_new_tokens=new_tokens)


def backend_color(name: str) -> str:
    """The same color for a backend in its column and in the overlay."""
    names = list_backends()
    return figures.backend_color(names.index(name) if name in names else len(names))


def cleared(backends: list[str]) -> dict[Key, Any]:
    """Empty outputs for a new run."""
    out: dict[Key, Any] = {(name, slot): None for name in backends for slot in COLUMN_SLOTS}
    out.update({(name, ANSWER): "" for name in backends})
    out.update({VIDEO_INFO: "", OVERLAY: None, TABLE: None, EXPORT: gr.DownloadButton(value=None, interactive=False)})
    return out


def finished_outputs(event: Finished, result: RunResult, request: RunRequest) -> dict[Key, Any]:
    """A backend's column once it has answered, and the shared overlay and table with every answer so far."""
    video = result.video
    baseline = summary.uniform_tokens(event.answer.num_frames, video.grid)
    done = [name for name in request.backends if name in result.answers]
    labelled = [(get_backend(name).label, result.answers[name]) for name in done]
    return {
        (event.backend, ANSWER): event.answer.text,
        (event.backend, STATS): summary.stats_markdown(event.answer, baseline),
        (event.backend, ATTENTION): figures.attention_figure(event.answer, video.timestamps,
                                                             backend_color(event.backend)),
        (event.backend, FRAMES): event.top_frames,
        (event.backend, COST): figures.cost_figure(event.answer),
        OVERLAY: figures.overlay_figure(
            [(label, answer, backend_color(name)) for name, (label, answer) in zip(done, labelled)], video.timestamps),
        TABLE: summary.summary_table(labelled, {a.num_frames: summary.uniform_tokens(a.num_frames, video.grid)
                                                for _, a in labelled}),
    }


def stream_run(runtime: Runtime, request: RunRequest, progress: Progress,
               client: str | None = None) -> Iterator[dict[Key, Any]]:
    """Run every chosen backend on one decode + encode, yielding output updates as answers stream in; the last
    update offers the whole run as a JSON download. A `client` (its address) is held to the runtime's rate limit."""
    request = check_request(request)
    if client is not None:
        runtime.limiter.check(client)
    result = RunResult()
    yield cleared(request.backends)
    for event in runtime.run(request):
        result.apply(event)
        if isinstance(event, Step):
            progress(event.fraction, desc=event.desc)
        elif isinstance(event, RetryNotice):
            gr.Warning(event.message)
            yield {**cleared(request.backends), VIDEO_INFO: f"*{event.message}*"}
        elif isinstance(event, VideoReady):
            yield {VIDEO_INFO: "  \n".join([summary.video_markdown(event), *(f"*{n}*" for n in result.notices)])}
        elif isinstance(event, Partial):
            yield {(event.backend, ANSWER): event.text}
        elif isinstance(event, Finished):
            yield finished_outputs(event, result, request)
    progress(1.0, desc="Done")
    record = build_record(request, result, runtime.preset, runtime.random_weights)
    yield {EXPORT: gr.DownloadButton(value=str(write_export(record)), interactive=True)}


def ask(runtime: Runtime, request: RunRequest, client: str | None = None) -> dict[str, Any]:
    """The whole run as the JSON record (the `/ask` endpoint); a `client` is held to the runtime's rate limit."""
    request = check_request(request)
    if client is not None:
        runtime.limiter.check(client)
    result = RunResult()
    for event in runtime.run(request):
        result.apply(event)
    return build_record(request, result, runtime.preset, runtime.random_weights)


def describe_backends() -> list[dict[str, Any]]:
    """Every registered backend with its paper and declared parameters (the `/backends` endpoint)."""
    out = []
    for name in list_backends():
        b = get_backend(name)
        params = [{"name": field, "default": default, **asdict(p)} for field, default, p in param_field_info(b.Params)]
        out.append({"name": name, "label": b.label, "paper": b.paper, "paper_url": b.paper_url,
                    "description": b.description, "params": params})
    return out


def health(runtime: Runtime) -> dict[str, Any]:
    """What an operator or a load test watches (the `/health` endpoint): feature cache use, process memory, and
    how many decodes and vision-tower runs the engine has started."""
    engine = runtime.engine
    return {"preset": runtime.preset, "feature_cache_bytes": engine.features.nbytes,
            "feature_cache_limit": engine.features.max_bytes, "feature_cache_entries": len(engine.features),
            "rss_bytes": psutil.Process().memory_info().rss, "decode_calls": engine.decode_calls,
            "vision_calls": engine.vision_calls}
