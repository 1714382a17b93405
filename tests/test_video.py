"""engine.video: sampling math, PTS-exact decoding, rotation, resizing, decoder fallback and every bad-file path."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import VideoError
from engine.sampling import frames_at
from engine.types import Sampling
from engine.video import VideoLimits, load_clip, sample_times
from tests import videos
from tests.videos import read_index

# decord has wheels for x86-64 only (see requirements.txt); elsewhere PyAV does the work.
HAS_DECORD = importlib.util.find_spec("decord") is not None
DECODERS = [pytest.param(("decord",), marks=pytest.mark.skipif(not HAS_DECORD, reason="no decord")), ("pyav",)]
CRASH = ("tests.videos:segfaulting_decoder",)
VFR_TIMES = [0.0, 0.1, 0.15, 0.5, 1.0, 1.02, 2.0, 2.5, 2.51, 4.0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    made = {
        "cfr": videos.make_video(d / "cfr.mp4", 30, 10),
        "faststart": videos.make_video(d / "faststart.mp4", 30, 10, faststart=True),
        "vfr": videos.make_video(d / "vfr.mp4", len(VFR_TIMES), 10, vfr_times=VFR_TIMES),
        "long": videos.make_video(d / "long.mp4", 200, 25, codec="mpeg4"),
        "big": videos.make_video(d / "big.mp4", 6, 10, size=(320, 180)),
        "portrait90": videos.make_video(d / "p90.mp4", 12, 10, size=(96, 160), rotation=90),
        "portrait270": videos.make_video(d / "p270.mp4", 12, 10, size=(96, 160), rotation=270),
        "webm": videos.make_video(d / "clip.webm", 20, 10, codec="libvpx"),
    }
    made["truncated"] = videos.make_truncated(made["faststart"], d / "truncated.mp4")
    made["cut"] = videos.make_truncated(made["cfr"], d / "cut.mp4")
    made["no_moov"] = videos.make_no_moov(made["faststart"], d / "no_moov.mp4")
    made["zeroed"] = videos.make_zeroed_payload(made["cfr"], d / "zeroed.mp4")
    made["audio"] = videos.make_audio_only(d / "audio.mp4")
    for kind in ("text", "html", "pdf"):
        made[kind] = videos.make_fake_video(d / f"{kind}.mp4", kind)
    (d / "empty.mp4").write_bytes(b"")
    made["empty"] = d / "empty.mp4"
    (d / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    made["noise"] = d / "noise.mp4"
    made["missing"] = d / "missing.mp4"
    made["folder"] = d
    return made


@pytest.fixture(autouse=True)
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point temp files at a fresh folder and fail if load_clip leaves anything there."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    created: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def spy(*args, **kwargs):
        created.append(mkdtemp(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    yield created
    assert all(Path(c).parent == tmp for c in created)
    assert list(tmp.iterdir()) == [], "load_clip left temp files behind"


def check_frames(clip) -> None:
    assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4 and clip.frames.shape[-1] == 3
    assert [read_index(f) for f in clip.frames] == clip.frame_indices.tolist()


# --- sampling math -----------------------------------------------------------------------------------------------


def test_sample_times_at_fps():
    times = sample_times(60.0, Sampling(fps=1.0, max_frames=64, max_fps=1.0))
    np.testing.assert_allclose(times, np.arange(60))


def test_sample_times_capped_uniform_over_whole_video():
    times = sample_times(1000.0, Sampling(fps=1.0, max_frames=64))
    assert len(times) == 64
    np.testing.assert_allclose(np.diff(times), 1000 / 64)
    assert times[0] == 0 and 1000 - 1000 / 64 - 1e-9 <= times[-1] < 1000


def test_sample_times_raises_rate_for_short_videos():
    np.testing.assert_allclose(sample_times(10.0, Sampling(fps=1.0, max_frames=64, max_fps=4.0)), np.arange(40) / 4)
    times = sample_times(30.0, Sampling(fps=1.0, max_frames=64, max_fps=4.0))
    assert len(times) == 64 and times[-1] < 30
    np.testing.assert_allclose(np.diff(times), 30 / 64)


def test_sample_times_at_least_one_frame_and_no_float_noise():
    assert sample_times(0.01, Sampling()).tolist() == [0.0]
    assert sample_times(0.0, Sampling()).tolist() == [0.0]
    assert len(sample_times(0.3, Sampling(fps=10.0, max_frames=64, max_fps=10.0))) == 3


def test_sample_times_rejects_bad_sampling():
    with pytest.raises(ValueError):
        sample_times(10.0, Sampling(fps=0.0))
    with pytest.raises(ValueError):
        sample_times(10.0, Sampling(max_frames=0))


def test_frames_at_takes_frame_on_screen_and_dedups():
    frame_times = np.array([0.0, 0.1, 0.15, 0.5, 1.0])
    assert frames_at(np.array([0.0, 0.12, 0.49, 0.5, 2.0]), frame_times).tolist() == [0, 1, 2, 3, 4]
    assert frames_at(np.array([0.0, 0.01, 0.02, 0.7]), frame_times).tolist() == [0, 3]


# --- decoding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoders", DECODERS)
def test_constant_fps_indices_timestamps_meta(files, decoders):
    clip = load_clip(files["cfr"], Sampling(fps=1.0, max_frames=64, max_fps=4.0), decoders=decoders)
    # 3 s raised to 4 fps: 0, 0.25, 0.5 … → frames on screen at those times.
    assert clip.frame_indices.tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    check_frames(clip)
    np.testing.assert_allclose(clip.timestamps, clip.frame_indices / 10, atol=1e-6)
    meta = clip.meta
    assert (meta.num_frames, meta.width, meta.height, meta.rotation) == (30, 160, 96, 0)
    assert meta.duration_s == pytest.approx(3.0) and meta.avg_fps == pytest.approx(10.0)
    assert meta.decoder == decoders[0] and meta.path_name == "cfr.mp4"
    assert clip.content_hash == hashlib.sha256(files["cfr"].read_bytes()).hexdigest()
    assert clip.frames.shape == (12, 96, 160, 3) and clip.sampling.max_fps == 4.0


@pytest.mark.parametrize("decoders", DECODERS)
def test_variable_frame_rate_timestamps_are_pts(files, decoders):
    clip = load_clip(files["vfr"], Sampling(fps=2.0, max_frames=64, max_fps=2.0), decoders=decoders)
    check_frames(clip)
    np.testing.assert_allclose(clip.timestamps, np.array(VFR_TIMES)[clip.frame_indices], atol=1e-6)
    # Targets 0, 0.5, …, 4.0 take the frame on screen: 1.5 → frame 5 (1.02 s); 3.0 and 3.5 → frame 8 (2.51 s).
    assert clip.frame_indices.tolist() == [0, 3, 4, 5, 6, 7, 8, 9]
    assert clip.meta.num_frames == len(VFR_TIMES)


@pytest.mark.parametrize("decoders", DECODERS)
def test_capped_sampling_spans_whole_video(files, decoders):
    clip = load_clip(files["long"], Sampling(fps=4.0, max_frames=10), decoders=decoders)
    assert clip.frame_indices.tolist() == list(range(0, 200, 20))
    check_frames(clip)


@pytest.mark.parametrize(("name", "rotation"), [("portrait90", 90), ("portrait270", 270)])
def test_rotation_applied(files, name, rotation):
    clip = load_clip(files[name], Sampling(fps=2.0, max_frames=4))
    assert clip.frames.shape[1:] == (160, 96, 3)
    check_frames(clip)
    assert (clip.meta.width, clip.meta.height, clip.meta.rotation) == (96, 160, rotation)


@pytest.mark.parametrize("decoders", DECODERS)
def test_max_side_resize_keeps_aspect_never_upscales(files, decoders):
    small = load_clip(files["big"], Sampling(), VideoLimits(max_side=64), decoders=decoders)
    assert small.frames.shape[1:] == (36, 64, 3)
    check_frames(small)
    assert (small.meta.width, small.meta.height) == (320, 180)
    same = load_clip(files["big"], Sampling(), VideoLimits(max_side=1000), decoders=decoders)
    assert same.frames.shape[1:] == (180, 320, 3)


def test_rotated_and_resized(files):
    clip = load_clip(files["portrait90"], Sampling(max_frames=3), VideoLimits(max_side=80))
    assert clip.frames.shape[1:] == (80, 48, 3)
    check_frames(clip)


@pytest.mark.parametrize("decoders", DECODERS)
def test_webm(files, decoders):
    clip = load_clip(files["webm"], Sampling(max_frames=5), decoders=decoders)
    check_frames(clip)
    np.testing.assert_allclose(clip.timestamps, clip.frame_indices / 10, atol=1e-6)


@pytest.mark.parametrize(
    "first", ["tests.videos:raising_decoder", "no_such_module:decode", "tests.videos:segfaulting_decoder"]
)
def test_falls_back_to_pyav(files, first):
    clip = load_clip(files["cfr"], Sampling(max_frames=4), decoders=(first, "pyav"))
    assert clip.meta.decoder == "pyav"
    check_frames(clip)


def test_unknown_decoder_name_is_a_programming_error(files):
    with pytest.raises(ValueError, match="unknown decoder"):
        load_clip(files["cfr"], Sampling(), decoders=("ffmpeg-magic",))


# --- bad files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "was not found"),
        ("folder", "is a folder"),
        ("empty", "is empty"),
        ("text", "not a video: it is a text file"),
        ("html", "not a video: it is an HTML page"),
        ("pdf", "not a video: it is a PDF document"),
        ("noise", "not a video format that can be read"),
        ("audio", "only audio, no video stream"),
        ("truncated", "truncated: its header lists 30 frames but only"),
        ("cut", "'moov' atom) is missing"),
        ("no_moov", "'moov' atom) is missing"),
        ("zeroed", "None of the video's frames could be decoded"),
    ],
)
def test_bad_file_gives_clear_video_error(files, name, message):
    with pytest.raises(VideoError, match=re.escape(message)):
        load_clip(files[name], Sampling())


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (VideoLimits(max_file_bytes=1000), "MB limit"),
        (VideoLimits(max_duration_s=2.0), "3.0 s long, over the 2.0 s limit"),
        (VideoLimits(max_pixels=160 * 96 - 1), "160×96, above the 15,359 pixel limit"),
    ],
)
def test_limits_refuse_before_decoding(files, limits, message):
    # The only decoder would crash the worker: getting the limit message proves no pixel was decoded.
    with pytest.raises(VideoError, match=message):
        load_clip(files["cfr"], Sampling(), limits, decoders=CRASH)


def test_hanging_decoder_is_killed_and_next_load_works(files, tmp_path, monkeypatch):
    pidfile = tmp_path / "pid"
    monkeypatch.setenv(videos.HANG_PIDFILE_ENV, str(pidfile))
    start = time.monotonic()
    hang = ("tests.videos:hanging_decoder",)
    with pytest.raises(VideoError, match="longer than 2.5 s and was stopped"):
        load_clip(files["cfr"], Sampling(), VideoLimits(decode_timeout_s=2.5), decoders=hang)
    assert time.monotonic() - start < 6
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    check_frames(load_clip(files["cfr"], Sampling(max_frames=3), decoders=("pyav",)))


@pytest.mark.parametrize(
    ("decoder", "message"),
    [
        ("segfaulting_decoder", r"crashed \(signal SIGSEGV\)"),
        ("exiting_decoder", r"exited unexpectedly \(exit code 3\)"),
    ],
)
def test_crashing_decoder_gives_video_error(files, decoder, message):
    with pytest.raises(VideoError, match=message):
        load_clip(files["cfr"], Sampling(), decoders=(f"tests.videos:{decoder}",))


def test_raising_decoder_alone_gives_video_error(files):
    with pytest.raises(VideoError, match="could not be decoded"):
        load_clip(files["cfr"], Sampling(), decoders=("tests.videos:raising_decoder",))


def test_worker_uses_private_temp_dir_and_removes_it(files, private_tmp):
    load_clip(files["cfr"], Sampling(max_frames=2))
    assert private_tmp, "load_clip did not make its temp folder with tempfile.mkdtemp"


# --- limits ------------------------------------------------------------------------------------------------------


def test_limits_from_env(monkeypatch):
    monkeypatch.setenv("FRAME_ARENA_MAX_FILE_MB", "10")
    monkeypatch.setenv("FRAME_ARENA_MAX_DURATION_S", "60")
    monkeypatch.setenv("FRAME_ARENA_MAX_PIXELS", "1000")
    monkeypatch.setenv("FRAME_ARENA_DECODE_TIMEOUT_S", "5.5")
    monkeypatch.setenv("FRAME_ARENA_MAX_SIDE", "224")
    assert VideoLimits.from_env() == VideoLimits(10 * 2**20, 60.0, 1000, 5.5, 224)
    monkeypatch.setenv("FRAME_ARENA_MAX_SIDE", "big")
    with pytest.raises(ValueError, match="FRAME_ARENA_MAX_SIDE"):
        VideoLimits.from_env()


def test_limits_defaults(monkeypatch):
    for name in ("MAX_FILE_MB", "MAX_DURATION_S", "MAX_PIXELS", "DECODE_TIMEOUT_S", "MAX_SIDE"):
        monkeypatch.delenv(f"FRAME_ARENA_{name}", raising=False)
    assert VideoLimits.from_env() == VideoLimits() == VideoLimits(2 << 30, 10800.0, 4096 * 2160, 120.0, 448)
