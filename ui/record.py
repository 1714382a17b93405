"""A run as one JSON document (what `/ask` returns and "Export JSON" downloads), and back."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from backends.registry import get_backend
from engine.report import answer_to_dict
from engine.types import Answer, StageProbe
from ui.run import RunRequest, RunResult
from ui.summary import uniform_tokens

FORMAT = "frame-arena-run/1"
EXPORT_DIR = Path(tempfile.gettempdir()) / "frame-arena-exports"
EXPORT_MAX_AGE_S = 3600.0


def _stages(stages: list[StageProbe]) -> list[dict[str, Any]]:
    return [asdict(s) for s in stages]


def build_record(request: RunRequest, result: RunResult, preset: str, random_weights: bool) -> dict[str, Any]:
    """Inputs, the video as sampled, every backend's resolved parameters, answers, attention, marks and stages."""
    video = result.video
    sampling = result.retry_sampling or request.sampling
    timestamps = video.timestamps if video is not None else None
    answers = []
    for name in request.backends:
        if name in result.answers:
            answer = result.answers[name]
            entry = answer_to_dict(answer, timestamps)
            entry["label"] = get_backend(name).label
            entry["uniform_tokens"] = uniform_tokens(answer.num_frames, video.grid) if video else None
            answers.append(entry)
    return {
        "format": FORMAT,
        "preset": preset,
        "random_weights": random_weights,
        "question": request.question,
        "video": None if video is None else {
            "name": video.meta.path_name, "duration_s": video.meta.duration_s, "avg_fps": video.meta.avg_fps,
            "width": video.meta.width, "height": video.meta.height, "decoder": video.meta.decoder,
            "grid": video.grid, "sampled_frames": len(video.timestamps),
            "timestamps": np.asarray(video.timestamps).tolist(),
            "stages": _stages(video.stages),
        },
        "sampling": {"fps": sampling.fps, "max_frames": sampling.max_frames},
        "max_new_tokens": request.max_new_tokens,
        "params": {name: asdict(get_backend(name).make_params(request.params.get(name))) for name in request.backends},
        "answers": answers,
        "notices": list(result.notices),
    }


def answer_from_dict(entry: dict[str, Any]) -> Answer:
    """The Answer an exported entry was written from (arrays as numpy, stages as StageProbe)."""
    return Answer(
        text=entry["text"], backend=entry["backend"],
        frame_attention=np.asarray(entry["frame_attention"], dtype=np.float32),
        token_attention=np.asarray(entry.get("token_attention", []), dtype=np.float32),
        stages=[StageProbe(**s) for s in entry["stages"]],
        num_frames=entry["num_frames"], num_visual_tokens=entry["num_visual_tokens"],
        prompt_tokens=entry["prompt_tokens"], new_tokens=entry["new_tokens"],
        frame_marks={k: np.asarray(v, dtype=np.float64) for k, v in entry["frame_marks"].items()},
        notes=list(entry["notes"]), extras=dict(entry["extras"]),
    )


def load_record(path: str | Path) -> dict[str, Any]:
    """Read an exported run; ValueError if the file is not one."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a Frame Arena run ({FORMAT})")
    return record


def write_export(record: dict[str, Any], directory: Path = EXPORT_DIR) -> Path:
    """Write `record` to a fresh JSON file for download; exports older than an hour are removed on the way."""
    directory.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - EXPORT_MAX_AGE_S
    for old in directory.glob("frame-arena-*.json"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
        except FileNotFoundError:  # another worker pruned it first
            pass
    path = directory / f"frame-arena-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(record, indent=1))
    return path
