"""Needle in a haystack: a big coloured square shown for a few seconds at a chosen depth of a long video; the
question only the needle answers is its colour. Per backend: is the answer right, how much of the attention over
frames lands on the needle's frames, and the needle's rank among the frames — over a grid of haystack length ×
depth, written to JSON, printed as a table and optionally drawn as a heatmap (plotly, when installed).

The pure pieces are for the UI too: `make_haystack` (write a haystack video), `haystack_clip` (the same in memory,
no video library needed), `score_answer` and `needle_stats`.

    python -m bench.needle --preset tiny --lengths 30 60 --depths 0 0.5 1 --max-frames 16
    python -m bench.needle --video talk.mp4 --depths 0.1 0.5 0.9 --preset llava-ov-0.5b
"""

from __future__ import annotations

import argparse
import re
import string
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, environment, format_table, write_json

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225),
    "yellow": (240, 215, 20), "purple": (140, 50, 185), "orange": (250, 130, 20),
}
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "lime", "emerald"),
    "blue": ("blue", "navy", "azure", "cobalt"), "yellow": ("yellow", "gold", "golden"),
    "purple": ("purple", "violet", "lilac", "lavender"), "orange": ("orange", "amber", "tangerine"),
}
QUESTION = "What colour is the square that appears in the video? Answer with one word."
SCHEMA = "frame-arena/bench-needle/1"
# Frame times and span edges come from different arithmetic; this much slack counts as equal.
_TIME_SLACK_S = 1e-6


@dataclass(frozen=True)
class Needle:
    """A `color` square covering `size` of the frame's shorter side, on screen for `seconds`, starting at `depth`
    (0 = the first frame, 1 = ending on the last frame) of the video."""

    color: str = "red"
    depth: float = 0.5
    seconds: float = 3.0
    size: float = 0.5

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; one of {', '.join(PALETTE)}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        if not self.seconds > 0 or not 0 < self.size <= 1:
            raise ValueError("seconds must be > 0 and size in (0, 1]")

    @property
    def question(self) -> str:
        return QUESTION

    @property
    def accepted(self) -> tuple[str, ...]:
        return SYNONYMS[self.color]

    @property
    def rejected(self) -> tuple[str, ...]:
        """Every other colour's words: an answer naming several colours is a guess, not a find."""
        return tuple(w for c, words in SYNONYMS.items() if c != self.color for w in words)


@dataclass(frozen=True)
class Haystack:
    """Where the needle is: `span` = [start, end) in seconds, `frames` = [first, stop) frame indices."""

    path: str | None
    duration_s: float
    fps: float
    width: int
    height: int
    num_frames: int
    needle: Needle
    span: tuple[float, float]
    frames: tuple[int, int]


@dataclass(frozen=True)
class NeedleStats:
    """`mass`: share of the frame attention on needle frames; `rank`: 1 = a needle frame got the most attention
    (None when no sampled frame shows the needle); `lift`: mass ÷ the needle frames' share of the frames."""

    mass: float
    rank: int | None
    needle_frames: int
    frames: int
    lift: float | None


# ---------------------------------------------------------------- making haystacks


def needle_window(num_frames: int, fps: float, needle: Needle) -> tuple[int, int]:
    """[first, stop) frame indices the needle covers: `seconds` long (at least one frame), placed at `depth`."""
    length = min(num_frames, max(1, round(needle.seconds * fps)))
    first = round(needle.depth * (num_frames - length))
    return first, first + length


def draw_needle(frame: np.ndarray, needle: Needle) -> np.ndarray:
    """A copy of `frame` (H×W×3 uint8) with the needle's square in the middle."""
    height, width = frame.shape[:2]
    side = max(2, round(min(height, width) * needle.size))
    top, left = (height - side) // 2, (width - side) // 2
    out = frame.copy()
    out[top : top + side, left : left + side] = PALETTE[needle.color]
    return out


def haystack_frames(num_frames: int, width: int, height: int, fps: float, needle: Needle,
                    seed: int = 0) -> Iterator[np.ndarray]:
    """A colourless moving pattern with the needle drawn into its window of frames."""
    from bench.videos import pattern_frames

    first, stop = needle_window(num_frames, fps, needle)
    for i, frame in enumerate(pattern_frames(num_frames, width, height, gray=True, seed=seed)):
        yield draw_needle(frame, needle) if first <= i < stop else frame


def _describe(path: str | None, num_frames: int, fps: float, width: int, height: int, needle: Needle) -> Haystack:
    first, stop = needle_window(num_frames, fps, needle)
    return Haystack(path, num_frames / fps, fps, width, height, num_frames, needle, (first / fps, stop / fps),
                    (first, stop))


def make_haystack(path: str | Path, needle: Needle = Needle(), duration_s: float = 60.0, fps: float = 10.0,
                  size: tuple[int, int] = (320, 180), video: str | Path | None = None) -> Haystack:
    """Write a haystack video to `path` and say where its needle is.

    Without `video` the haystack is a generated `duration_s` pattern at `fps` and `size` (W×H); with `video`
    the needle is drawn into that file's frames instead (re-encoded at its rate and size, audio dropped;
    constant frame rate assumed)."""
    from bench.videos import write_video

    if video is None:
        count = max(1, round(duration_s * fps))
        width, height = size
        write_video(path, haystack_frames(count, width, height, fps, needle), fps, width, height)
        return _describe(str(path), count, fps, width, height, needle)
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        count = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
        frames = (f.to_ndarray(format="rgb24")[:height, :width] for f in container.decode(stream))
        first, stop = needle_window(count, fps, needle)
        marked = (draw_needle(f, needle) if first <= i < stop else f for i, f in enumerate(frames))
        write_video(path, marked, fps, width, height)
    return _describe(str(path), count, fps, width, height, needle)


def haystack_clip(needle: Needle = Needle(), duration_s: float = 60.0, fps: float = 1.0,
                  size: tuple[int, int] = (320, 180)) -> tuple[Any, Haystack]:
    """The haystack as an engine `Clip` at `fps` without writing a file (for machines without PyAV)."""
    from engine.types import Clip, Sampling, VideoMeta

    count = max(1, round(duration_s * fps))
    width, height = size
    frames = np.stack(list(haystack_frames(count, width, height, fps, needle)))
    hay = _describe(None, count, fps, width, height, needle)
    meta = VideoMeta("haystack", hay.duration_s, fps, count, width, height, 0, "in-memory")
    key = f"needle-{count}-{fps}-{width}x{height}-{needle}"
    clip = Clip(frames, np.arange(count) / fps, np.arange(count), meta, key, Sampling(fps=fps, max_frames=count))
    return clip, hay


# ---------------------------------------------------------------- scoring


def normalise(text: str) -> str:
    """Lowercase, accents and punctuation removed, whitespace collapsed: 'The square is RED!' → 'the square is red'."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(f"[{re.escape(string.punctuation)}]", " ", text.lower())
    return " ".join(text.split())


def _mentions(text: str, phrase: str) -> bool:
    phrase = normalise(phrase)
    return bool(phrase) and f" {phrase} " in f" {text} "


def score_answer(answer: str, accepted: tuple[str, ...] | list[str],
                 rejected: tuple[str, ...] | list[str] = ()) -> bool:
    """True when the normalised answer names an accepted word or phrase as a whole word, and no rejected one."""
    text = normalise(answer)
    return any(_mentions(text, a) for a in accepted) and not any(_mentions(text, r) for r in rejected)


def needle_frame_mask(timestamps: np.ndarray, span: tuple[float, float]) -> np.ndarray:
    """Which sampled frames show the needle: their time falls in [start, end)."""
    t = np.asarray(timestamps, dtype=np.float64) + _TIME_SLACK_S
    return (t >= span[0]) & (t < span[1])


def needle_stats(frame_attention: np.ndarray, timestamps: np.ndarray, needle_span: tuple[float, float]) -> NeedleStats:
    """Attention over the sampled frames (one value per frame) against the frames that show the needle."""
    attention = np.asarray(frame_attention, dtype=np.float64)
    mask = needle_frame_mask(timestamps, needle_span)
    if attention.shape != mask.shape:
        raise ValueError(f"{attention.shape[0]} attention values for {mask.shape[0]} timestamps")
    total, frames, hits = float(attention.sum()), len(attention), int(mask.sum())
    mass = float(attention[mask].sum()) / total if total > 0 else 0.0
    if not hits:
        return NeedleStats(mass, None, 0, frames, None)
    best = attention[mask].max()
    rank = int((attention > best).sum()) + 1
    return NeedleStats(mass, rank, hits, frames, mass / (hits / frames))


# ---------------------------------------------------------------- the benchmark


def grid_needles(lengths: list[float], depths: list[float], color: str | None, seconds: float) -> list[tuple]:
    """(length, needle) per grid cell; without a fixed `color` the colours rotate, so one constant answer cannot
    score everywhere."""
    colours = list(PALETTE)
    cells = []
    for i, (length, depth) in enumerate((length, d) for length in lengths for d in depths):
        cells.append((length, Needle(color=color or colours[i % len(colours)], depth=depth, seconds=seconds)))
    return cells


def run_grid(engine, backends: list[str], cells: list[tuple], args: argparse.Namespace) -> list[dict[str, Any]]:
    from engine.api import Prepared
    from engine.types import Sampling

    sampling = Sampling(fps=args.sample_fps, max_frames=args.max_frames)
    rows = []
    for length, needle in cells:
        if args.in_memory:
            fps = min(args.sample_fps, args.max_frames / length)  # the engine's own cap on the frame count
            clip, hay = haystack_clip(needle, length, fps, tuple(args.size))
            prepared = Prepared(clip, engine.encode(clip), [])
        else:
            path = Path(args.workdir) / f"haystack-{length:g}s-{needle.depth:g}.mp4"
            hay = make_haystack(path, needle, length, args.video_fps, tuple(args.size), video=args.video)
            prepared = engine.prepare(path, sampling)
            path.unlink(missing_ok=True)
        for backend in backends:
            answer = engine.answer(prepared, backend, needle.question, max_new_tokens=args.new_tokens)
            stats = needle_stats(answer.frame_attention, prepared.clip.timestamps, hay.span)
            rows.append({
                "length_s": hay.duration_s, "depth": needle.depth, "color": needle.color, "backend": backend,
                "answer": answer.text, "correct": score_answer(answer.text, needle.accepted, needle.rejected),
                "span_s": list(hay.span), "sampled_frames": prepared.clip.num_frames,
                "visual_tokens": answer.num_visual_tokens, **asdict(stats),
            })
            r = rows[-1]
            print(f"[{r['length_s']:g}s depth {r['depth']:g} {backend}] correct={r['correct']} mass={r['mass']:.3f} "
                  f"rank={r['rank']}", file=sys.stderr, flush=True)
    return rows


def grid_table(rows: list[dict[str, Any]]) -> str:
    depths = sorted({r["depth"] for r in rows})
    headers = ["backend", "length s"] + [f"depth {d:g}" for d in depths] + ["correct"]
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for length in sorted({r["length_s"] for r in rows if r["backend"] == backend}):
            picked = {r["depth"]: r for r in rows if (r["backend"], r["length_s"]) == (backend, length)}
            cells = []
            for d in depths:
                r = picked.get(d)
                if r is None:
                    cells.append(None)
                    continue
                mark = "✓" if r["correct"] else "✗"
                # No sampled frame fell inside the needle's seconds: the model never saw it.
                cells.append(f"{mark} not sampled" if not r["needle_frames"] else
                             f"{mark} {100 * r['mass']:.1f}% #{r['rank']}")
            right = sum(r["correct"] for r in picked.values())
            out.append([backend, f"{length:g}"] + cells + [f"{right}/{len(picked)}"])
    return format_table(headers, out)


def write_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """A heatmap per backend (attention mass on the needle, ✓/✗ and rank as text); None without plotly.
    A .png needs kaleido; without it the figure is written as .html next to it."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length_s"] for r in rows})
    fig = make_subplots(rows=1, cols=len(backends), subplot_titles=backends, shared_yaxes=True)
    for col, backend in enumerate(backends, start=1):
        picked = {(r["length_s"], r["depth"]): r for r in rows if r["backend"] == backend}
        z = [[100 * picked[(n, d)]["mass"] if (n, d) in picked else None for d in depths] for n in lengths]
        text = [[(f"{'✓' if picked[(n, d)]['correct'] else '✗'} #{picked[(n, d)]['rank'] or '–'}"
                  if (n, d) in picked else "") for d in depths] for n in lengths]
        fig.add_trace(go.Heatmap(z=z, x=[f"{d:g}" for d in depths], y=[f"{n:g} s" for n in lengths], text=text,
                                 texttemplate="%{text}", zmin=0, zmax=100, colorscale="Viridis",
                                 showscale=col == len(backends), colorbar={"title": "% attention"}),
                      row=1, col=col)
    fig.update_layout(title="Needle in a haystack: attention on the needle's frames (%), answer ✓/✗, rank",
                      xaxis_title="depth")
    if path.suffix == ".png":
        try:
            fig.write_image(str(path))
            return path
        except Exception:  # kaleido (or a browser for it) is missing: fall back to HTML
            path = path.with_suffix(".html")
    fig.write_html(str(path), include_plotlyjs="cdn")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.needle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backends", nargs="+", help="default: every registered backend")
    parser.add_argument("--lengths", type=float, nargs="+", default=[60.0, 180.0, 600.0],
                        help="haystack lengths in seconds (ignored with --video)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--video", help="draw the needle into this video instead of a generated haystack")
    parser.add_argument("--color", choices=list(PALETTE), help="one colour everywhere (default: rotating)")
    parser.add_argument("--needle-s", type=float, default=3.0, help="seconds the needle is on screen")
    parser.add_argument("--sample-fps", type=float, default=1.0, help="engine sampling rate (default 1)")
    parser.add_argument("--max-frames", type=int, default=64, help="engine frame cap (default 64)")
    parser.add_argument("--video-fps", type=float, default=10.0, help="frame rate of generated haystacks")
    parser.add_argument("--size", type=int, nargs=2, default=[320, 180], metavar=("W", "H"))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--in-memory", action="store_true",
                        help="build the frames in memory at --sample-fps (no video file, no PyAV)")
    parser.add_argument("--figure", help="also draw a heatmap here (.html, or .png with kaleido)")
    parser.add_argument("--out", help="JSON path (default bench/results/needle-<cpu|cuda>-<preset>.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from backends.registry import list_backends
    from engine.api import Engine

    args = build_parser().parse_args(argv)
    if args.video and args.in_memory:
        raise SystemExit("--video and --in-memory exclude each other")
    engine = Engine.from_preset(args.preset, device=args.device)
    backends = args.backends or list_backends()
    lengths = [0.0] if args.video else args.lengths
    cells = grid_needles(lengths, args.depths, args.color, args.needle_s)
    with tempfile.TemporaryDirectory(prefix="frame-arena-needle-") as workdir:
        args.workdir = workdir
        rows = run_grid(engine, backends, cells, args)
    payload = {
        "schema": SCHEMA,
        "environment": environment(engine.device),
        "config": {"preset": args.preset, "random_weights": engine.loaded.random_weights, "backends": backends,
                   "lengths_s": lengths, "depths": args.depths, "video": args.video, "needle_s": args.needle_s,
                   "sampling": {"fps": args.sample_fps, "max_frames": args.max_frames},
                   "video_fps": args.video_fps, "size": args.size, "in_memory": args.in_memory,
                   "question": QUESTION, "new_tokens": args.new_tokens},
        "rows": rows,
    }
    out = Path(args.out) if args.out else RESULTS_DIR / f"needle-{engine.device.type}-{args.preset}.json"
    write_json(out, payload)
    if args.figure:
        figure = write_figure(rows, Path(args.figure))
        print(f"figure: {figure}" if figure else "figure skipped: plotly is not installed", file=sys.stderr)
    note = " (random weights: answers are noise, attention is still measured)" if engine.loaded.random_weights else ""
    print(f"{payload['environment']['device']} · preset {args.preset}{note} · cell: ✓/✗ answer, "
          "% of frame attention on the needle's frames, rank of the best needle frame (1 = most attended)")
    print(grid_table(rows))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
