"""Out-of-memory handling: retry a run once with half the frames, then give up with a clear message."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from engine.errors import OutOfMemory
from engine.types import Sampling

Event = TypeVar("Event")


@dataclass(frozen=True)
class RetryNotice:
    """Yielded before the retry so the caller can tell the user."""

    message: str
    sampling: Sampling


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_retry(run: Callable[[Sampling], Iterator[Event]], sampling: Sampling) -> Iterator[Event | RetryNotice]:
    """Run `run(sampling)`; on OOM free memory and run once more with half the frames (events already yielded by
    the failed attempt stay yielded: callers reset their output on the RetryNotice)."""
    try:
        yield from run(sampling)
        return
    except Exception as err:
        if not is_out_of_memory(err):
            raise
    free_device_memory()
    smaller = dataclasses.replace(sampling, max_frames=max(1, sampling.max_frames // 2))
    yield RetryNotice(
        f"Ran out of GPU memory with up to {sampling.max_frames} frames; retrying with {smaller.max_frames}.", smaller
    )
    try:
        yield from run(smaller)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        free_device_memory()
        raise OutOfMemory(
            f"Ran out of GPU memory even with {smaller.max_frames} frames. Try fewer frames, fewer backends at "
            "once, or a shorter video."
        ) from None
