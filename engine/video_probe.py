"""Read a video's header and packet index with PyAV (no pixel decoding but one frame) and refuse bad files.

Runs inside the decode worker process, so a file that crashes or hangs FFmpeg cannot take the app down.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from engine.errors import VideoError

_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}


@dataclass(frozen=True)
class Probe:
    """What the worker needs to know about the chosen video stream. Sizes are as coded (before rotation)."""

    stream_index: int
    codec: str
    width: int
    height: int
    rotation: int
    time_base: Fraction
    pts: np.ndarray
    keyframe: np.ndarray
    duration_s: float

    @property
    def frame_times_s(self) -> np.ndarray:
        """Presentation times in seconds, measured from the first frame."""
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)


def describe_duration(seconds: float) -> str:
    """'2 h 05 min', '3 min 07 s' or '12.5 s'."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def sniff_non_video(head: bytes) -> str | None:
    """Name the kind of document `head` (the file's first bytes) starts, if it is plainly not media."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith(b"%pdf"):
        return "a PDF document"
    if stripped.startswith((b"<!doctype html", b"<html")) or b"<html" in stripped[:512]:
        return "an HTML page"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped[:1024]):
        return "an SVG image"
    if stripped.startswith(b"<?xml"):
        return "an XML document"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as err:
            # A multi-byte character cut off at the end of `head` still counts as text.
            if err.start < len(head) - 3:
                return None
        return "a text file"
    return None


def _open(path: str) -> av.container.InputContainer:
    with open(path, "rb") as f:
        head = f.read(4096)
    kind = sniff_non_video(head)
    if kind is not None:
        raise VideoError(f"This file is not a video: it is {kind} (only its name looks like a video).")
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as err:
        if head[4:8] in _MP4_BOXES:
            raise VideoError(
                "This MP4/MOV file is incomplete or corrupt: its index (the 'moov' atom) is missing or unreadable. "
                "The upload or the recording was probably cut off; try exporting the video again."
            ) from err
        raise VideoError("This file is not a video format that can be read (FFmpeg does not recognise it).") from err


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    # Cover art in music files is a one-picture "video" stream; it is not a video.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        if container.streams.audio:
            raise VideoError("This file has only audio, no video stream. Please upload a video.")
        raise VideoError("This file contains no video stream.")
    best = container.streams.best("video")
    return best if best in streams else streams[0]


def _header_duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _check_header(container, stream, max_pixels: int, max_duration_s: float) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoError("The video stream does not say how large its frames are; the file is probably corrupt.")
    if width * height > max_pixels:
        raise VideoError(
            f"The video is {width}×{height}, above the {max_pixels:,} pixel limit per frame. "
            "Please upload a lower-resolution version."
        )
    duration = _header_duration_s(container, stream)
    if duration is not None and duration > max_duration_s:
        raise VideoError(
            f"The video is {describe_duration(duration)} long, over the {describe_duration(max_duration_s)} limit. "
            "Please trim it."
        )


def _scan_packets(container, stream) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(pts, keyframe flags, duration of the last frame) in presentation order, plus the count of all packets."""
    rows, total = [], 0
    try:
        for packet in container.demux(stream):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or packet.size == 0:
                continue
            total += 1
            # Frames the container's edit list cuts away are decoded for reference only, never shown.
            if not packet.is_discard:
                rows.append((ts, packet.is_keyframe, packet.duration or 0))
    except av.FFmpegError as err:
        raise VideoError(
            f"The video is damaged after its first {total} frames (the data cannot be read further). "
            "It was probably cut off or corrupted; try uploading it again."
        ) from err
    rows.sort()
    pts = np.array([r[0] for r in rows], dtype=np.int64)
    keyframe = np.array([r[1] for r in rows], dtype=bool)
    return pts, keyframe, (rows[-1][2] if rows else 0), total


def _first_frame_rotation(path: str, stream_index: int) -> int | None:
    """Decode up to the first frame; its clockwise display rotation, or None if no frame decodes at all."""
    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams[stream_index]
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue
            if frames:
                # PyAV's angle is counter-clockwise; a player turns the picture the other way.
                return (-round(frames[0].rotation / 90) * 90) % 360
    return None


def _pts_duration_s(pts: np.ndarray, last_duration: int, time_base: Fraction) -> float:
    if last_duration <= 0 and len(pts) > 1:
        last_duration = int(np.median(np.diff(pts)))
    return float((int(pts[-1]) - int(pts[0]) + last_duration) * time_base)


def probe(path: str, max_pixels: int, max_duration_s: float) -> Probe:
    """Open `path`, check its header against the limits, index its packets and check that a frame decodes."""
    with _open(path) as container:
        stream = _video_stream(container)
        _check_header(container, stream, max_pixels, max_duration_s)
        pts, keyframe, last_duration, total = _scan_packets(container, stream)
        name = Path(path).name
        if len(pts) == 0:
            raise VideoError(f"The video stream in {name} has no frames.")
        if stream.frames and total < stream.frames:
            raise VideoError(
                f"The video is truncated: its header lists {stream.frames} frames but only {total} "
                f"{'is' if total == 1 else 'are'} in the file. The upload was probably cut off; try uploading it again."
            )
        time_base = stream.time_base or Fraction(1, av.time_base)
        duration = _pts_duration_s(pts, last_duration, time_base)
        if duration > max_duration_s:
            raise VideoError(
                f"The video is {describe_duration(duration)} long, over the {describe_duration(max_duration_s)} "
                "limit. Please trim it."
            )
        result = dict(stream_index=stream.index, codec=stream.codec_context.name, width=stream.codec_context.width,
                      height=stream.codec_context.height, time_base=time_base, pts=pts, keyframe=keyframe,
                      duration_s=duration)
    rotation = _first_frame_rotation(path, result["stream_index"])
    if rotation is None:
        raise VideoError(
            f"None of the video's frames could be decoded ({result['codec']}); the video data is corrupt."
        )
    return Probe(rotation=rotation, **result)
