"""The whole pipeline per frame count, backend and attention implementation, against plain transformers.

For each frame count T (batch 1):
* frames: T random uint8 frames at the model's input size (decoding excluded), or with `--decode` T frames
  sampled from a video file by the engine's decoder (the decode stage then counts for every row);
* naive: plain `LlavaOnevisionForConditionalGeneration` on the same loaded weights — one forward with
  `pixel_values_videos` of all T frames (vision tower included), then greedy decoding over its DynamicCache;
* engine: `Engine.encode` once (shared by every backend, as in the app), then per backend `Engine.answer`:
  compress → prefill → first logits → greedy decoding.
Every figure is the median of `--repeats` runs after `--warmup` unrecorded runs, and also appears as a ratio to
the naive row of the same frame count and attention. An out-of-memory error marks that cell "oom" and the run
goes on. `--check-targets` evaluates issue 8's targets on the results (or on saved files with `--from-json`).

    python -m bench.pipeline --preset tiny                       # CPU, a few minutes
    python -m bench.pipeline --preset random-7b --dtype bf16 --check-targets    # one GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    RESULTS_DIR,
    environment,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    format_table,
    read_json,
    repeat,
    write_json,
)
from bench.records import NAIVE, Cell, StageStat, arena_rows, check_targets, summarise, targets_text, to_records
from engine.oom import free_device_memory, is_out_of_memory

FULL_FRAMES = (256, 512, 1024, 2048, 4096, 8192, 10000)
# The tiny preset's uniform row is 196 tokens per frame, prefilled on the CPU at ~2,000 tokens/s at 128 frames;
# these counts keep a full run (naive + every backend, 1 warm-up + 3 repeats) to about 3 minutes on two idle cores.
TINY_FRAMES = (8, 32, 128)
QUESTION = "What happens in this video? Describe it in detail."
SYNTHETIC_FPS = 1.0
SCHEMA = "frame-arena/bench-pipeline/1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Options:
    frames: tuple[int, ...]
    backends: tuple[str, ...]
    attention: tuple[str, ...]
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 16
    question: str = QUESTION
    video: str | None = None
    naive: bool = True
    cell_budget_s: float | None = None
    retry_oom: bool = False


# ---------------------------------------------------------------- measuring


def synthetic_clip(num_frames: int, size: int, seed: int = 0):
    """T random uint8 frames at the model's input size (so preprocessing does no resize), 1 s apart."""
    from engine.types import Clip, Sampling, VideoMeta

    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, size, size, 3), dtype=np.uint8)
    meta = VideoMeta("synthetic", num_frames / SYNTHETIC_FPS, SYNTHETIC_FPS, num_frames, size, size, 0, "synthetic")
    stamps = np.arange(num_frames) / SYNTHETIC_FPS
    return Clip(frames, stamps, np.arange(num_frames), meta, f"bench-synthetic-{num_frames}-{seed}",
                Sampling(fps=SYNTHETIC_FPS, max_frames=num_frames))


def available_attention(device: torch.device) -> tuple[str, ...]:
    """SDPA always; flash-attn 2 where it is importable on a CUDA device."""
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return ("sdpa", "flash_attention_2") if flash else ("sdpa",)


@contextmanager
def engine_attention(name: str) -> Iterator[None]:
    """The engine uses flash-attn whenever it imports; for the "sdpa" rows it is hidden for the block."""
    import engine.attention as arena

    saved = arena.flash_attn_func
    if name == "flash_attention_2" and saved is None:
        raise RuntimeError("flash-attn is not importable")
    if name == "sdpa":
        arena.flash_attn_func = None
    try:
        yield
    finally:
        arena.flash_attn_func = saved


@contextmanager
def hf_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Plain transformers attention (`name`) for the language model during the block; the engine's routing after."""
    config = model.model.language_model.config
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


class StageSplitter:
    """Consecutive `engine.probes.stage`s whose boundaries fall inside a forward call (a hook moves to the next)."""

    def __init__(self, device: torch.device, sink: list) -> None:
        self.device, self.sink = device, sink
        self.current: str | None = None
        self._context = None

    def begin(self, name: str) -> None:
        from engine.probes import stage

        self.end()
        self.current, self._context = name, stage(name, self.device, self.sink)
        self._context.__enter__()

    def end(self) -> None:
        if self._context is not None:
            context, self._context, self.current = self._context, None, None
            context.__exit__(None, None, None)


def stop_ids(tokenizer) -> set[int]:
    """The token ids that end an answer, the same set the engine stops on."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
           tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    return ids - {None}


def naive_visual_tokens(grid: int, num_frames: int) -> int:
    """Visual tokens LLaVA-OneVision makes of a video: a 2×2-pooled grid per frame and one newline at the end."""
    return num_frames * ((grid + 1) // 2) ** 2 + 1


def naive_input_ids(loaded, ops, num_frames: int, question: str) -> list[int]:
    """The chat-templated prompt with one <video> token per visual token, as the processor would expand it."""
    prefix, suffix = ops.prompt_ids(question)
    return prefix + [loaded.model.config.video_token_id] * naive_visual_tokens(loaded.grid, num_frames) + suffix


def naive_pixels(loaded, frames: np.ndarray, device: torch.device, chunk: int = 64) -> torch.Tensor:
    """(1, T, 3, S, S) pixel_values_videos, preprocessed in chunks (the engine's own preprocessing) so the
    conversion does not need T float32 frames at once."""
    from engine.preprocess import preprocess_frames

    size = loaded.image_size
    out = torch.empty((1, len(frames), 3, size, size), dtype=loaded.dtype, device=device)
    for start in range(0, len(frames), chunk):
        out[0, start : start + chunk] = preprocess_frames(frames[start : start + chunk], size, loaded.image_mean,
                                                          loaded.image_std, device, loaded.dtype)
    return out


@dataclass
class NaiveRun:
    stages: list
    ids: list[int]
    prompt_tokens: int
    text: str


@torch.inference_mode()
def naive_answer(loaded, ops, clip, question: str, max_new_tokens: int, attention: str) -> NaiveRun:
    """Plain transformers: one forward over the prompt with every frame's pixels, then greedy steps on its cache.
    Stages: "encode" (pixels → merged input embeddings: preprocessing, vision tower, projector, pooling) and
    "prefill" (language model + last logits) split where the language model starts, then "generate"."""
    model = loaded.model
    device = model.get_input_embeddings().weight.device
    sink: list = []
    clock = StageSplitter(device, sink)
    hook = model.model.language_model.register_forward_pre_hook(
        lambda *_: clock.begin("prefill") if clock.current == "encode" else None)
    stops, ids = stop_ids(loaded.tokenizer), []
    try:
        with hf_attention(model, attention):
            clock.begin("encode")
            input_ids = torch.tensor([naive_input_ids(loaded, ops, clip.num_frames, question)], device=device)
            out = model(input_ids=input_ids, pixel_values_videos=naive_pixels(loaded, clip.frames, device),
                        use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[0, -1]
            del out
            clock.begin("generate")
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token in stops:
                    break
                ids.append(token)
                if len(ids) == max_new_tokens:
                    break
                step = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                             use_cache=True)
                logits = step.logits[0, -1]
            clock.end()
    finally:
        hook.remove()
        clock.end()
    text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    return NaiveRun(sink, ids, int(input_ids.shape[1]), text)


def _cuda_reserved(device: torch.device) -> int | None:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else None


def guarded(cell: Cell, measure, device: torch.device) -> Cell:
    """Run `measure(cell)`; out-of-memory → status "oom", any other failure → "error"; memory freed after."""
    try:
        measure(cell)
        cell.reserved_bytes = _cuda_reserved(device)
    except Exception as err:  # a failing cell is a result to record, the run goes on
        cell.status = "oom" if is_out_of_memory(err) else "error"
        cell.error = f"{type(err).__name__}: {str(err)[:300]}"
        cell.stages = []
    free_device_memory()
    return cell


class Benchmark:
    """One run over frame counts × attention implementations × (naive + backends) with one loaded model."""

    def __init__(self, loaded, options: Options) -> None:
        from engine.api import Engine

        self.loaded, self.options = loaded, options
        limits = None
        if options.video:
            from engine.video import VideoLimits

            limits = VideoLimits(decode_timeout_s=3600.0, max_duration_s=24 * 3600.0)
        # No feature cache: every encode run is a real encode, and features are freed as soon as a count is done.
        self.engine = Engine(loaded, cache_bytes=0, limits=limits)
        self.device = self.engine.device
        self.cells: list[Cell] = []
        self.blocked: dict[tuple[str, str], str] = {}

    def progress(self, cell: Cell) -> None:
        took = sum(s.seconds for s in cell.stages)
        print(f"[{cell.frames:>6} frames {cell.attention} {cell.backend}] {cell.status} {took:.2f}s "
              f"{cell.error or ''}", file=sys.stderr, flush=True)

    def record(self, cell: Cell, budget_hit: bool = False) -> None:
        self.cells.append(cell)
        self.progress(cell)
        key = (cell.backend, cell.attention)
        if cell.status == "oom" and not self.options.retry_oom:
            self.blocked[key] = f"skipped: out of memory at {cell.frames} frames"
        elif budget_hit:
            self.blocked[key] = f"skipped: over --cell-budget-s at {cell.frames} frames"

    def skipped(self, frames: int, attention: str, backend: str) -> Cell | None:
        reason = self.blocked.get((backend, attention))
        if reason is None:
            return None
        return Cell(frames, attention, backend, status="skipped", error=reason)

    def runs(self, fn):
        return repeat(fn, self.options.repeats, self.options.warmup, self.options.cell_budget_s)

    def over_budget(self, cell: Cell) -> bool:
        return cell.status == "ok" and cell.repeats < self.options.repeats

    def clip_for(self, frames: int) -> tuple[Any, list[StageStat]]:
        """The frames to run on, and the decode stage when they come from a video file."""
        if not self.options.video:
            return synthetic_clip(frames, self.loaded.image_size, seed=frames), []
        from engine.probes import stage
        from engine.types import Sampling

        fps = 1000.0  # "as many as the file has": max_frames caps it to `frames` spread over the whole video
        sampling = Sampling(fps=fps, max_frames=frames, max_fps=fps)

        def once():
            sink: list = []
            with stage("decode", self.device, sink):
                clip = self.engine.decode(self.options.video, sampling)
            return clip, sink

        results = self.runs(once)
        return results[-1][0], summarise([sink for _, sink in results])

    def naive_cell(self, frames: int, attention: str, clip, shared: list[StageStat]) -> None:
        cell = self.skipped(frames, attention, NAIVE)
        if cell is not None:
            return self.record(cell)

        def measure(cell: Cell) -> None:
            runs = self.runs(lambda: naive_answer(self.loaded, self.engine.ops, clip, self.options.question,
                                                  self.options.new_tokens, attention))
            last = runs[-1]
            cell.stages = shared + summarise([r.stages for r in runs])
            cell.visual_tokens = naive_visual_tokens(self.loaded.grid, clip.num_frames)
            cell.prompt_tokens, cell.new_tokens, cell.answer = last.prompt_tokens, len(last.ids), last.text
            cell.repeats = len(runs)

        cell = guarded(Cell(frames, attention, NAIVE), measure, self.device)
        self.record(cell, self.over_budget(cell))

    def encode(self, frames: int, clip) -> tuple[Any, list[StageStat], Cell | None]:
        """Features for `clip` and the encode stage; on failure a Cell saying why (shared by every backend)."""
        from engine.probes import stage

        holder: dict[str, Any] = {}

        def once():
            holder.pop("features", None)
            sink: list = []
            with stage("encode", self.device, sink):
                holder["features"] = self.engine.encode(clip)
            return sink

        failed = Cell(frames, "-", "encode")
        stats: list[StageStat] = []

        def measure(cell: Cell) -> None:
            stats.extend(summarise(self.runs(once)))

        guarded(failed, measure, self.device)
        if failed.status != "ok":
            holder.clear()
            free_device_memory()
            return None, [], failed
        return holder["features"], stats, None

    def backend_cell(self, frames: int, attention: str, backend: str, clip, features,
                     shared: list[StageStat]) -> None:
        from engine.api import Prepared

        cell = self.skipped(frames, attention, backend)
        if cell is not None:
            return self.record(cell)

        def measure(cell: Cell) -> None:
            prepared = Prepared(clip, features, [])
            with engine_attention(attention):
                answers = self.runs(lambda: self.engine.answer(prepared, backend, self.options.question,
                                                               max_new_tokens=self.options.new_tokens))
            last = answers[-1]
            cell.stages = shared + summarise([a.stages for a in answers])
            cell.visual_tokens, cell.prompt_tokens = last.num_visual_tokens, last.prompt_tokens
            cell.new_tokens, cell.answer, cell.repeats = last.new_tokens, last.text, len(answers)

        cell = guarded(Cell(frames, attention, backend), measure, self.device)
        self.record(cell, self.over_budget(cell))

    def run(self) -> list[Cell]:
        opts = self.options
        for frames in sorted(opts.frames):
            clip, decode_stats = self.clip_for(frames)
            if opts.naive:
                # Before the engine's features exist, so the naive run's memory is its own.
                for attention in opts.attention:
                    self.naive_cell(frames, attention, clip, decode_stats)
            features, encode_stats, failed = self.encode(frames, clip)
            shared = decode_stats + encode_stats
            for attention in opts.attention:
                for backend in opts.backends:
                    if failed is not None:
                        self.record(Cell(frames, attention, backend, status=failed.status,
                                         error=f"encode: {failed.error}"))
                    else:
                        self.backend_cell(frames, attention, backend, clip, features, shared)
            del features, clip
            free_device_memory()
        return self.cells


# ---------------------------------------------------------------- output


def results_table(records: list[dict[str, Any]]) -> str:
    headers = ["frames", "attn", "backend", "status", "vis tok", "encode s", "compress s", "prefill s", "TTFT s",
               "to 1st tok s", "×naive", "decode tok/s", "×naive", "peak mem", "×naive"]
    rows = []
    for r in records:
        f, v = r["figures"], r["vs_naive"]
        seconds = {s["name"]: s["seconds"] for s in r["stages"]}
        rows.append([
            r["frames"], r["attention"], r["backend"], r["status"], f["visual_tokens"] or r["visual_tokens"],
            fmt_seconds(seconds.get("encode")), fmt_seconds(seconds.get("compress")),
            fmt_seconds(seconds.get("prefill")), fmt_seconds(f["ttft_s"]),
            fmt_seconds(f["to_first_token_s"]), fmt_ratio(v.get("to_first_token_s")),
            None if f["decode_tokens_per_s"] is None else f"{f['decode_tokens_per_s']:.1f}",
            fmt_ratio(v.get("decode_tokens_per_s")), fmt_bytes(f["peak_bytes"]), fmt_ratio(v.get("peak_bytes")),
        ])
    return format_table(headers, rows)


def arena_table(rows: list[dict[str, Any]]) -> str:
    headers = ["frames", "attn", "shared s", "alone s (each)", "together s", "×mean alone", "×slowest alone"]
    return format_table(headers, [
        [r["frames"], r["attention"], fmt_seconds(r["shared_s"]), " / ".join(fmt_seconds(a) for a in r["alone_s"]),
         fmt_seconds(r["together_s"]), fmt_ratio(r["vs_mean_alone"]), fmt_ratio(r["vs_slowest_alone"])]
        for r in rows
    ])


def model_shape(loaded) -> dict[str, Any]:
    cfg = loaded.model.config
    return {
        "llm_hidden": cfg.text_config.hidden_size, "llm_layers": cfg.text_config.num_hidden_layers,
        "vision_hidden": cfg.vision_config.hidden_size, "vision_layers": cfg.vision_config.num_hidden_layers,
        "grid": loaded.grid, "image_size": loaded.image_size, "random_weights": loaded.random_weights,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
    }


def build_payload(loaded, options: Options, cells: list[Cell], preset: str, dtype: str) -> dict[str, Any]:
    records = to_records(cells)
    return {
        "schema": SCHEMA,
        "environment": environment(loaded.device),
        "config": {
            "preset": preset, "dtype": dtype, "device": str(loaded.device), "attention": list(options.attention),
            "frames": list(options.frames), "backends": list(options.backends), "repeats": options.repeats,
            "warmup": options.warmup, "new_tokens": options.new_tokens, "question": options.question,
            "video": options.video, "naive": options.naive, "cell_budget_s": options.cell_budget_s,
            "frames_source": "video file (decode included)" if options.video else
            f"random uint8 frames at {loaded.image_size}×{loaded.image_size} (decode excluded)",
            "model": model_shape(loaded),
            "memory_note": "cuda_peak: torch.cuda.max_memory_allocated during the stage (weights included); "
                           "cpu_rss: process RSS at the stage's end",
        },
        "cells": records,
        "arena": arena_rows(records),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def load(preset: str, device: str | None, dtype: str) -> Any:
    """The preset through the engine's loader, cast to `dtype` unless "auto" (bf16 on CUDA, fp32 on CPU)."""
    from engine.loading import load_model

    loaded = load_model(preset, device=device)
    if dtype != "auto" and DTYPES[dtype] != loaded.dtype:
        loaded.model.to(DTYPES[dtype])
        for module in loaded.extra_modules.values():
            module.to(DTYPES[dtype])
        loaded.dtype = DTYPES[dtype]
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="engine preset or checkpoint directory (default tiny)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--frames", type=int, nargs="+",
                        help=f"frame counts (default {' '.join(map(str, FULL_FRAMES))}; "
                             f"tiny: {' '.join(map(str, TINY_FRAMES))})")
    parser.add_argument("--backends", nargs="+", help="default: every registered backend")
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "flash_attention_2"],
                        help="default: sdpa, plus flash_attention_2 when flash-attn imports on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="recorded runs per cell (median); default 3")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded runs first; default 1")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to generate; default 16")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--decode", action="store_true", help="include decoding: sample the frames from --video")
    parser.add_argument("--video", help="video file for --decode (needs PyAV; decord optional)")
    parser.add_argument("--no-naive", action="store_true", help="skip the plain-transformers baseline")
    parser.add_argument("--cell-budget-s", type=float, default=None,
                        help="a run slower than this ends its cell (that run is recorded) and skips the backend's "
                             "larger frame counts (keeps a GPU session inside its time limit)")
    parser.add_argument("--retry-oom", action="store_true",
                        help="keep trying larger frame counts after a backend ran out of memory")
    parser.add_argument("--check-targets", action="store_true", help="evaluate issue 8's targets (a)–(d)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="no run: print the tables and targets of saved result files")
    parser.add_argument("--out", help="JSON path (default bench/results/pipeline-<cpu|cuda>-<preset>.json)")
    return parser


def report(payloads: list[dict[str, Any]], check: bool) -> str:
    parts = []
    if check:
        parts += ["Targets (issue 8):", targets_text(check_targets(payloads)), ""]
    for p in payloads:
        cfg = p["config"]
        parts.append(f"{p['environment']['device']} · torch {p['environment']['torch']} · transformers "
                     f"{p['environment']['transformers']} · preset {cfg['preset']} · {cfg['dtype']} · "
                     f"median of {cfg['repeats']} after {cfg['warmup']} warm-up · {cfg['frames_source']}")
        if p["arena"]:
            parts += ["", "Three backends on one upload (shared decode/encode once):", arena_table(p["arena"])]
        parts += ["", results_table(p["cells"])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        payloads = [read_json(path) for path in args.from_json]
        print(report(payloads, args.check_targets))
        return 0
    if args.decode and not args.video:
        raise SystemExit("--decode needs --video PATH (e.g. one written by `python -m bench.decode --keep`)")
    from backends.registry import list_backends

    loaded = load(args.preset, args.device, args.dtype)
    options = Options(
        frames=tuple(args.frames or (TINY_FRAMES if args.preset == "tiny" else FULL_FRAMES)),
        backends=tuple(args.backends or list_backends()),
        attention=tuple(args.attention or available_attention(loaded.device)),
        repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens, question=args.question,
        video=args.video if args.decode else None, naive=not args.no_naive, cell_budget_s=args.cell_budget_s,
        retry_oom=args.retry_oom,
    )
    cells = Benchmark(loaded, options).run()
    payload = build_payload(loaded, options, cells, args.preset, dtype_name(loaded.dtype))
    if args.check_targets:
        payload["targets"] = [asdict(t) for t in check_targets([payload])]
    out = Path(args.out) if args.out else RESULTS_DIR / f"pipeline-{loaded.device.type}-{args.preset}.json"
    write_json(out, payload)
    print(report([payload], args.check_targets))
    print(f"\nwritten: {out}")
    return 1 if any(c.status == "error" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
