"""`python -m engine` end to end on a generated video with the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

from tests.videos import make_video

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_backends_lists_the_registry():
    out = run_cli("backends")
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].startswith("uniform")


def test_ask_prints_answer_and_table_and_writes_json(tmp_path):
    video = make_video(tmp_path / "clip.mp4", num_frames=24, fps=8)
    report = tmp_path / "run.json"
    out = run_cli("ask", str(video), "What is shown?", "--backend", "uniform", "--preset", "tiny",
                  "--max-frames", "6", "--max-new-tokens", "3", "--json", str(report))
    assert out.returncode == 0, out.stderr
    assert "[uniform]" in out.stdout and "prefill" in out.stdout and "random weights" in out.stdout
    payload = json.loads(report.read_text())
    (answer,) = payload["answers"]
    assert answer["num_frames"] == 6
    assert answer["num_visual_tokens"] == 6 * 196 + 1
    assert len(answer["frame_attention"]) == len(answer["timestamps"]) == 6
    assert [s["name"] for s in answer["stages"]] == ["decode", "encode", "compress", "prefill", "generate"]


def test_a_non_video_gets_a_clear_message_and_exit_code_2(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("these are my notes, not a video")
    out = run_cli("ask", str(fake), "What?", "--preset", "tiny")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: This file is not a video")
    assert "Traceback" not in out.stderr
