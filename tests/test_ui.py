"""The UI layer on the tiny engine: controls from Params declarations, one decode/encode per run, what each column
shows, the JSON export, figures, error handling, the ZeroGPU wrapper and the preset fallback."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import gradio as gr
import numpy as np
import pytest

from backends.base import param_field_info
from backends.registry import get_backend, list_backends
from engine.api import Engine
from engine.errors import QuestionError, UserFacingError, VideoError
from engine.report import answer_to_dict
from engine.types import Answer, Sampling, StageProbe
from tests.videos import make_video, read_index
from ui import figures, handlers, runtime, summary
from ui.errors import GENERIC_MESSAGE, user_errors
from ui.layout import build_demo
from ui.params import coerce, render_param_controls
from ui.record import answer_from_dict, load_record
from ui.run import TOP_FRAMES, RequestError, RunRequest, check_request, gpu_seconds

VIDEO_FPS = 8


def two_backends() -> list[str]:
    names = list_backends()
    return ["uniform", next(n for n in names if n != "uniform")] if len(names) > 1 else names


def uniform_count(frames: int, grid: int) -> int:
    uniform = get_backend("uniform")
    return uniform.num_tokens(frames, grid, uniform.make_params())


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("ui") / "counter.mp4", num_frames=48, fps=VIDEO_FPS)


@pytest.fixture
def fresh_runtime(tiny_engine):
    """The session's tiny model behind a new Engine, so its feature cache and vision-call counter start empty."""
    return runtime.Runtime(engine=Engine(tiny_engine.loaded), preset="tiny")


# ---- parameters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_backends())
def test_param_controls_match_the_declared_fields(name):
    declared = [f for f in param_field_info(get_backend(name).Params) if f[1] is not dataclasses.MISSING]
    with gr.Blocks():
        controls = render_param_controls([name])
    assert [(b, f) for b, f, _ in controls.keys] == [(name, f) for f, _, _ in declared]
    for component, (_, default, param) in zip(controls.components, declared, strict=True):
        assert component.label == param.label and component.value == default
        if param.choices:
            assert isinstance(component, gr.Dropdown)
            assert [value for _, value in component.choices] == list(param.choices)
        elif isinstance(default, bool):
            assert isinstance(component, gr.Checkbox)
        elif param.minimum is not None and param.maximum is not None:
            assert isinstance(component, gr.Slider)
            assert (component.minimum, component.maximum) == (param.minimum, param.maximum)
            if param.step:
                assert component.step == param.step
    collected = controls.collect([c.value for c in controls.components])
    defaults = dataclasses.asdict(get_backend(name).make_params())
    assert collected.get(name, {}) == defaults
    assert all(type(collected[name][f]) is type(defaults[f]) for f in collected.get(name, {}))


def test_slider_floats_become_the_declared_type():
    assert coerce(3.0, int) == 3 and type(coerce(3.0, int)) is int
    assert coerce(1, float) == 1.0 and type(coerce(1, float)) is float
    assert coerce(1, bool) is True and coerce("auto", str) == "auto"


def test_token_budget_uses_each_backend_num_tokens():
    names = list_backends()
    text = summary.budget_markdown(names, 32, 27, {})
    for name in names:
        backend = get_backend(name)
        assert f"{backend.label} **{backend.num_tokens(32, 27, backend.make_params()):,}**" in text


# ---- a run -------------------------------------------------------------------------------------------------------


def test_a_run_decodes_and_encodes_once_and_fills_every_column(fresh_runtime, video, monkeypatch):
    engine = fresh_runtime.engine
    decodes = []
    real_decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda path, sampling: decodes.append(path) or real_decode(path, sampling))
    backends = two_backends()
    request = RunRequest(video=str(video), question="Which number is shown?", backends=backends,
                         sampling=Sampling(fps=2.0, max_frames=6), max_new_tokens=3)
    progress: list[tuple[float, str]] = []
    state: dict = {}
    for update in handlers.stream_run(fresh_runtime, request, lambda frac, desc=None: progress.append((frac, desc))):
        state.update(update)

    assert len(decodes) == 1 and engine.vision_calls == 1
    descs = [d for _, d in progress]
    assert descs[0].startswith("Decoding") and descs[1].startswith("Encoding")
    assert [d for d in descs if d.endswith("answering")] == [f"{get_backend(b).label}: answering" for b in backends]
    assert [f for f, _ in progress] == sorted(f for f, _ in progress) and progress[-1][0] == 1.0

    record = load_record(state[handlers.EXPORT].value["path"])
    timestamps = np.array(record["video"]["timestamps"])
    frames, grid = record["video"]["sampled_frames"], record["video"]["grid"]
    assert frames == 6 and "6 frames sampled" in state[handlers.VIDEO_INFO]
    for name, entry in zip(backends, record["answers"], strict=True):
        assert entry["backend"] == name and state[(name, handlers.ANSWER)] == entry["text"]
        assert f"{entry['num_visual_tokens']:,} visual tokens" in state[(name, handlers.STATS)]
        assert f"uniform's {uniform_count(frames, grid):,}" in state[(name, handlers.STATS)]
        line = state[(name, handlers.ATTENTION)].data[0]
        np.testing.assert_allclose(line.x, timestamps)
        np.testing.assert_allclose(line.y, entry["frame_attention"])
        assert sum(line.y) == pytest.approx(1.0, abs=0.02)
        # The gallery holds the most-attended frames, most attended first: the pictures themselves say which.
        shown = [read_index(image) for image, _ in state[(name, handlers.FRAMES)]]
        top = np.argsort(-np.array(entry["frame_attention"]), kind="stable")[:TOP_FRAMES]
        assert shown == [round(timestamps[i] * VIDEO_FPS) for i in top]
        bars = state[(name, handlers.COST)].data[0]
        assert list(bars.x) == [s["name"] for s in entry["stages"]]
    assert [t.name for t in state[handlers.OVERLAY].data] == [get_backend(b).label for b in backends]
    table = state[handlers.TABLE]
    assert list(table["method"]) == [get_backend(b).label for b in backends]
    assert list(table["visual tokens"]) == [a["num_visual_tokens"] for a in record["answers"]]


def test_a_second_question_on_the_same_video_reuses_the_features(fresh_runtime, video):
    for question in ("Which number?", "What colour is the left column?"):
        request = RunRequest(video=str(video), question=question, backends=["uniform"],
                             sampling=Sampling(fps=1.0, max_frames=3), max_new_tokens=1)
        record = handlers.ask(fresh_runtime, request)
        assert record["question"] == question
    assert fresh_runtime.engine.vision_calls == 1


def test_the_export_round_trips(fresh_runtime, video, tmp_path):
    request = RunRequest(video=str(video), question="Which number?", backends=two_backends(),
                         sampling=Sampling(fps=1.0, max_frames=4), max_new_tokens=2)
    record = handlers.ask(fresh_runtime, request)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    loaded = load_record(path)
    assert loaded == json.loads(json.dumps(record))
    for entry in loaded["answers"]:
        rebuilt = answer_from_dict(entry)
        again = answer_to_dict(rebuilt, np.array(loaded["video"]["timestamps"]))
        assert again == {k: v for k, v in entry.items() if k not in ("label", "uniform_tokens")}
    assert loaded["params"] == {b: dataclasses.asdict(get_backend(b).make_params()) for b in request.backends}


def test_something_else_than_a_run_record_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"answers": []}))
    with pytest.raises(ValueError, match="not a Frame Arena run"):
        load_record(path)


# ---- requests and errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, error, message", [
    ({"video": ""}, VideoError, "upload a video"),
    ({"backends": []}, RequestError, "at least one method"),
    ({"backends": ["no-such-method"]}, RequestError, "Unknown method"),
    ({"params": {"uniform": {"bogus": 1}}}, RequestError, "Invalid parameters for uniform"),
    ({"question": "  "}, QuestionError, "question"),
])
def test_incomplete_requests_are_refused_before_any_work(changes, error, message):
    request = RunRequest(video="clip.mp4", question="What?", backends=["uniform"], sampling=Sampling())
    with pytest.raises(error, match=message):
        check_request(dataclasses.replace(request, **changes))


def test_form_values_are_checked_and_converted():
    request = handlers.make_request("v.mp4", "What?", ["uniform"], 2, 8.0, 16.0, None)
    assert request.sampling == Sampling(fps=2.0, max_frames=8) and request.max_new_tokens == 16
    with pytest.raises(RequestError, match="numbers"):
        handlers.make_request("v.mp4", "What?", ["uniform"], None, 8, 16, None)
    with pytest.raises(RequestError, match="params"):
        handlers.make_request("v.mp4", "What?", ["uniform"], 1, 8, 16, {"uniform": 3})


def test_user_errors_keep_their_message_and_hide_ours(caplog):
    def theirs():
        raise VideoError("This file is not a video.")

    def ours():
        raise RuntimeError("index 7 out of range in /srv/secret/path.py")

    def streaming():
        yield 1
        raise KeyError("internal")

    with pytest.raises(gr.Error) as caught:
        user_errors(theirs)()
    assert caught.value.message == "This file is not a video."
    with pytest.raises(gr.Error) as caught:
        user_errors(ours)()
    assert caught.value.message == GENERIC_MESSAGE and "secret" not in str(caught.value)
    assert any("secret" in (r.exc_text or "") for r in caplog.records)
    wrapped = user_errors(streaming)
    gen = wrapped()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="went wrong on our side"):
        next(gen)


def test_wrapped_handlers_keep_the_progress_parameter_gradio_looks_for():
    def run(video, question, progress=gr.Progress()):  # noqa: B008
        yield video

    assert "progress" in __import__("inspect").signature(user_errors(run)).parameters


# ---- figures -----------------------------------------------------------------------------------------------------


def synthetic_answer() -> tuple[Answer, np.ndarray]:
    times = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    answer = Answer(
        text="a", backend="x", frame_attention=np.array([0.1, 0.3, 0.1, 0.1, 0.3, 0.1]), token_attention=np.ones(3),
        stages=[StageProbe("decode", 0.5, 100 << 20, "cpu_rss"), StageProbe("prefill", 1.5, 300 << 20, "cpu_rss")],
        num_frames=6, num_visual_tokens=300, prompt_tokens=320, new_tokens=1,
        frame_marks={"keyframe": np.array([0, 1, 0, 0, 1, 0.0]), "block": np.array([0, 0, 1, 1, 2, 2.0]),
                     "relevance": np.linspace(0, 1, 6), "wrong_length": np.ones(3)},
        notes=["parameter-free fusion"],
    )
    return answer, times


def test_attention_figure_draws_the_backend_marks_on_the_time_axis():
    answer, times = synthetic_answer()
    fig = figures.attention_figure(answer, times)
    line, *rest = fig.data
    assert "s" in line.hovertemplate and "attention" in line.hovertemplate
    keyframes = next(t for t in rest if t.name == "keyframe")
    assert list(keyframes.x) == [1.0, 4.0] and list(keyframes.y) == [0.3, 0.3]
    strip = next(t for t in rest if t.type == "heatmap")
    assert list(strip.y) == ["keyframe", "block", "relevance"]
    np.testing.assert_allclose(np.array(strip.customdata)[1], [0, 0, 1, 1, 2, 2])
    assert sorted(shape.x0 for shape in fig.layout.shapes) == [1.5, 3.5]


def test_cost_figure_shows_each_stage_and_the_memory_counter():
    answer, _ = synthetic_answer()
    fig = figures.cost_figure(answer)
    seconds, memory = fig.data
    assert list(seconds.x) == ["decode", "prefill"] and list(seconds.y) == [0.5, 1.5]
    assert list(memory.y) == [100, 300]
    assert "process RSS" in fig.layout.xaxis2.title.text


def test_stats_line_compares_with_uniform_and_names_the_memory_counter():
    answer, _ = synthetic_answer()
    baseline = uniform_count(6, 27)
    text = summary.stats_markdown(answer, baseline)
    assert f"300 visual tokens** ({100 * 300 / baseline:.0f}% of uniform's {baseline:,})" in text
    assert "prefill 1.50 s" in text and "decode" not in text.split("\n")[1].split("·")[0]
    assert "peak 300 MiB at prefill (process RSS (CPU))" in text and "*parameter-free fusion*" in text


# ---- runtime -----------------------------------------------------------------------------------------------------


def test_gpu_time_grows_with_frames_and_backends_and_is_capped():
    base = RunRequest(video="v", question="q", backends=["uniform"], sampling=Sampling(max_frames=16))
    more_frames = dataclasses.replace(base, sampling=Sampling(max_frames=128))
    more_backends = dataclasses.replace(base, backends=["uniform"] * 4)
    assert gpu_seconds(base) < gpu_seconds(more_frames) and gpu_seconds(base) < gpu_seconds(more_backends)
    huge = dataclasses.replace(base, backends=["uniform"] * 40, sampling=Sampling(max_frames=4096))
    assert gpu_seconds(huge) == 300


def test_on_a_zerogpu_space_the_run_is_wrapped_with_a_duration_from_the_request(tiny_engine, monkeypatch):
    seen = {}

    def gpu(duration):
        def wrap(fn):
            seen["duration"] = duration

            def wrapped(*args):
                seen["called"] = True
                return fn(*args)

            return wrapped

        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    rt = runtime.Runtime(engine=tiny_engine, preset="tiny")
    assert seen["duration"] is gpu_seconds
    request = RunRequest(video="", question="q", backends=["uniform"], sampling=Sampling())
    with pytest.raises(UserFacingError):
        list(rt.run(request))
    assert seen["called"]


def test_without_the_spaces_package_nothing_is_wrapped(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)

    def fn(request):
        return request

    assert runtime.on_gpu(fn, duration=gpu_seconds) is fn


def test_an_unavailable_preset_falls_back_to_tiny_with_a_banner(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(runtime.PRESET_ENV, raising=False)
    rt = runtime.load_runtime("llava-ov-7b")
    assert rt.preset == "tiny" and rt.random_weights
    fallback, random_note = rt.banners
    assert "`llava-ov-7b` could not be loaded" in fallback
    assert "hf download llava-hf/llava-onevision-qwen2-7b-ov-hf" in fallback and "FRAME_ARENA_PRESET=" in fallback
    assert "random weights" in random_note
    demo = build_demo(rt)
    banner = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "banner")
    assert banner.visible and "could not be loaded" in banner.value


def test_the_page_exposes_named_endpoints_on_one_gpu_queue(tiny_engine):
    demo = build_demo(runtime.Runtime(engine=tiny_engine, preset="tiny"))
    banner = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "banner")
    assert not banner.visible
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    assert {"ask", "backends"} <= set(deps)
    assert deps["ask"].concurrency_id == "gpu" and deps["ask"].concurrency_limit == 1
