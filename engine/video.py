"""Decode and sample a video file into a `Clip`, safely: the decoding runs in a child process with a time limit.

Checks on the file itself run here; the worker process (`engine.video_decoders.worker_main`) reads the header
and packet index with PyAV, applies the limits, picks frames by PTS, decodes their pixels with decord or PyAV and
turns them upright; the frames come back through a .npy file in a private temp folder removed whatever happens.
Clip.timestamps are PTS in seconds from the first frame's; frame_indices count frames in presentation order;
meta.width/height are the source's upright size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import VideoError
from engine.sampling import sample_times
from engine.types import Clip, Sampling, VideoMeta
from engine.video_decoders import check_decoder_name
from engine.video_probe import describe_duration

__all__ = ["VideoLimits", "decoders_from_env", "load_clip", "sample_times"]

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
# The worker registers a bare `engine` package instead of importing engine/__init__.py, so it never pays for
# (or breaks on) whatever the package imports, such as torch. `sys.path[0]` is the caller's working directory
# under `-c`; the project root replaces it.
_BOOTSTRAP = (
    "import sys, types\n"
    "root, workdir = sys.argv[1], sys.argv[2]\n"
    "sys.path[0] = root\n"
    "engine = types.ModuleType('engine')\n"
    "engine.__path__ = [root.rstrip('/') + '/engine']\n"
    "sys.modules['engine'] = engine\n"
    "from engine.video_decoders import worker_main\n"
    "worker_main(workdir)\n"
)
_HASH_CHUNK = 1 << 20
DEFAULT_DECODERS = ("decord", "pyav")


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be before it is refused (checked from the header, before pixels are decoded)."""

    max_file_bytes: int = 2 << 30
    max_duration_s: float = 3 * 3600.0
    max_pixels: int = 4096 * 2160
    decode_timeout_s: float = 120.0
    max_side: int = 448

    @classmethod
    def from_env(cls) -> VideoLimits:
        """Defaults, overridden by FRAME_ARENA_MAX_FILE_MB (MiB), _MAX_DURATION_S, _MAX_PIXELS, _DECODE_TIMEOUT_S
        and _MAX_SIDE."""
        base, env = cls(), os.environ
        return cls(
            max_file_bytes=int(_env_number(env, "FRAME_ARENA_MAX_FILE_MB", base.max_file_bytes / 2**20) * 2**20),
            max_duration_s=_env_number(env, "FRAME_ARENA_MAX_DURATION_S", base.max_duration_s),
            max_pixels=int(_env_number(env, "FRAME_ARENA_MAX_PIXELS", base.max_pixels)),
            decode_timeout_s=_env_number(env, "FRAME_ARENA_DECODE_TIMEOUT_S", base.decode_timeout_s),
            max_side=int(_env_number(env, "FRAME_ARENA_MAX_SIDE", base.max_side)),
        )


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be > 0")
    return value


def decoders_from_env() -> tuple[str, ...]:
    """The decoders to try, in order: $FRAME_ARENA_DECODERS (comma-separated names), else decord then PyAV."""
    raw = os.environ.get("FRAME_ARENA_DECODERS", "")
    names = tuple(name.strip() for name in raw.split(",") if name.strip())
    for name in names:
        check_decoder_name(name)
    return names or DEFAULT_DECODERS


def load_clip(
    path: str | os.PathLike,
    sampling: Sampling,
    limits: VideoLimits | None = None,
    decoders: tuple[str, ...] | None = None,
) -> Clip:
    """Sample `path` per `sampling` into a Clip; any problem with the file raises VideoError with a readable message.

    `decoders` are tried in order: "decord", "pyav" or a "module:function" decoder (see video_decoders.DecodeJob);
    they default to decoders_from_env(), `limits` to VideoLimits.from_env().
    """
    limits = limits or VideoLimits.from_env()
    decoders = decoders_from_env() if decoders is None else decoders
    if not decoders:
        raise ValueError("no decoder given")
    for name in decoders:
        check_decoder_name(name)
    sample_times(1.0, sampling)  # a bad Sampling is the caller's bug: ValueError here, not a VideoError later
    file = _checked_file(Path(path), limits)
    stop = threading.Event()
    # Hashing a large file takes seconds; it overlaps with the worker instead of adding to it.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(_sha256, file, stop)
        try:
            result, frames = _decode_with_fallback(file, sampling, limits, decoders)
        except BaseException:
            stop.set()
            raise
    try:
        content_hash = digest.result()
    except OSError as err:
        raise VideoError(f"The video file {file.name} could not be read to the end ({err.strerror}).") from None
    return Clip(
        frames=frames, timestamps=np.asarray(result["timestamps"], dtype=np.float64),
        frame_indices=np.asarray(result["indices"], dtype=np.int64),
        meta=VideoMeta(path_name=file.name, **result["meta"]), content_hash=content_hash, sampling=sampling,
    )


def _checked_file(path: Path, limits: VideoLimits) -> Path:
    name = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise VideoError(f"The video file {name} was not found.") from None
    except OSError as err:
        raise VideoError(f"The video file {name} cannot be opened ({err.strerror}).") from None
    if path.is_dir():
        raise VideoError(f"{name} is a folder, not a video file.")
    try:
        path.open("rb").close()
    except OSError as err:
        raise VideoError(f"The video file {name} cannot be read ({err.strerror}).") from None
    if size == 0:
        raise VideoError(f"The file {name} is empty (0 bytes); the upload may have failed.")
    if size > limits.max_file_bytes:
        raise VideoError(
            f"The file is {size / 2**20:,.0f} MB, over the {limits.max_file_bytes / 2**20:,.0f} MB limit. "
            "Please upload a shorter or more compressed video."
        )
    return path


def _sha256(path: Path, stop: threading.Event) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while not stop.is_set() and (chunk := f.read(_HASH_CHUNK)):
            digest.update(chunk)
    return digest.hexdigest()


def _decode_with_fallback(
    path: Path, sampling: Sampling, limits: VideoLimits, decoders: tuple[str, ...]
) -> tuple[dict, np.ndarray]:
    """Run workers until one answers; a decoder that kills its worker is skipped in a fresh one."""
    deadline = time.monotonic() + limits.decode_timeout_s
    remaining = list(decoders)
    while True:
        try:
            return _run_worker(path, sampling, limits, remaining, deadline)
        except _WorkerDied as died:
            if died.decoder not in remaining or died.decoder == remaining[-1]:
                raise VideoError(
                    f"The video decoder {died.how} while reading this file; the file is probably corrupt."
                ) from None
            log.warning("decoder %s %s on %s; trying the next one", died.decoder, died.how, path.name)
            remaining = remaining[remaining.index(died.decoder) + 1 :]


class _WorkerDied(Exception):
    def __init__(self, decoder: str | None, how: str) -> None:
        super().__init__(decoder, how)
        self.decoder, self.how = decoder, how


def _run_worker(
    path: Path, sampling: Sampling, limits: VideoLimits, decoders: list[str], deadline: float
) -> tuple[dict, np.ndarray]:
    """One worker run: (result, frames); _WorkerDied names the decoder that was running when the worker died."""
    workdir = Path(tempfile.mkdtemp(prefix="frame-arena-decode-"))
    try:
        sampling_fields = {"fps": sampling.fps, "max_frames": sampling.max_frames, "max_fps": sampling.max_fps}
        request = {
            "path": str(path.resolve()), "sampling": sampling_fields, "decoders": decoders,
            "max_side": limits.max_side, "max_pixels": limits.max_pixels, "max_duration_s": limits.max_duration_s,
            "timeout_s": max(0.0, deadline - time.monotonic()),
        }
        (workdir / "request.json").write_text(json.dumps(request))
        returncode, stderr = _run_process(workdir, deadline, limits.decode_timeout_s)
        result_file = workdir / "result.json"
        if result_file.exists():
            result = json.loads(result_file.read_text())
            if "error" in result:
                log.info("decode worker refused %s: %s %s", path.name, result["error"], stderr[-2000:])
                raise VideoError(result["error"])
            for failure in result["failures"]:
                log.info("decoder fell back on %s: %s", path.name, failure)
            return result, np.load(workdir / "frames.npy")
        log.warning("decode worker died on %s (exit %s): %s", path.name, returncode, stderr[-2000:])
        attempt = workdir / "attempt"
        raise _WorkerDied(attempt.read_text() if attempt.exists() else None, _death(returncode))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_process(workdir: Path, deadline: float, limit_s: float) -> tuple[int, str]:
    """Run the worker until it exits or the deadline passes; it and anything it started are killed on timeout."""
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(_ROOT), str(workdir)]
    # A session of its own, so a kill reaches the worker's children too and a Ctrl-C in a terminal does not.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise VideoError(
            f"Decoding this video took longer than {describe_duration(limit_s)} and was stopped. The file may be "
            "corrupt or too demanding; try a shorter or smaller video."
        ) from None
    except BaseException:
        _kill(proc)
        raise
    return proc.returncode, stderr.decode(errors="replace")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"crashed (signal {signal.Signals(-returncode).name})"
        except ValueError:
            return f"crashed (signal {-returncode})"
    return f"exited unexpectedly (exit code {returncode})"
