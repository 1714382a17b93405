"""Bad video files and decoder faults, fed to the engine and to the running app: each ends in a clear message within
seconds, before any pixel decoder runs; the server stays up and answers the next request; no temp file is left.

Every bad file is uploaded under a name starting with "hang": the app's decoder (tests.fault_decoders) hangs on such
a name, so a refusal that arrives quickly with the expected message proves that no pixel decoder was reached.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from engine.errors import VideoError
from engine.types import Sampling
from engine.video import VideoLimits, decoders_from_env, load_clip
from tests import videos
from tests.app_server import running_app

pytestmark = pytest.mark.timeout(300)

FAULTY = "tests.fault_decoders:by_file_name"
TIMEOUT_S = 4.0
MAX_DURATION_S = 3600.0
# A refusal from the header or the packet index: well under the decode time limit (the worker starts in ~0.5 s).
QUICK_S = 3.0
VFR_TIMES = [0.0, 0.1, 0.15, 0.5, 1.0, 1.02, 2.0, 2.5, 2.51, 4.0]
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="30"/></svg>\n'


def cut_inside_first_frame(src: Path, dst: Path) -> Path:
    """A faststart MP4 cut 200 bytes into its media data: the index is whole, the first frame is not."""
    data = src.read_bytes()
    mdat = next(start for kind, start, _ in videos._top_level_boxes(data) if kind == b"mdat")
    dst.write_bytes(data[: mdat + 8 + 200])
    return dst


def lying_frame_count(dst: Path, frames: int = 20, claimed: int = 5000) -> Path:
    """A complete AVI whose main and stream headers claim `claimed` frames."""
    with av.open(str(dst), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(videos.draw_index(i, 160, 96), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = bytearray(dst.read_bytes())
    # avih: dwTotalFrames is its 5th field; strh: dwLength its 9th (after the fourcc fields and 7 others).
    for box, offset in ((b"avih", 16), (b"strh", 32)):
        at = data.find(box) + 8 + offset
        assert int.from_bytes(data[at : at + 4], "little") == frames
        data[at : at + 4] = claimed.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def huge_resolution(dst: Path, side: int = 8000) -> Path:
    """One black side×side H.264 frame: a small file whose header announces 64 megapixels."""
    with av.open(str(dst), "w") as container:
        stream = container.add_stream("libx264", rate=1, options={"preset": "ultrafast"})
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), format="rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = videos.make_video(d / "good.mp4", 20, 10)
    faststart = videos.make_video(d / "faststart.mp4", 30, 10, faststart=True)
    (d / "empty.mp4").write_bytes(b"")
    (d / "svg.mp4").write_bytes(SVG)
    return {
        "good": good,
        "vfr_rotated": videos.make_video(d / "vfr_rotated.mp4", len(VFR_TIMES), 10, size=(96, 160), rotation=90,
                                         vfr_times=VFR_TIMES),
        "empty": d / "empty.mp4",
        "text": videos.make_fake_video(d / "text.mp4", "text"),
        "html": videos.make_fake_video(d / "html.mp4", "html"),
        "svg": d / "svg.mp4",
        "pdf": videos.make_fake_video(d / "pdf.mp4", "pdf"),
        "cut_in_first_frame": cut_inside_first_frame(faststart, d / "cut_first.mp4"),
        "cut_mid_file": videos.make_truncated(good, d / "cut_mid.mp4"),
        "no_moov": videos.make_no_moov(faststart, d / "no_moov.mp4"),
        "audio_only": videos.make_audio_only(d / "audio.mp4"),
        "lying_frame_count": lying_frame_count(d / "lying.avi"),
        "huge_resolution": huge_resolution(d / "huge.mp4"),
        # 9 frames 15 minutes apart: a 2-hour video of a few kilobytes.
        "long_duration": videos.make_video(d / "long.mp4", 9, 1, size=(64, 48),
                                           vfr_times=[i * 900.0 for i in range(9)]),
    }


BAD = {
    "empty": "is empty (0 bytes)",
    "text": "not a video: it is a text file",
    "html": "not a video: it is an HTML page",
    "svg": "not a video: it is an SVG image",
    "pdf": "not a video: it is a PDF document",
    "cut_in_first_frame": "The video is truncated: its header lists 30 frames but only 1 is in the file.",
    "cut_mid_file": "'moov' atom) is missing",
    "no_moov": "'moov' atom) is missing",
    "audio_only": "only audio, no video stream",
    "lying_frame_count": "its header lists 5000 frames but only 20 are in the file",
    "huge_resolution": "The video is 8000×8000, above the 8,847,360 pixel limit",
    "long_duration": "The video is 2 h 00 min long, over the 1 h 00 min limit",
}


def as_hang(path: Path, tmp_path: Path) -> Path:
    """A copy of `path` named so that the app's test decoder would hang on it."""
    target = tmp_path / f"hang_{path.name}"
    shutil.copy(path, target)
    return target


# --- the engine ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD))
def test_engine_refuses_bad_file_before_decoding_pixels(files, name):
    limits = VideoLimits(max_duration_s=MAX_DURATION_S, decode_timeout_s=TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(VideoError, match=re.escape(BAD[name])):
        load_clip(files[name], Sampling(max_frames=4), limits, decoders=("tests.videos:hanging_decoder",))
    assert time.monotonic() - start < QUICK_S


def test_decoders_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("FRAME_ARENA_DECODERS", raising=False)
    assert decoders_from_env() == ("decord", "pyav")
    monkeypatch.setenv("FRAME_ARENA_DECODERS", f" {FAULTY}, pyav ")
    assert decoders_from_env() == (FAULTY, "pyav")
    monkeypatch.setenv("FRAME_ARENA_DECODERS", "ffmpeg-magic")
    with pytest.raises(ValueError, match="unknown decoder 'ffmpeg-magic'"):
        decoders_from_env()


def test_engine_vfr_rotated_clip_is_upright_with_pts_timestamps(files):
    clip = load_clip(files["vfr_rotated"], Sampling(fps=2.0, max_frames=64, max_fps=2.0))
    assert clip.frames.shape[1:] == (160, 96, 3)
    assert [videos.read_index(f) for f in clip.frames] == clip.frame_indices.tolist()
    np.testing.assert_allclose(clip.timestamps, np.array(VFR_TIMES)[clip.frame_indices], atol=1e-6)


# --- the running app ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, work dir, TMPDIR, GRADIO_TEMP_DIR) of an app whose only decoder misbehaves on request."""
    work = tmp_path_factory.mktemp("app")
    tmp, gradio_tmp = work / "tmp", work / "tmp" / "gradio"
    for d in (work / "hf_home", tmp):
        d.mkdir()
    env = {
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home"), "FRAME_ARENA_PRESET": "tiny",
        "FRAME_ARENA_CACHE": os.environ["FRAME_ARENA_CACHE"], "FRAME_ARENA_DEVICE": "cpu",
        "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(gradio_tmp), "FRAME_ARENA_DECODERS": FAULTY,
        "FRAME_ARENA_DECODE_TIMEOUT_S": str(TIMEOUT_S), "FRAME_ARENA_MAX_DURATION_S": str(MAX_DURATION_S),
        "FRAME_ARENA_RATE_LIMIT_PER_MIN": "0", videos.HANG_PIDFILE_ENV: str(work / "hang.pid"),
    }
    with running_app(work, env) as url:
        yield url, work, tmp, gradio_tmp


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False, download_files=False)


def ask(client: Client, video: Path, frames: int = 2, fps: float = 1.0) -> dict:
    return client.predict(video=handle_file(str(video)), question="What number is shown?", backends=["uniform"],
                          fps=fps, max_frames=frames, max_new_tokens=2, params={}, api_name="/ask")


def refused(client: Client, video: Path) -> tuple[str, float]:
    """The message of the AppError the app answers `video` with, and how long that took."""
    start = time.monotonic()
    with pytest.raises(AppError) as caught:
        ask(client, video)
    return str(caught.value), time.monotonic() - start


def assert_still_answers(client: Client, good: Path) -> None:
    record = ask(client, good)
    assert len(record["answers"]) == 1 and record["video"]["sampled_frames"] == 2


@pytest.mark.parametrize("name", sorted(BAD))
def test_app_refuses_bad_file_quickly_and_keeps_answering(client, files, tmp_path, name):
    decodes = client.predict(api_name="/health")["decode_calls"]
    message, took = refused(client, as_hang(files[name], tmp_path))
    assert BAD[name] in message and "Traceback" not in message and "went wrong on our side" not in message
    assert took < QUICK_S
    assert client.predict(api_name="/health")["decode_calls"] == decodes + 1
    assert_still_answers(client, files["good"])


def test_app_vfr_rotated_clip_reports_pts_timestamps_and_upright_size(client, files):
    record = ask(client, files["vfr_rotated"], frames=64, fps=2.0)
    video = record["video"]
    assert (video["width"], video["height"]) == (96, 160)
    times = np.round(video["timestamps"], 6).tolist()
    # Every time is a frame's PTS (index / fps would give multiples of 0.1), ascending, and the oddly timed frames
    # sampled at the short video's raised rate are there.
    assert set(times) <= set(VFR_TIMES) and times == sorted(set(times))
    assert {0.15, 1.02, 2.51} <= set(times)


def test_hanging_decoder_is_killed_at_the_time_limit_and_the_next_request_works(app, client, files, tmp_path):
    pidfile = app[1] / "hang.pid"
    pidfile.unlink(missing_ok=True)
    hang = tmp_path / "hang.mp4"
    shutil.copy(files["good"], hang)
    message, took = refused(client, hang)
    assert f"took longer than {TIMEOUT_S:.1f} s and was stopped" in message
    assert TIMEOUT_S <= took < TIMEOUT_S + 3
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    assert_still_answers(client, files["good"])


def test_crashing_decoder_gives_a_message_and_the_next_request_works(client, files, tmp_path):
    crash = tmp_path / "segfault.mp4"
    shutil.copy(files["good"], crash)
    message, took = refused(client, crash)
    assert "The video decoder crashed (signal SIGSEGV) while reading this file" in message
    assert took < QUICK_S
    assert_still_answers(client, files["good"])


def test_nothing_but_gradios_uploaded_copies_is_left_in_the_temp_folders(app, client, files):
    _, _, tmp, gradio_tmp = app
    ask(client, files["good"])
    left = [p for p in tmp.rglob("*") if p.is_file()]
    assert not [p for p in tmp.rglob("frame-arena-decode-*")], "a decode worker's folder was left behind"
    outside = [p for p in left if gradio_tmp not in p.parents]
    assert outside == [], f"files outside gradio's upload folder: {outside}"
    # gradio keeps each upload as <content hash>/<name> until delete_cache removes it; nothing else may be there.
    uploaded = {p.name for p in files.values()} | {f"hang_{p.name}" for p in files.values()}
    uploaded |= {"hang.mp4", "segfault.mp4", "bouncing_ball.mp4", "counting_shapes.mp4"}
    strays = [p for p in left if p.parent.parent != gradio_tmp or p.name not in uploaded]
    assert strays == [], f"unexpected files in gradio's upload folder: {strays}"
