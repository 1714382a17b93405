"""One run of the arena as a stream of events: decode and encode once, then every chosen backend answers in turn."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backends.registry import get_backend, list_backends
from engine.api import Engine, check_question
from engine.errors import UserFacingError, VideoError
from engine.oom import RetryNotice, run_with_oom_retry
from engine.types import Answer, Sampling, StageProbe, VideoMeta

TOP_FRAMES = 4


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
    """The request with its question stripped; RequestError/QuestionError for what the user must fix first."""
    if not request.video:
        raise VideoError("Please upload a video or pick one of the examples.")
    if not request.backends:
        raise RequestError("Please choose at least one method to compare.")
    known = list_backends()
    unknown = [name for name in request.backends if name not in known]
    if unknown:
        raise RequestError(f"Unknown method(s): {', '.join(unknown)}. Available: {', '.join(known)}.")
    for name, overrides in request.params.items():
        if name not in known:
            raise RequestError(f"Parameters given for unknown method '{name}'.")
        try:
            get_backend(name).make_params(overrides)
        except (TypeError, ValueError) as err:
            raise RequestError(f"Invalid parameters for {name}: {err}") from None
    return dataclasses.replace(request, question=check_question(request.question))


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
