"""A decoder for app tests (FRAME_ARENA_DECODERS) whose fault is picked by the uploaded file's name, so one running
server meets a hanging and a crashing decoder and still answers the next, ordinary request."""

from __future__ import annotations

from pathlib import Path

from engine.video_decoders import DecodeJob, decode_pyav
from tests import videos


def by_file_name(job: DecodeJob) -> dict:
    """Hang for a file named hang*, segfault for segfault*, otherwise decode with PyAV."""
    name = Path(job.path).name
    if name.startswith("hang"):
        return videos.hanging_decoder(job)
    if name.startswith("segfault"):
        return videos.segfaulting_decoder(job)
    return decode_pyav(job)
