"""`python -m engine ask VIDEO QUESTION …` and `python -m engine backends`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backends.registry import get_backend, list_backends
from engine.errors import UserFacingError
from engine.presets import DEFAULT_PRESET, PRESETS
from engine.types import Sampling


def _parse_params(pairs: list[str]) -> dict[str, dict[str, object]]:
    """`backend.name=value` pairs → {backend: {name: value}} with values parsed as JSON when possible."""
    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        backend, _, name = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(backend, {})[name] = value
    return out


def _cmd_backends(_: argparse.Namespace) -> int:
    for name in list_backends():
        backend = get_backend(name)
        print(f"{name:<10} {backend.label} — {backend.description}")
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from engine.api import Engine
    from engine.report import answer_to_dict, stage_table

    engine = Engine.from_preset(args.preset, device=args.device)
    sampling = Sampling(fps=args.fps, max_frames=args.max_frames)
    prepared = engine.prepare(args.video, sampling)
    answers = []
    for name in args.backend:
        answer = engine.answer(prepared, name, args.question, _parse_params(args.param).get(name),
                               args.max_new_tokens)
        answers.append(answer)
        print(f"[{name}] {answer.text}")
    print()
    print(stage_table(answers))
    if engine.loaded.random_weights:
        print(f"\nnote: preset '{args.preset}' has random weights; the answers are meaningless.")
    if args.json:
        payload = {
            "video": str(args.video), "question": args.question, "preset": args.preset,
            "sampling": {"fps": sampling.fps, "max_frames": sampling.max_frames},
            "answers": [answer_to_dict(a, prepared.clip.timestamps) for a in answers],
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Frame Arena engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list registered backends").set_defaults(run=_cmd_backends)
    ask = sub.add_parser("ask", help="answer a question about a video")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--backend", action="append", help="repeatable; default: uniform")
    ask.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {', '.join(PRESETS)} or a directory")
    ask.add_argument("--device", default=None)
    ask.add_argument("--fps", type=float, default=1.0)
    ask.add_argument("--max-frames", type=int, default=64)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--param", action="append", default=[], help="backend.name=value, repeatable")
    ask.add_argument("--json", help="write the whole run as JSON here")
    ask.set_defaults(run=_cmd_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", None) is None and args.command == "ask":
        args.backend = ["uniform"]
    try:
        return args.run(args)
    except UserFacingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
