"""Per-stage probes: wall time (synchronised on CUDA) and memory (CUDA allocator peak, or process RSS on CPU)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.types import StageProbe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage(name: str, device: torch.device, sink: list[StageProbe]) -> Iterator[None]:
    """Time the block and record its memory: CUDA peak since the stage began, else the process RSS at its end."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            sink.append(StageProbe(name, seconds, torch.cuda.max_memory_allocated(device), "cuda_peak"))
        else:
            import psutil  # only for the CPU counter; the GPU path must not need it

            sink.append(StageProbe(name, seconds, psutil.Process().memory_info().rss, "cpu_rss"))
