"""The engine every session shares: one per process, from $FRAME_ARENA_PRESET, falling back to `tiny` with a banner."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from engine.api import Engine
from engine.errors import ModelUnavailable
from engine.presets import DEFAULT_PRESET, PRESETS
from ui.rate_limit import RateLimiter
from ui.run import Event, RunRequest, gpu_seconds, run_events

PRESET_ENV = "FRAME_ARENA_PRESET"
FALLBACK_PRESET = "tiny"

log = logging.getLogger(__name__)
Fn = TypeVar("Fn", bound=Callable)


@dataclass
class Runtime:
    """The loaded engine, the preset it runs, the notices the page shows above everything else, the per-client rate
    limit, and `run`: the run's event stream, holding the GPU on a ZeroGPU Space for a time estimated from the
    request."""

    engine: Engine
    preset: str
    banners: list[str] = field(default_factory=list)
    limiter: RateLimiter = field(default_factory=RateLimiter.from_env)

    def __post_init__(self) -> None:
        engine = self.engine

        def run_on_gpu(request: RunRequest) -> Iterator[Event]:
            yield from run_events(engine, request)

        self.run: Callable[[RunRequest], Iterator[Event]] = on_gpu(run_on_gpu, duration=gpu_seconds)

    @property
    def random_weights(self) -> bool:
        return bool(self.engine.loaded.random_weights)


def fallback_banner(requested: str, err: ModelUnavailable) -> str:
    """Why the app runs on the tiny model and how to get the real one."""
    preset = PRESETS.get(requested)
    download = f"`hf download {preset.repo_id}`" if preset and preset.repo_id else "the checkpoint"
    return (
        f"**The model preset `{requested}` could not be loaded, so the app is running on the tiny offline preset "
        f"`{FALLBACK_PRESET}`.** To get real answers, run {download} on a machine with internet access and "
        f"restart, or pick another preset: `{PRESET_ENV}=llava-ov-7b python app.py` (presets: "
        f"{', '.join(f'`{name}`' for name in PRESETS)}).  \n*Loader: {err}*"
    )


def random_weights_banner(preset: str) -> str:
    return (
        f"**Preset `{preset}` has random weights: its answers are meaningless.** The pipeline, token counts, "
        f"timings and memory are real; use a real checkpoint to compare answers."
    )


def load_runtime(preset: str | None = None) -> Runtime:
    """Load `preset` (default: $FRAME_ARENA_PRESET, else the default preset); on ModelUnavailable load `tiny`."""
    requested = preset or os.environ.get(PRESET_ENV) or DEFAULT_PRESET
    banners = []
    try:
        engine, name = Engine.from_preset(requested), requested
    except ModelUnavailable as err:
        log.warning("preset %s unavailable, falling back to %s: %s", requested, FALLBACK_PRESET, err)
        engine, name = Engine.from_preset(FALLBACK_PRESET), FALLBACK_PRESET
        banners.append(fallback_banner(requested, err))
    if engine.loaded.random_weights:
        banners.append(random_weights_banner(name))
    return Runtime(engine=engine, preset=name, banners=banners)


@functools.cache
def shared_runtime() -> Runtime:
    """The process-wide runtime, loaded on first use."""
    return load_runtime()


def on_gpu(fn: Fn, duration: Callable[..., int]) -> Fn:
    """`spaces.GPU(duration=…)(fn)` on a ZeroGPU Space; `fn` unchanged where the `spaces` package is absent
    (it is itself a no-op off ZeroGPU)."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)
