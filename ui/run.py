"""One run of the arena as a stream of events: decode and encode once, then every chosen backend answers in turn."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from engine.api import Engine, check_question
from engine.errors import UserFacingError, VideoError
from engine.oom import RetryNotice, run_with_oom_retry
from engine.types import Answer, Sampling, StageProbe, VideoMeta

TOP_FRAMES = 4
# Frames a run may sample (the UI slider's maximum): each costs decode memory, vision-tower time and visual tokens.
MAX_FRAMES = int(os.environ.get("FRAME_ARENA_MAX_FRAMES", "256"))


class RequestError(UserFacingError):
    """The form is incomplete or names something that does not exist."""


@dataclass
class RunRequest:
    """Everything a run depends on; `params` maps backend name → parameter overrides."""

    video: str
    question: str
    backends: list[str]
    sampling: Sampling
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_new_tokens: int = 64


@dataclass
class Step:
    """Progress: `desc` is starting; `fraction` of the run is done."""

    desc: str
    fraction: float


@dataclass
class VideoReady:
    """The video is decoded and encoded; `stages` are decode and encode, shared by every backend."""

    timestamps: np.ndarray
    meta: VideoMeta
    stages: list[StageProbe]
    grid: int


@dataclass
class Partial:
    backend: str
    text: str


@dataclass
class Finished:
    """A backend's answer, with its most-attended frames as (image, caption) in descending attention."""

    backend: str
    answer: Answer
    top_frames: list[tuple[np.ndarray, str]]


Event = Step | VideoReady | Partial | Finished | RetryNotice


def check_request(request: RunRequest) -> RunRequest:
    """The request with its question stripped, each method once and parameters typed; RequestError/QuestionError
    for what the user must fix first."""
    if not request.video:
        raise VideoError("Please upload a video or pick one of the examples.")
    if not request.backends:
        raise RequestError("Please choose at least one method to compare.")
    if request.sampling.max_frames > MAX_FRAMES:
        raise RequestError(f"Max frames is {request.sampling.max_frames:,}; the limit is {MAX_FRAMES}.")
    known = list_backends()
    unknown = [str(name) for name in request.backends if name not in known]
    if unknown:
        raise RequestError(f"Unknown method(s): {', '.join(unknown)[:200]}. Available: {', '.join(known)}.")
    params = {}
    for name, overrides in request.params.items():
        if name not in known:
            raise RequestError(f"Parameters given for unknown method '{str(name)[:100]}'.")
        try:
            params[name] = checked_params(name, overrides)
            get_backend(name).make_params(params[name])
        except (TypeError, ValueError) as err:
            raise RequestError(f"Invalid parameters for {name}: {err}") from None
    # A method named twice would run twice on one request.
    backends = list(dict.fromkeys(request.backends))
    return dataclasses.replace(request, question=check_question(request.question), backends=backends, params=params)


def checked_params(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` as their fields' types; ValueError for a value of the wrong kind or outside the declared range or
    choices (the API is not held to the UI's sliders). Unknown fields are left for make_params to report."""
    declared = {key: (default, param) for key, default, param in param_field_info(get_backend(name).Params)}
    out = {}
    for key, value in overrides.items():
        if key not in declared:
            out[key] = value
            continue
        default, param = declared[key]
        if param.choices is not None:
            if value not in param.choices:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, param.choices))}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
        elif isinstance(default, (int, float)):
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            finite = isinstance(number, int) or math.isfinite(number)  # an int may be too large for a float
            if not finite or (isinstance(default, int) and number != int(number)):
                raise ValueError(f"{key} must be a {'whole ' if isinstance(default, int) else ''}number")
            value = type(default)(number)
            if param.minimum is not None and value < param.minimum:
                raise ValueError(f"{key} must be at least {param.minimum:g}")
            if param.maximum is not None and value > param.maximum:
                raise ValueError(f"{key} must be at most {param.maximum:g}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{key} must be text")
        out[key] = value
    return out


def gpu_seconds(request: RunRequest) -> int:
    """GPU time to reserve on a ZeroGPU Space: encoding grows with frames, each backend adds prefill and decoding."""
    frames = max(1, request.sampling.max_frames)
    per_backend = 8 + 0.15 * frames + 0.05 * request.max_new_tokens
    return int(min(300, math.ceil(15 + 0.2 * frames + per_backend * max(1, len(request.backends)))))


def top_frames(frames: np.ndarray, timestamps: np.ndarray, attention: np.ndarray,
               k: int = TOP_FRAMES) -> list[tuple[np.ndarray, str]]:
    """The `k` frames with the most attention, most attended first, captioned with time and share."""
    order = np.argsort(-attention, kind="stable")[:k]
    return [(frames[i], f"{timestamps[i]:.1f} s · {100 * attention[i]:.1f}%") for i in order]


def run_events(engine: Engine, request: RunRequest) -> Iterator[Event]:
    """Decode and encode once, then stream each backend's answer; on CUDA OOM start over once with half the frames."""

    def attempt(sampling: Sampling) -> Iterator[Event]:
        total = 2 + len(request.backends)
        step_names = {"decode": "Decoding the video", "encode": "Encoding the frames (once, shared by every method)"}
        for done, item in enumerate(engine.prepare_steps(request.video, sampling)):
            if isinstance(item, str):
                yield Step(step_names[item], done / total)
            else:
                prepared = item
        clip, features = prepared.clip, prepared.features
        yield VideoReady(clip.timestamps, clip.meta, list(prepared.stages), features.grid)
        for i, name in enumerate(request.backends):
            yield Step(f"{get_backend(name).label}: answering", (2 + i) / total)
            for item in engine.answer_stream(prepared, name, request.question, request.params.get(name),
                                             request.max_new_tokens):
                if isinstance(item, str):
                    yield Partial(name, item)
                else:
                    yield Finished(name, item, top_frames(clip.frames, clip.timestamps, item.frame_attention))

    yield from run_with_oom_retry(attempt, request.sampling)


@dataclass
class RunResult:
    """What a run has produced so far; `apply` folds in one event (a retry starts the answers over)."""

    video: VideoReady | None = None
    texts: dict[str, str] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)
    top_frames: dict[str, list[tuple[np.ndarray, str]]] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    retry_sampling: Sampling | None = None

    def apply(self, event: Event) -> None:
        if isinstance(event, RetryNotice):
            self.video, self.texts, self.answers, self.top_frames = None, {}, {}, {}
            self.notices.append(event.message)
            self.retry_sampling = event.sampling
        elif isinstance(event, VideoReady):
            self.video = event
        elif isinstance(event, Partial):
            self.texts[event.backend] = event.text
        elif isinstance(event, Finished):
            self.texts[event.backend] = event.answer.text
            self.answers[event.backend] = event.answer
            self.top_frames[event.backend] = event.top_frames
