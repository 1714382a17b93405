"""Pixel decoders (decord, PyAV) and the decode worker's entry point.

Everything here runs in the worker process started by `engine.video`; it imports only the standard library,
numpy, PyAV (decord lazily) and the torch-free engine modules.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import resource
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import av
import numpy as np

from engine.errors import VideoError
from engine.sampling import frames_at, sample_times
from engine.video_probe import Probe, probe

log = logging.getLogger(__name__)

# Extra seconds the worker allows itself past the caller's time limit before its alarm kills it: a backstop for
# a worker whose parent died and can no longer kill it.
_ALARM_GRACE_S = 10


@dataclass(frozen=True)
class DecodeJob:
    """Frames to decode: presentation-order `indices` (ascending) with their PTS and each one's preceding keyframe
    PTS (stream time base), to be returned as RGB `width`×`height` in coded orientation: the worker applies
    `rotation` (clockwise degrees) afterwards."""

    path: str
    stream_index: int
    indices: tuple[int, ...]
    pts: tuple[int, ...]
    seek_pts: tuple[int, ...]
    time_base: Fraction
    num_frames: int
    width: int
    height: int
    rotation: int


# A decoder maps each frame index it could decode to its H×W×3 uint8 RGB picture; a missing index is a frame it
# could not decode (dropped from the Clip); raising means it cannot handle the file (the next decoder is tried).
Decoder = Callable[[DecodeJob], dict[int, np.ndarray]]


def decode_pyav(job: DecodeJob) -> dict[int, np.ndarray]:
    """Seek to the keyframe before each wanted frame (only when it lies ahead) and decode forward to it by PTS."""
    wanted = dict(zip(job.pts, job.indices))
    out: dict[int, np.ndarray] = {}
    with av.open(job.path, metadata_errors="ignore") as container:
        stream = container.streams[job.stream_index]
        stream.thread_type = "AUTO"
        frames, position = None, None
        for target, seek in zip(job.pts, job.seek_pts):
            if wanted[target] in out:
                continue
            if frames is None or position is None or position >= target or seek > position:
                container.seek(seek, stream=stream, backward=True, any_frame=False)
                frames, position = _decoded_frames(container, stream), None
            for frame in frames:
                if frame.pts is None:
                    continue
                position = frame.pts
                if frame.pts in wanted and wanted[frame.pts] not in out:
                    out[wanted[frame.pts]] = frame.to_ndarray(
                        format="rgb24", width=job.width, height=job.height, interpolation="BICUBIC"
                    )
                if frame.pts >= target:
                    break
    return out


def _decoded_frames(container, stream):
    """Frames from the current position on; a packet the decoder rejects is skipped, not fatal."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.InvalidDataError:
            continue


def decode_decord(job: DecodeJob) -> dict[int, np.ndarray]:
    """decord's batched seek+decode, used only when its frame list provably matches the PTS index."""
    import decord

    if job.rotation:
        # decord 0.6 rotates by itself and then garbles the picture when it also resizes (4 channels, squashed).
        raise RuntimeError("decord cannot resize rotated videos correctly")
    reader = decord.VideoReader(job.path, ctx=decord.cpu(0), width=job.width, height=job.height, num_threads=0)
    if len(reader) != job.num_frames:
        raise RuntimeError(f"decord counts {len(reader)} frames, the packet index {job.num_frames}")
    indices = list(job.indices)
    # decord's timestamps are float32 seconds, from the stream's start in some containers (MKV) and absolute in
    # others, so compare times relative to the first wanted frame, with a tolerance.
    got = reader.get_frame_timestamp(indices)[:, 0].astype(np.float64)
    want = (np.array(job.pts) - job.pts[0]) * float(job.time_base)
    if not np.allclose(got - got[0], want, rtol=1e-6, atol=1e-3):
        raise RuntimeError("decord's frame timestamps do not match the stream's PTS")
    batch = reader.get_batch(indices).asnumpy()
    return dict(zip(indices, batch))


_BUILTIN: dict[str, Decoder] = {"decord": decode_decord, "pyav": decode_pyav}


def check_decoder_name(name: str) -> None:
    """ValueError unless `name` is a built-in decoder or a 'module:function' path."""
    module, _, func = name.partition(":")
    if name not in _BUILTIN and not (module and func):
        raise ValueError(f"unknown decoder {name!r}: use one of {sorted(_BUILTIN)} or 'module:function'")


def resolve_decoder(name: str) -> Decoder:
    """The decoder function for a built-in name or a 'module:function' path."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(module), func)


def output_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Width and height scaled so the longer side is ≤ max_side, aspect kept, never upscaled."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _stack(decoded: dict[int, np.ndarray], job: DecodeJob) -> tuple[np.ndarray, list[int]]:
    kept = [i for i in job.indices if i in decoded]
    shape = (job.height, job.width, 3)
    for i in kept:
        frame = decoded[i]
        if frame.shape != shape or frame.dtype != np.uint8:
            raise RuntimeError(f"frame {i} came back as {frame.dtype}{frame.shape}, expected uint8{shape}")
    return np.stack([decoded[i] for i in kept]) if kept else np.zeros((0, *shape), np.uint8), kept


def _job(request: dict, info: Probe, indices: np.ndarray) -> DecodeJob:
    # Keyframe at or before each wanted frame in presentation order; frame 0 when the stream starts without one.
    key_pos = np.union1d([0], np.flatnonzero(info.keyframe))
    seek_idx = key_pos[np.searchsorted(key_pos, indices, side="right") - 1]
    width, height = output_size(info.width, info.height, request["max_side"])
    return DecodeJob(
        path=request["path"], stream_index=info.stream_index, indices=tuple(int(i) for i in indices),
        pts=tuple(int(p) for p in info.pts[indices]), seek_pts=tuple(int(p) for p in info.pts[seek_idx]),
        time_base=info.time_base, num_frames=len(info.pts), width=width, height=height, rotation=info.rotation,
    )


def _meta(info: Probe, decoder: str) -> dict:
    """VideoMeta's fields; width and height are the upright (displayed) size of the source."""
    upright = (info.height, info.width) if info.rotation % 180 else (info.width, info.height)
    return {
        "duration_s": info.duration_s, "avg_fps": len(info.pts) / info.duration_s if info.duration_s else 0.0,
        "num_frames": len(info.pts), "width": upright[0], "height": upright[1], "rotation": info.rotation,
        "decoder": decoder,
    }


def _decode(request: dict, workdir: Path) -> dict:
    info = probe(request["path"], request["max_pixels"], request["max_duration_s"])
    times = info.frame_times_s
    indices = frames_at(sample_times(info.duration_s, SimpleNamespace(**request["sampling"])), times)
    job = _job(request, info, indices)
    failures = []
    for name in request["decoders"]:
        # Left for the parent: if this decoder kills the process, the next attempt starts after it.
        (workdir / "attempt").write_text(name)
        try:
            frames, kept = _stack(resolve_decoder(name)(job), job)
        except Exception as err:  # a decoder failing on this file is expected; the next one gets a try
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if not kept:
            failures.append(f"{name}: no frame decoded")
            continue
        # np.rot90 turns counter-clockwise; the rotation is clockwise.
        frames = np.ascontiguousarray(np.rot90(frames, k=-info.rotation // 90, axes=(1, 2)))
        np.save(workdir / "frames.npy", frames)
        return {"timestamps": times[kept].tolist(), "indices": kept, "failures": failures, "meta": _meta(info, name)}
    for failure in failures:
        log.warning("decoder failed on %s: %s", request["path"], failure)
    raise VideoError(
        f"The video's frames could not be decoded ({info.codec}); the file is probably corrupt or uses an "
        "unsupported codec."
    )


def worker_main(workdir: str) -> None:
    """Entry point of the decode worker: read request.json in `workdir`, write result.json and frames.npy."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    # A crashing decoder must not leave a core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    wd = Path(workdir)
    request = json.loads((wd / "request.json").read_text())
    if hasattr(signal, "alarm"):
        signal.alarm(math.ceil(request["timeout_s"]) + _ALARM_GRACE_S)
    try:
        result = _decode(request, wd)
    except VideoError as err:
        result = {"error": str(err)}
    except Exception:  # anything else is a bug or an FFmpeg surprise; the user gets a plain sentence
        log.exception("decode worker failed on %s", request["path"])
        result = {"error": "The video could not be read; the file may be corrupt or in an unsupported format."}
    tmp = wd / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(wd / "result.json")
