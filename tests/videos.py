"""Test videos written with PyAV: every frame shows its index as a grid of big squares; plus makers for bad files.

Layout of a frame (upright, display orientation): a gray margin around a 3×10 grid. Column 0 is always white and
column 9 always black (they reveal a wrong rotation or a mirror); columns 1–8 of row 0 hold bits 0–7 of the index,
row 1 bits 8–15, and row 2 the complement of row 0 as a check. Cells are large, so the index survives lossy
compression and downscaling.
"""

from __future__ import annotations

import ctypes
import os
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ROWS, COLS = 3, 10
GRAY = 128


def _grid_edges(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel edges of the grid's columns and rows; the grid sits inside a 1/16 margin on each side."""
    mx, my = width / 16, height / 16
    xs = np.linspace(mx, width - mx, COLS + 1)
    ys = np.linspace(my, height - my, ROWS + 1)
    return xs, ys


def _cells(index: int) -> np.ndarray:
    bits = [(index >> b) & 1 for b in range(16)]
    cells = np.zeros((ROWS, COLS), dtype=bool)
    cells[:, 0] = True
    cells[0, 1:9] = bits[:8]
    cells[1, 1:9] = bits[8:]
    cells[2, 1:9] = [not b for b in bits[:8]]
    return cells


def draw_index(index: int, width: int, height: int) -> np.ndarray:
    """An upright H×W×3 uint8 frame showing `index` (0 ≤ index < 65536)."""
    if not 0 <= index < 1 << 16:
        raise ValueError(f"index {index} does not fit in 16 bits")
    frame = np.full((height, width, 3), GRAY, dtype=np.uint8)
    xs, ys = _grid_edges(width, height)
    xs, ys = np.round(xs).astype(int), np.round(ys).astype(int)
    for r, row in enumerate(_cells(index)):
        for c, white in enumerate(row):
            frame[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = 255 if white else 0
    return frame


def read_index(frame: np.ndarray) -> int:
    """Decode the index drawn by `draw_index` from an upright frame of any size; ValueError if it does not read."""
    height, width = frame.shape[:2]
    xs, ys = _grid_edges(width, height)
    gray = frame.astype(np.float32).mean(axis=2)
    cells = np.zeros((ROWS, COLS), dtype=bool)
    for r in range(ROWS):
        for c in range(COLS):
            # Only the middle half of a cell: its edges blur under compression and resizing.
            x0, x1 = xs[c] + (xs[c + 1] - xs[c]) / 4, xs[c + 1] - (xs[c + 1] - xs[c]) / 4
            y0, y1 = ys[r] + (ys[r + 1] - ys[r]) / 4, ys[r + 1] - (ys[r + 1] - ys[r]) / 4
            patch = gray[int(y0) : max(int(y1), int(y0) + 1), int(x0) : max(int(x1), int(x0) + 1)]
            value = float(patch.mean())
            if 70 < value < 185:
                raise ValueError(f"cell ({r}, {c}) is neither black nor white ({value:.0f})")
            cells[r, c] = value >= 185
    if not cells[:, 0].all() or cells[:, 9].any():
        raise ValueError("the marker columns are wrong: the frame is rotated, mirrored or not a test frame")
    if not np.array_equal(cells[2, 1:9], ~cells[0, 1:9]):
        raise ValueError("the check row does not match")
    bits = list(cells[0, 1:9]) + list(cells[1, 1:9])
    return sum(int(b) << i for i, b in enumerate(bits))


def _codec_options(codec: str) -> dict[str, str]:
    if codec in ("libx264", "libx265"):
        # B-frames and short GOPs, so decode order ≠ presentation order and sampling has to seek.
        return {"crf": "18", "preset": "veryfast", "g": "12", "bf": "2"}
    return {"g": "12", "qscale": "2"}


def make_video(
    path: str | os.PathLike,
    num_frames: int,
    fps: float,
    size: tuple[int, int] = (160, 96),
    codec: str = "libx264",
    rotation: int = 0,
    vfr_times: list[float] | None = None,
    faststart: bool = False,
) -> Path:
    """Write a video whose frame i shows index i; returns the path.

    `size` is the upright (display) W×H, even for libx264. `rotation` is the clockwise angle a player must turn
    the stored frames (the old `rotate` tag, as phones write it): the frames are stored turned the other way
    with a matching display matrix. `vfr_times` gives each frame's PTS in seconds (multiples of 1 ms) instead of
    i/fps. `faststart` puts the moov atom first.
    """
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90")
    if vfr_times is not None and len(vfr_times) != num_frames:
        raise ValueError("vfr_times needs one time per frame")
    turns = (rotation // 90) % 4
    width, height = size
    coded_w, coded_h = (height, width) if turns % 2 else (width, height)
    rate = Fraction(fps).limit_denominator(1001)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate, options=_codec_options(codec))
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        if vfr_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if turns:
            # PyAV's angle is counter-clockwise.
            stream.set_display_rotation(-90 * turns)
        for i in range(num_frames):
            coded = np.ascontiguousarray(np.rot90(draw_index(i, width, height), k=turns))
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            if vfr_times is not None:
                frame.pts, frame.time_base = round(vfr_times[i] * 1000), Fraction(1, 1000)
            else:
                frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return Path(path)


def make_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> Path:
    """An .mp4 holding only an AAC tone."""
    sample_rate = 44100
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = tone[start : start + 1024][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return Path(path)


_FAKE_CONTENT = {
    "text": b"These are my holiday notes, not a video.\n" * 20,
    "html": b"<!DOCTYPE html>\n<html><head><title>Video</title></head><body>Not found</body></html>\n",
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n",
}


def make_fake_video(path: str | os.PathLike, kind: str = "text") -> Path:
    """A text, HTML or PDF file (by `kind`) to be saved under a video name."""
    Path(path).write_bytes(_FAKE_CONTENT[kind])
    return Path(path)


def make_truncated(src: str | os.PathLike, dst: str | os.PathLike, keep: float = 0.5) -> Path:
    """A copy of `src` cut after the first `keep` fraction of its bytes, like an interrupted upload."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def _top_level_boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each top-level MP4 box."""
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        boxes.append((kind, pos, pos + size))
        pos += size
    return boxes


def make_no_moov(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of an MP4 with its moov atom (the index) removed."""
    data = Path(src).read_bytes()
    kept = [data[a:b] for kind, a, b in _top_level_boxes(data) if kind != b"moov"]
    Path(dst).write_bytes(b"".join(kept))
    return Path(dst)


def make_zeroed_payload(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of an MP4 whose mdat payload (the coded frames) is all zeros: it parses but nothing decodes."""
    data = bytearray(Path(src).read_bytes())
    for kind, a, b in _top_level_boxes(bytes(data)):
        if kind == b"mdat":
            data[a + 8 : b] = bytes(b - a - 8)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


HANG_PIDFILE_ENV = "FRAME_ARENA_TEST_PIDFILE"


def hanging_decoder(job: object) -> dict:
    """A decoder that never returns; it writes its process id to the file named by $FRAME_ARENA_TEST_PIDFILE."""
    if os.environ.get(HANG_PIDFILE_ENV):
        Path(os.environ[HANG_PIDFILE_ENV]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def exiting_decoder(job: object) -> dict:
    """A decoder that kills its process without cleaning up."""
    os._exit(3)


def segfaulting_decoder(job: object) -> dict:
    """A decoder that dereferences a null pointer."""
    ctypes.string_at(0)
    return {}


def raising_decoder(job: object) -> dict:
    """A decoder that fails like a library that cannot handle the file."""
    raise RuntimeError("this decoder cannot read anything")
