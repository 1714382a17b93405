"""Synthetic videos for the benchmarks: a scrolling textured pattern, written with PyAV (imported only to write)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

# libx264's fastest preset keeps generating a 10-minute 720p video to about a minute on two cores; the keyframe
# interval (`gop_s`) is what makes seeking cost something, as in real footage.
DEFAULT_CODEC_OPTIONS = {"preset": "ultrafast", "crf": "26"}
SCROLL_PERIOD = 64


def pattern_frames(num_frames: int, width: int, height: int, gray: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
    """`num_frames` H×W×3 uint8 frames: a gradient with a fixed noise texture scrolling sideways and a bright box
    crossing the picture, so consecutive frames differ the way camera footage does. `gray` keeps every pixel
    colourless (the needle test needs a background that names no colour)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, width + SCROLL_PERIOD, dtype=np.float32)
    base = np.empty((height, width + SCROLL_PERIOD, 3), np.float32)
    if gray:
        base[:] = ramp[None, :, None]
    else:
        base[..., 0] = ramp
        base[..., 1] = ramp[::-1]
        base[..., 2] = np.linspace(40, 200, height, dtype=np.float32)[:, None]
    texture = rng.normal(0, 12, (height, width + SCROLL_PERIOD, 1 if gray else 3)).astype(np.float32)
    base = np.clip(base + texture, 0, 255).astype(np.uint8)
    box = max(8, min(width, height) // 8)
    for i in range(num_frames):
        offset = (2 * i) % SCROLL_PERIOD
        frame = np.ascontiguousarray(base[:, offset : offset + width])
        x = (i * 5) % max(1, width - box)
        y = (height - box) // 3 + (i * 3) % max(1, (height - box) // 3)
        frame[y : y + box, x : x + box] = 235
        yield frame


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, width: int, height: int,
                codec: str = "libx264", gop_s: float = 5.0, options: dict[str, str] | None = None) -> Path:
    """Encode RGB frames (H×W×3 uint8, even W and H) to `path` at constant `fps`; a keyframe every `gop_s` seconds."""
    import av

    rate = Fraction(fps).limit_denominator(1001)
    opts = dict(DEFAULT_CODEC_OPTIONS if codec == "libx264" else {})
    opts["g"] = str(max(1, round(gop_s * fps)))
    opts.update(options or {})
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=opts)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return Path(path)


def write_pattern_video(path: str | os.PathLike, seconds: float, fps: float, width: int, height: int,
                        gop_s: float = 5.0) -> Path:
    """A `seconds`-long pattern video (see `pattern_frames`)."""
    count = max(1, round(seconds * fps))
    return write_video(path, pattern_frames(count, width, height), fps, width, height, gop_s=gop_s)
