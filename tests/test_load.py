"""Out of memory and load: a CUDA OOM (simulated on CPU) retries once with half the frames and says so, a second one
ends in a clear message; 20 concurrent clients against a small queue each get an answer or gradio's "queue full",
nothing hangs, and the server's memory and feature cache stay bounded."""

from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client, handle_file

import engine.oom
from engine.api import Engine
from engine.types import Sampling
from tests.app_server import free_port, offline_env, running_app
from tests.videos import make_video
from ui import handlers, runtime
from ui.errors import user_errors
from ui.layout import build_demo
from ui.run import RunRequest

pytestmark = pytest.mark.timeout(300)

OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 GiB"
CLIENTS = 20
QUEUE_SIZE = 4
CACHE_MB = 1
CALL_TIMEOUT_S = 120
# Growth of the server's RSS allowed over a whole load run, after a warm-up request: the tiny model's activations
# and a few decoded clips, with room for allocator slack; a leak per request (decoded frames, features, KV caches
# kept alive) would exceed it.
RSS_GROWTH_BYTES = 200 << 20


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("oom") / "counter.mp4", num_frames=40, fps=10)


@pytest.fixture
def fresh_runtime(tiny_engine) -> runtime.Runtime:
    """The session's tiny model behind a new Engine (empty feature cache), with no rate limit."""
    rt = runtime.Runtime(engine=Engine(tiny_engine.loaded), preset="tiny")
    rt.limiter.per_minute = 0
    return rt


def oom_on_encode(monkeypatch, rt: runtime.Runtime, failures: int) -> dict:
    """Make the engine's encode raise a CUDA OOM on its first `failures` calls, after allocating a tensor as a real
    failed allocation would leave behind; returns what the fake saw (frames per call, whether earlier allocations
    were freed by the time of each call)."""
    seen: dict = {"frames": [], "freed_before": [], "blobs": []}
    encode = rt.engine.encode

    def flaky(clip):
        seen["frames"].append(len(clip.frames))
        seen["freed_before"].append(all(ref() is None for ref in seen["blobs"]))
        if len(seen["frames"]) <= failures:
            blob = torch.empty(1 << 20)
            seen["blobs"].append(weakref.ref(blob))
            raise torch.OutOfMemoryError(OOM_TEXT)
        return encode(clip)

    monkeypatch.setattr(rt.engine, "encode", flaky)
    return seen


def request_for(video: Path, frames: int = 8) -> RunRequest:
    return RunRequest(video=str(video), question="Which number?", backends=["uniform"],
                      sampling=Sampling(fps=4.0, max_frames=frames), max_new_tokens=2)


# --- out of memory ------------------------------------------------------------------------------------------------


def test_one_oom_retries_with_half_the_frames_frees_memory_and_says_so(monkeypatch, fresh_runtime, video):
    freed = []
    monkeypatch.setattr(engine.oom, "free_device_memory", lambda: freed.append(True))
    seen = oom_on_encode(monkeypatch, fresh_runtime, failures=1)
    record = handlers.ask(fresh_runtime, request_for(video, frames=8))
    assert seen["frames"] == [8, 4]
    assert seen["freed_before"] == [True, True], "the failed attempt's allocation was still alive at the retry"
    assert freed == [True]
    assert record["notices"] == ["Ran out of GPU memory with up to 8 frames; retrying with 4."]
    assert record["sampling"]["max_frames"] == 4 and record["video"]["sampled_frames"] == 4
    assert [a["backend"] for a in record["answers"]] == ["uniform"]


@pytest.mark.filterwarnings("ignore:Ran out of GPU memory")  # gr.Warning outside a request only warns
def test_the_page_shows_the_retry_notice(monkeypatch, fresh_runtime, video):
    oom_on_encode(monkeypatch, fresh_runtime, failures=1)
    updates = list(handlers.stream_run(fresh_runtime, request_for(video), lambda *a, **k: None))
    infos = [u[handlers.VIDEO_INFO] for u in updates if u.get(handlers.VIDEO_INFO)]
    assert all("retrying with 4" in info for info in infos) and len(infos) == 2  # the notice, then the video
    assert updates[-2][("uniform", handlers.ANSWER)] is not None


def test_a_second_oom_gives_a_clear_message(monkeypatch, fresh_runtime, video):
    seen = oom_on_encode(monkeypatch, fresh_runtime, failures=2)
    with pytest.raises(gr.Error) as caught:
        user_errors(handlers.ask)(fresh_runtime, request_for(video, frames=8))
    assert seen["frames"] == [8, 4] and seen["freed_before"] == [True, True]
    assert caught.value.message.startswith("Ran out of GPU memory even with 4 frames. Try fewer frames")


def test_an_oom_while_answering_reaches_a_gradio_client_as_a_notice_and_then_as_a_message(monkeypatch,
                                                                                         fresh_runtime, video):
    calls = {"n": 0, "fail": 1}
    answer_stream = fresh_runtime.engine.answer_stream

    def flaky(*args, **kwargs):
        calls["n"] += 1
        yield from answer_stream(*args, **kwargs)
        if calls["n"] <= calls["fail"]:
            raise torch.OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(fresh_runtime.engine, "answer_stream", flaky)
    demo = build_demo(fresh_runtime).queue(max_size=4, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)

        def ask():
            return client.submit(video=handle_file(str(video)), question="Which number?", backends=["uniform"],
                                 fps=4.0, max_frames=6, max_new_tokens=2, params={}, api_name="/ask")

        record = ask().result(timeout=CALL_TIMEOUT_S)
        assert record["notices"] == ["Ran out of GPU memory with up to 6 frames; retrying with 3."]
        assert record["video"]["sampled_frames"] == 3 and len(record["answers"]) == 1
        calls.update(n=0, fail=2)
        with pytest.raises(Exception, match="Ran out of GPU memory even with 3 frames"):
            ask().result(timeout=CALL_TIMEOUT_S)
    finally:
        demo.close()


# --- load ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_app(tmp_path_factory):
    work = tmp_path_factory.mktemp("load")
    env = offline_env(work, preset="tiny", queue_size=str(QUEUE_SIZE), feature_cache_mb=str(CACHE_MB),
                      rate_limit_per_min="0")
    with running_app(work, env) as url:
        yield url


@pytest.fixture(scope="module")
def distinct_videos(tmp_path_factory) -> list[Path]:
    """Two waves' worth of videos plus one, all different, so every accepted request misses the feature cache."""
    d = tmp_path_factory.mktemp("many")
    return [make_video(d / f"v{i}.mp4", num_frames=12 + i, fps=10) for i in range(2 * CLIENTS + 1)]


def submit(client: Client, video: Path):
    return client.submit(video=handle_file(str(video)), question="Which number?", backends=["uniform"], fps=1.0,
                         max_frames=4, max_new_tokens=2, params={}, api_name="/ask")


def outcome(job) -> dict | str:
    """The record a job ended with, or the text of the error it got, waiting at most CALL_TIMEOUT_S."""
    try:
        return job.result(timeout=CALL_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 -- what the client got is the outcome under test
        return f"{type(err).__name__}: {err}"


@pytest.mark.slow
def test_concurrent_clients_get_an_answer_or_queue_full_and_memory_stays_bounded(loaded_app, distinct_videos):
    *videos, warm_up = distinct_videos
    with ThreadPoolExecutor(max_workers=8) as pool:
        clients = list(pool.map(lambda _: Client(loaded_app, verbose=False, download_files=False), range(CLIENTS + 1),
                                timeout=CALL_TIMEOUT_S))
    monitor = clients.pop()
    assert isinstance(outcome(submit(monitor, warm_up)), dict)
    warm = monitor.predict(api_name="/health")
    outcomes = []
    for wave in (videos[:CLIENTS], videos[CLIENTS:]):
        # All submitted at once (each job uploads and joins the queue in its own thread), then awaited.
        jobs = [submit(client, video) for client, video in zip(clients, wave)]
        outcomes += [outcome(job) for job in jobs]
        state = monitor.predict(api_name="/health")
        assert state["feature_cache_bytes"] <= state["feature_cache_limit"] == CACHE_MB << 20
    answered = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if not isinstance(o, dict)]
    assert all(len(o["answers"]) == 1 for o in answered)
    assert all("Queue is full" in o for o in refused), refused
    # Each wave fills the queue and overflows it: some answered, some refused.
    assert len(answered) >= QUEUE_SIZE + 1 and len(refused) >= CLIENTS // 2
    final = monitor.predict(api_name="/health")
    # Every answered request encoded its own video once; the cache kept only what fits.
    assert final["vision_calls"] == warm["vision_calls"] + len(answered)
    assert final["feature_cache_entries"] >= 1 and final["feature_cache_bytes"] <= final["feature_cache_limit"]
    assert final["rss_bytes"] - warm["rss_bytes"] < RSS_GROWTH_BYTES
    # The queue drained: a new request is served.
    assert isinstance(outcome(submit(monitor, warm_up)), dict)
