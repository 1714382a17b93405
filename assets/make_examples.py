"""Write the demo's example clips into assets/examples/ (small H.264 MP4s drawn with PIL; run once, commit the output).

`python assets/make_examples.py` — each clip shows a running clock in its corner, so a viewer (and the attention
plot) can be checked against the time at which something happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "examples"
SIZE = (320, 180)
FPS = 8
BACKGROUND = (24, 28, 38)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _clock(draw: ImageDraw.ImageDraw, seconds: float) -> None:
    draw.rectangle((4, 4, 96, 34), fill=(0, 0, 0))
    draw.text((10, 6), f"{seconds:5.1f}s", fill=(255, 255, 255), font=_font(22))


def bouncing_ball(t: float, duration: float) -> Image.Image:
    """A ball bouncing between the walls; it turns from red to blue halfway through."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    width, height = SIZE
    radius = 16
    x = radius + abs((t * 90) % (2 * (width - 2 * radius)) - (width - 2 * radius))
    y = height - radius - 8 - abs(math.sin(t * 2.2)) * (height - 3 * radius - 40)
    color = (220, 40, 40) if t < duration / 2 else (40, 90, 230)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
    draw.line((0, height - 8, width, height - 8), fill=(160, 160, 160), width=2)
    _clock(draw, t)
    return image


def counting_shapes(t: float, duration: float) -> Image.Image:
    """One more shape appears every four seconds (square, circle, triangle, …); the count is written below them."""
    image = Image.new("RGB", SIZE, (236, 232, 220))
    draw = ImageDraw.Draw(image)
    count = min(int(t // 4) + 1, 6)
    palette = [(200, 60, 60), (60, 140, 70), (50, 90, 200), (220, 160, 30), (140, 60, 170), (30, 160, 170)]
    for i in range(count):
        cx, cy, r = 40 + i * 48, 95, 18
        box = (cx - r, cy - r, cx + r, cy + r)
        if i % 3 == 0:
            draw.rectangle(box, fill=palette[i])
        elif i % 3 == 1:
            draw.ellipse(box, fill=palette[i])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=palette[i])
    draw.text((110, 135), f"{count} shape{'s' if count > 1 else ''}", fill=(30, 30, 30), font=_font(24))
    _clock(draw, t)
    return image


CLIPS: dict[str, tuple[Callable[[float, float], Image.Image], float]] = {
    "bouncing_ball.mp4": (bouncing_ball, 24.0),
    "counting_shapes.mp4": (counting_shapes, 24.0),
}


def write_clip(path: Path, draw_frame: Callable[[float, float], Image.Image], duration: float) -> Path:
    """Encode `duration` seconds of `draw_frame(t, duration)` at FPS frames per second."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        # crf 30 and a long GOP: flat synthetic graphics stay sharp and the clips stay around 100 kB.
        stream = container.add_stream("libx264", rate=Fraction(FPS), options={"crf": "30", "preset": "slow", "g": "64"})
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for i in range(int(duration * FPS)):
            frame = av.VideoFrame.from_ndarray(np.asarray(draw_frame(i / FPS, duration)), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (draw_frame, duration) in CLIPS.items():
        path = write_clip(OUT / name, draw_frame, duration)
        print(f"{path.relative_to(OUT.parent.parent)}: {path.stat().st_size / 1024:.0f} kB")


if __name__ == "__main__":
    main()
