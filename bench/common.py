"""What every benchmark shares: the machine's description, median-of-N runs, JSON, tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Any) -> str:
    """The GPU's name for a CUDA device, else "CPU: <model> (<n> cores)"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores)"


def environment(device: Any) -> dict[str, Any]:
    """Everything needed to tell two result files apart: device, library versions, interpreter, OS."""
    import torch
    import transformers

    device = torch.device(device)
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine skews wall times; the 1/5/15-minute load averages when the file was written.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["cuda"] = torch.version.cuda
    return env


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def repeat(fn: Callable[[], T], repeats: int, warmup: int = 1, budget_s: float | None = None) -> list[T]:
    """Call `fn` `warmup` times unrecorded, then `repeats` times; the recorded results in order.

    With `budget_s`, the first call slower than the budget ends the series, and is recorded itself when nothing
    was yet (a call that takes minutes gains nothing from a warm-up), so a huge frame count runs once, not four times.
    """
    if repeats < 1:
        raise ValueError("repeats must be ≥ 1")
    results: list[T] = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        out = fn()
        slow = budget_s is not None and time.perf_counter() - start > budget_s
        if i >= warmup or (slow and not results):
            results.append(out)
        if slow:
            break
    return results


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON (numpy values converted), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_plain, ensure_ascii=False) + "\n")
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned; None prints as "–"."""
    cells = [[("–" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule] + [line(r) for r in cells])


def fmt_seconds(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_bytes(value: float | None) -> str | None:
    """Bytes as GiB (one decimal) or MiB."""
    if value is None:
        return None
    return f"{value / 2**30:.1f}G" if value >= 2**30 else f"{value / 2**20:.0f}M"


def fmt_ratio(value: float | None) -> str | None:
    return None if value is None else f"×{value:.2f}"
