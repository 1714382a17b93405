"""Sampling N frames from long videos, in frames per second: decord, PyAV (decoding straight through, and seeking to
each keyframe), torchcodec (only when it imports and opens the file), and the engine's own path
(`engine.video.load_clip`: packet index, PTS sampling, a child process with a time limit), against the best of them.

Every decoder gets the same frames (the engine's sampling: N moments spread uniformly over the video, each
mapped to the frame on screen) at the same output size as the engine (longer side ≤ 448; torchcodec, which has no
resize here, decodes at full size and is labelled so). The videos are generated into a temporary folder that is
removed at the end: `--minutes` long, 16:9 at each `--resolutions` height, `--fps` frames per second (10 by
default: a 10-minute 720p video then takes about a minute to write on two cores), libx264 ultrafast, a keyframe
every `--gop-s` seconds.

    python -m bench.decode                                   # 10 min at 720p and 360p, 64 … 4096 frames
    python -m bench.decode --minutes 2 --counts 64 256 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, environment, format_table, median, write_json

DEFAULT_COUNTS = (64, 128, 256, 512, 1024, 2048, 4096)
ENGINE_MAX_SIDE = 448
SCHEMA = "frame-arena/bench-decode/1"
# The engine picks frames by PTS like this too; a rate above any real video's means "as many as max_frames".
EVERY_FRAME_FPS = 1000.0


@dataclass(frozen=True)
class Video:
    path: str
    label: str
    width: int
    height: int
    fps: float
    num_frames: int
    size_bytes: int
    generate_s: float | None = None


@dataclass
class Result:
    video: str
    decoder: str
    count: int
    status: str = "ok"  # ok | skipped | error
    error: str | None = None
    frames: int = 0
    seconds: float | None = None
    samples: list[float] = field(default_factory=list)
    frames_per_s: float | None = None
    output: str | None = None


def sampled_indices(num_frames: int, fps: float, count: int) -> np.ndarray:
    """The frame indices the engine samples for `count` frames of a constant-rate video (its own functions)."""
    from engine.sampling import frames_at, sample_times
    from engine.types import Sampling

    times = sample_times(num_frames / fps, Sampling(fps=EVERY_FRAME_FPS, max_frames=count, max_fps=EVERY_FRAME_FPS))
    return frames_at(times, np.arange(num_frames) / fps)


def engine_size(width: int, height: int) -> tuple[int, int]:
    """The engine's output size for a video: longer side ≤ 448, aspect kept (its own function)."""
    from engine.video_decoders import output_size

    return output_size(width, height, ENGINE_MAX_SIDE)


# ---------------------------------------------------------------- decoders: (video, indices) -> frames


def decode_decord(video: Video, indices: np.ndarray) -> np.ndarray:
    import decord

    width, height = engine_size(video.width, video.height)
    reader = decord.VideoReader(video.path, ctx=decord.cpu(0), width=width, height=height, num_threads=0)
    return reader.get_batch(indices.tolist()).asnumpy()


def _pyav_frame_index(frame, fps: float) -> int:
    return round(float(frame.pts * frame.time_base) * fps)


def decode_pyav(video: Video, indices: np.ndarray) -> np.ndarray:
    """Decode straight through, converting only the wanted frames (the usual way for dense sampling)."""
    import av

    width, height = engine_size(video.width, video.height)
    wanted, out = set(indices.tolist()), []
    last = int(indices[-1])
    with av.open(video.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            index = _pyav_frame_index(frame, video.fps)
            if index in wanted:
                out.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if index >= last:
                break
    return np.stack(out)


def decode_pyav_seek(video: Video, indices: np.ndarray, gop_frames: int) -> np.ndarray:
    """Seek to the keyframe before a wanted frame when it lies more than a GOP ahead, then decode forward to it."""
    import av

    width, height = engine_size(video.width, video.height)
    out = []
    with av.open(video.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames, position = None, -1
        for target in indices.tolist():
            if frames is None or target <= position or target - position > gop_frames:
                container.seek(int(target / video.fps / stream.time_base), stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:
                position = _pyav_frame_index(frame, video.fps)
                if position >= target:
                    out.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                    break
    return np.stack(out)


def decode_torchcodec(video: Video, indices: np.ndarray) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    batch = VideoDecoder(video.path).get_frames_at(indices=indices.tolist())
    return batch.data.permute(0, 2, 3, 1).numpy()


def decode_engine(video: Video, indices: np.ndarray, decoders: tuple[str, ...] = ("decord", "pyav")) -> np.ndarray:
    """The app's path: `engine.video.load_clip` with the engine's own sampling for len(indices) frames."""
    from engine.types import Sampling
    from engine.video import VideoLimits, load_clip

    sampling = Sampling(fps=EVERY_FRAME_FPS, max_frames=len(indices), max_fps=EVERY_FRAME_FPS)
    limits = VideoLimits(decode_timeout_s=3600.0, max_duration_s=24 * 3600.0, max_file_bytes=64 << 30)
    return load_clip(video.path, sampling, limits, decoders=decoders).frames


def unavailable(name: str, video: Video) -> str | None:
    """Why decoder `name` cannot run here, or None. torchcodec must import and open the file (FFmpeg libraries)."""
    module = {"decord": "decord", "pyav": "av", "pyav-seek": "av", "torchcodec": "torchcodec",
              "engine": "av", "engine-pyav": "av"}[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if name == "torchcodec":
        try:
            from torchcodec.decoders import VideoDecoder

            VideoDecoder(video.path)
        except Exception as err:  # a missing FFmpeg shared library surfaces as any of several errors
            return f"torchcodec does not load: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return None


def decoder_table(gop_frames: int) -> dict[str, Callable[[Video, np.ndarray], np.ndarray]]:
    return {
        "decord": decode_decord,
        "pyav": decode_pyav,
        "pyav-seek": lambda v, i: decode_pyav_seek(v, i, gop_frames),
        "torchcodec": decode_torchcodec,
        "engine": decode_engine,
        "engine-pyav": lambda v, i: decode_engine(v, i, ("pyav",)),
    }


RAW_DECODERS = ("decord", "pyav", "pyav-seek", "torchcodec")
ENGINE_DECODERS = ("engine", "engine-pyav")


# ---------------------------------------------------------------- running


def probe_video(path: Path, label: str, generate_s: float | None = None) -> Video:
    """Size, rate and frame count of a constant-rate video, from its stream header and a packet count."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        count = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        return Video(str(path), label, stream.codec_context.width, stream.codec_context.height, fps, count,
                     path.stat().st_size, generate_s)


def generate(folder: Path, minutes: float, height: int, fps: float, gop_s: float) -> Video:
    from bench.videos import write_pattern_video

    width = round(height * 16 / 9 / 2) * 2
    start = time.perf_counter()
    path = write_pattern_video(folder / f"pattern-{height}p.mp4", minutes * 60, fps, width, height, gop_s)
    return probe_video(path, f"{height}p", time.perf_counter() - start)


def measure(video: Video, name: str, fn, count: int, repeats: int) -> Result:
    result = Result(video.label, name, count)
    if count > video.num_frames:
        result.status, result.error = "skipped", f"the video has {video.num_frames} frames"
        return result
    indices = sampled_indices(video.num_frames, video.fps, count)
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            frames = fn(video, indices)
            result.samples.append(time.perf_counter() - start)
    except Exception as err:  # a decoder failing on a file is a result, the others still run
        result.status, result.error = "error", f"{type(err).__name__}: {str(err)[:300]}"
        return result
    if len(frames) != len(indices):
        result.status, result.error = "error", f"returned {len(frames)} frames, wanted {len(indices)}"
    result.frames, result.output = len(frames), "×".join(map(str, frames.shape[1:3][::-1]))
    result.seconds = median(result.samples)
    result.frames_per_s = result.frames / result.seconds
    return result


def warm_page_cache(path: str) -> None:
    """Read the file once, so the first decoder does not pay for the disk and the others not."""
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def comparisons(results: list[Result]) -> list[dict[str, Any]]:
    """Per video and count: the fastest raw decoder against the engine's path (frames/s ratio)."""
    rows = []
    for video, count in sorted({(r.video, r.count) for r in results}, key=lambda k: (k[0], k[1])):
        ok = {r.decoder: r for r in results if (r.video, r.count) == (video, count) and r.status == "ok"}
        raw = [ok[d] for d in RAW_DECODERS if d in ok]
        if not raw or "engine" not in ok:
            continue
        best = max(raw, key=lambda r: r.frames_per_s)
        rows.append({"video": video, "count": count, "best_decoder": best.decoder, "best_fps": best.frames_per_s,
                     "engine_fps": ok["engine"].frames_per_s,
                     "engine_vs_best": ok["engine"].frames_per_s / best.frames_per_s})
    return rows


def table(results: list[Result], compared: list[dict[str, Any]], counts: list[int]) -> str:
    headers = ["video", "decoder"] + [f"{c} fr/s" for c in counts]
    rows = []
    for video in dict.fromkeys(r.video for r in results):
        for decoder in dict.fromkeys(r.decoder for r in results if r.video == video):
            by_count = {r.count: r for r in results if (r.video, r.decoder) == (video, decoder)}
            cells = []
            for c in counts:
                r = by_count.get(c)
                cells.append(None if r is None or r.status == "skipped" else
                             r.status if r.status != "ok" else f"{r.frames_per_s:.0f}")
            rows.append([video, decoder] + cells)
        by_count = {row["count"]: row for row in compared if row["video"] == video}
        rows.append([video, "engine/best"] + [
            f"×{by_count[c]['engine_vs_best']:.2f} ({by_count[c]['best_decoder']})" if c in by_count else None
            for c in counts])
    return format_table(headers, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each generated video (default 10)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[720, 360], help="heights, 16:9")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the generated videos (default 10)")
    parser.add_argument("--gop-s", type=float, default=5.0, help="seconds between keyframes (default 5)")
    parser.add_argument("--video", nargs="+", help="existing constant-rate video files instead of generated ones")
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS))
    parser.add_argument("--decoders", nargs="+", choices=[*RAW_DECODERS, *ENGINE_DECODERS],
                        default=[*RAW_DECODERS, *ENGINE_DECODERS])
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell, median reported (default 3)")
    parser.add_argument("--keep", metavar="DIR", help="write the generated videos here and keep them")
    parser.add_argument("--out", default=str(RESULTS_DIR / "decode-cpu.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="frame-arena-bench-decode-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if args.video:
            videos = [probe_video(Path(p), Path(p).name) for p in args.video]
        else:
            videos = []
            for height in args.resolutions:
                videos.append(generate(folder, args.minutes, height, args.fps, args.gop_s))
                print(f"generated {videos[-1].label}: {videos[-1].num_frames} frames, "
                      f"{videos[-1].size_bytes / 2**20:.1f} MiB in {videos[-1].generate_s:.1f}s", file=sys.stderr)
        results: list[Result] = []
        not_run: dict[str, str] = {}
        for video in videos:
            warm_page_cache(video.path)
            table_fns = decoder_table(max(1, round(args.gop_s * video.fps)))
            for name in args.decoders:
                reason = unavailable(name, video)
                if reason:
                    not_run[name] = reason
                for count in sorted(args.counts):
                    if reason:
                        results.append(Result(video.label, name, count, status="skipped", error=reason))
                        continue
                    results.append(measure(video, name, table_fns[name], count, args.repeats))
                    r = results[-1]
                    print(f"[{video.label} {name} {count}] {r.status} "
                          f"{'' if r.frames_per_s is None else f'{r.frames_per_s:.0f} fr/s'} {r.error or ''}",
                          file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    compared = comparisons(results)
    payload = {
        "schema": SCHEMA,
        "environment": environment("cpu"),
        "config": {"minutes": args.minutes, "resolutions": args.resolutions, "fps": args.fps, "gop_s": args.gop_s,
                   "counts": sorted(args.counts), "decoders": args.decoders, "repeats": args.repeats,
                   "output_size": f"longer side ≤ {ENGINE_MAX_SIDE} (torchcodec: full size)",
                   "generated": not args.video},
        "videos": [asdict(v) | {"path": Path(v.path).name} for v in videos],
        "results": [asdict(r) for r in results],
        "comparisons": compared,
    }
    write_json(args.out, payload)
    print(f"{payload['environment']['device']} · median of {args.repeats} · frames per second (higher is better)")
    if not_run:
        print("not run: " + "; ".join(f"{name}: {reason}" for name, reason in not_run.items()))
    print(table(results, compared, sorted(args.counts)))
    print(f"\nwritten: {args.out}")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
