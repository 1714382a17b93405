"""app.py launched as a Space runs it, offline with an empty hub cache: it falls back to `tiny` with a banner, and
its named endpoints answer through gradio_client."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from tests.app_server import offline_env, running_app
from tests.videos import make_video

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    work = tmp_path_factory.mktemp("app")
    env = offline_env(work, preset="")
    with running_app(work, env) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "counter.mp4", num_frames=40, fps=10)


def uniform_count(frames: int, grid: int) -> int:
    uniform = get_backend("uniform")
    return uniform.num_tokens(frames, grid, uniform.make_params())


def two_backends() -> list[str]:
    names = list_backends()
    return ["uniform", next(n for n in names if n != "uniform")] if len(names) > 1 else names


def test_default_preset_unavailable_starts_on_tiny_with_a_banner(app_url):
    with urllib.request.urlopen(f"{app_url}/config") as response:
        config = json.loads(response.read())
    banner = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "banner")["props"]
    assert banner["visible"] is True
    text = banner["value"]
    assert "could not be loaded" in text and "`tiny`" in text
    assert "hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in text and "FRAME_ARENA_PRESET" in text
    assert "random weights" in text


def test_backends_endpoint_lists_every_backend_with_its_declared_params(client):
    listed = client.predict(api_name="/backends")
    assert [b["name"] for b in listed] == list_backends()
    for entry in listed:
        backend = get_backend(entry["name"])
        assert entry["label"] == backend.label and entry["paper_url"] == backend.paper_url
        assert [p["name"] for p in entry["params"]] == [f for f, _, _ in param_field_info(backend.Params)]


def test_ask_answers_with_every_requested_backend(client, video):
    backends = two_backends()
    record = client.predict(video=handle_file(str(video)), question="What number is shown?", backends=backends,
                            fps=2.0, max_frames=6, max_new_tokens=4, params={}, api_name="/ask")
    assert record["preset"] == "tiny" and record["random_weights"] is True
    timestamps = np.array(record["video"]["timestamps"])
    frames = record["video"]["sampled_frames"]
    assert len(timestamps) == frames == 6 and (np.diff(timestamps) > 0).all()
    assert [a["backend"] for a in record["answers"]] == backends
    grid = record["video"]["grid"]
    for answer in record["answers"]:
        attention = np.array(answer["frame_attention"])
        assert attention.shape == (frames,) and (attention >= 0).all()
        assert attention.sum() == pytest.approx(1.0, abs=0.02)
        backend = get_backend(answer["backend"])
        params = backend.make_params(record["params"][answer["backend"]])
        assert answer["num_visual_tokens"] == backend.num_tokens(frames, grid, params)
        assert answer["uniform_tokens"] == uniform_count(frames, grid)
        assert [s["name"] for s in answer["stages"]][:2] == ["decode", "encode"]
        assert 0 <= answer["new_tokens"] <= 4


def test_ask_passes_backend_params_through(client, video):
    name = next((n for n in list_backends() if param_field_info(get_backend(n).Params)), None)
    if name is None:
        pytest.skip("no registered backend declares parameters")
    field, default, param = next((f, d, p) for f, d, p in param_field_info(get_backend(name).Params)
                                 if isinstance(d, int) and not isinstance(d, bool) and p.maximum is not None)
    value = default + 1 if default + 1 <= param.maximum else default - 1
    record = client.predict(video=handle_file(str(video)), question="Which number?", backends=[name], fps=2.0,
                            max_frames=4, max_new_tokens=2, params={name: {field: value}}, api_name="/ask")
    assert record["params"][name][field] == value


@pytest.mark.parametrize("question, backends, params, message", [
    ("   ", ["uniform"], {}, "Please type a question"),
    ("Which number?", [], {}, "at least one method"),
    ("Which number?", ["uniform"], {"uniform": {"no_such_field": 1}}, "Invalid parameters for uniform"),
])
def test_user_mistakes_come_back_as_readable_errors(client, video, question, backends, params, message):
    with pytest.raises(AppError, match=message):
        client.predict(video=handle_file(str(video)), question=question, backends=backends, fps=1.0, max_frames=4,
                       max_new_tokens=2, params=params, api_name="/ask")


def test_a_file_that_is_not_a_video_is_refused_with_a_message(client, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("These are my holiday notes, not a video.\n" * 20)
    with pytest.raises(AppError) as caught:
        client.predict(video=handle_file(str(fake)), question="What happens?", backends=["uniform"], fps=1.0,
                       max_frames=4, max_new_tokens=2, params={}, api_name="/ask")
    message = str(caught.value)
    assert "video" in message and "Traceback" not in message and "went wrong on our side" not in message
