"""The page: inputs, one column per chosen method (one @gr.render), the shared views, the About panel, the API."""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from backends.registry import list_backends
from ui import about, handlers, summary
from ui.errors import user_errors
from ui.needle_panel import build_needle_panel
from ui.params import render_param_controls
from ui.rate_limit import client_address, proxy_hops
from ui.run import MAX_FRAMES
from ui.runtime import Runtime

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLES = [
    ("bouncing_ball.mp4", "When does the ball change colour, and to which colour?"),
    ("counting_shapes.mp4", "How many shapes are there at the end of the video?"),
]
GPU_QUEUE = "gpu"
# Uploaded videos (and exports) are deleted this long after they were written: an upload can be 2 GB, so a busy
# Space would otherwise fill its disk; a question asked later about a deleted upload gets "file not found".
UPLOAD_MAX_AGE_S = int(os.environ.get("FRAME_ARENA_UPLOAD_MAX_AGE_S", "3600"))
INTRO = (
    "# Frame Arena\n"
    "Upload a video, ask a question, and compare long-video token-compression methods side by side on **one** "
    "vision-language model: each answer comes with where the model looked (attention over frames) and what it "
    "cost (tokens, time and memory per stage)."
)


def example_rows() -> list[list[str]]:
    return [[str(EXAMPLES_DIR / name), question] for name, question in EXAMPLES if (EXAMPLES_DIR / name).is_file()]


def _column(name: str, label: str) -> dict[tuple[str, str], gr.components.Component]:
    """One method's outputs, keyed so a re-render (another method ticked) keeps what is already shown."""
    with gr.Column(min_width=280, elem_classes=["method-column"], key=f"column-{name}"):
        gr.Markdown(f"### {label}", key=f"title-{name}")
        return {
            (name, handlers.ANSWER): gr.Textbox(label="Answer", lines=3, max_lines=12, interactive=False,
                                                key=f"answer-{name}", elem_classes=["answer"]),
            (name, handlers.STATS): gr.Markdown(key=f"stats-{name}", elem_classes=["stats"]),
            (name, handlers.ATTENTION): gr.Plot(label="Attention over time", show_label=False,
                                                  key=f"attention-{name}"),
            (name, handlers.FRAMES): gr.Gallery(label="Most-attended frames", columns=2, rows=2, height=340,
                                                object_fit="contain", key=f"frames-{name}"),
            (name, handlers.COST): gr.Plot(label="Time and memory per stage", show_label=False, key=f"cost-{name}"),
        }


def build_demo(runtime: Runtime) -> gr.Blocks:
    """The whole app around `runtime` (the engine all sessions share)."""
    names = list_backends()
    grid = runtime.engine.loaded.grid
    hops = proxy_hops()
    default_frames = 64 if runtime.engine.device.type == "cuda" else 16
    delete_cache = (min(600, UPLOAD_MAX_AGE_S), UPLOAD_MAX_AGE_S)  # (how often to look, age that is deleted)
    with gr.Blocks(title="Frame Arena", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        gr.Markdown("\n\n".join(runtime.banners), visible=bool(runtime.banners), elem_id="banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                video = gr.Video(label="Video", sources=["upload"], height=280, interactive=True,
                                 elem_id="video-input")
                question = gr.Textbox(label="Question", lines=2, placeholder="What happens after the dog jumps?",
                                      interactive=True, elem_id="question")
                gr.Examples(example_rows(), inputs=[video, question], cache_examples=False, label="Examples")
                run_button = gr.Button("Compare", variant="primary", elem_id="run")
            with gr.Column(scale=4):
                methods = gr.CheckboxGroup(about.backend_choices(), value=names[:2], label="Methods",
                                           elem_id="methods")
                gr.Markdown(about.overview_markdown(), elem_classes=["overview"])
                with gr.Row():
                    fps = gr.Slider(0.1, 4.0, value=1.0, step=0.1, label="Frames per second", interactive=True,
                                    elem_id="fps")
                    max_frames = gr.Slider(1, MAX_FRAMES, value=min(default_frames, MAX_FRAMES), step=1,
                                           label="Max frames", interactive=True, elem_id="max-frames")
                    max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens",
                                               interactive=True, elem_id="max-new-tokens")
                with gr.Accordion("Advanced: method parameters", open=False):
                    controls = render_param_controls(names)
                budget = gr.Markdown(summary.budget_markdown(names[:2], default_frames, grid, {}),
                                     elem_classes=["budget"])
        video_info = gr.Markdown(elem_id="video-info")
        # Created here (render=False) so the run event wired inside the columns' render can update them; placed below.
        overlay = gr.Plot(label="Attention over time, all methods", show_label=False, render=False)
        table = gr.Dataframe(headers=summary.SUMMARY_COLUMNS, label="Summary", interactive=False, wrap=True,
                             elem_id="summary", render=False)
        export = gr.DownloadButton("Export JSON", interactive=False, elem_id="export", render=False)
        shared = {handlers.VIDEO_INFO: video_info, handlers.OVERLAY: overlay, handlers.TABLE: table,
                  handlers.EXPORT: export}

        @gr.render(inputs=[methods])
        def method_columns(selected: list[str] | None) -> None:
            chosen = [name for name in names if name in (selected or [])]
            outputs: dict[handlers.Key, gr.components.Component] = {}
            with gr.Row(equal_height=False, elem_id="columns"):
                for label, name in about.backend_choices():
                    if name in chosen:
                        outputs.update(_column(name, label))
            outputs.update(shared)

            # gradio finds its progress tracker by this default value.
            def run(http: gr.Request, video_path, question_text, fps_value, frames, new_tokens, *param_values,
                    progress=gr.Progress()):  # noqa: B008
                request = handlers.make_request(video_path, question_text, chosen, fps_value, frames, new_tokens,
                                                controls.collect(param_values))
                for update in handlers.stream_run(runtime, request, progress, client_address(http, hops)):
                    yield {outputs[key]: value for key, value in update.items()}

            gr.on([run_button.click, question.submit], user_errors(run),
                  inputs=[video, question, fps, max_frames, max_new_tokens, *controls.components],
                  outputs=list(outputs.values()), show_progress_on=video_info, concurrency_id=GPU_QUEUE,
                  concurrency_limit=1, api_visibility="private")

        with gr.Column(elem_id="all-methods"):
            overlay.render()
            table.render()
        export.render()

        build_needle_panel(runtime, names, GPU_QUEUE, default_frames, MAX_FRAMES, hops)

        with gr.Accordion("About the methods", open=False, elem_id="about"):
            gr.Markdown(about.about_markdown(grid))

        def update_budget(selected, frames, *param_values):
            chosen = [name for name in names if name in (selected or [])]
            return summary.budget_markdown(chosen, int(frames), grid, controls.collect(param_values))

        gr.on([methods.change, max_frames.change, *(c.change for c in controls.components)],
              user_errors(update_budget), inputs=[methods, max_frames, *controls.components], outputs=budget,
              queue=False, show_progress="hidden", api_visibility="private")
        _api(runtime, names, hops)
    return demo


def _api(runtime: Runtime, names: list[str], hops: int) -> None:
    """Named endpoints for gradio_client: `/ask` (a video file and a question → the run as JSON) and `/backends`."""
    with gr.Group(visible=False):
        api_video = gr.File(label="video")
        # gradio 6.31's File.preprocess leaves an empty temp file in its cache on every call, never deleted, which a
        # caller could repeat without limit; the handler needs only the upload's path (gradio has already checked
        # it is an upload). Set on the instance: a gr.File subclass would make gradio write a .pyi next to this file.
        api_video.preprocess = lambda payload: None if payload is None else payload.path
        api_question = gr.Textbox(label="question")
        api_backends = gr.Dropdown(choices=names, value=names[:1], multiselect=True, label="backends")
        api_fps = gr.Number(value=1.0, label="fps")
        api_frames = gr.Number(value=64, precision=0, label="max_frames")
        api_tokens = gr.Number(value=64, precision=0, label="max_new_tokens")
        api_params = gr.JSON(value={}, label="params")
        api_result = gr.JSON(label="result")
        api_trigger = gr.Button("ask")

    def ask(http: gr.Request, video, question, backends, fps, max_frames, max_new_tokens, params):
        request = handlers.make_request(video, question, backends, fps, max_frames, max_new_tokens, params)
        return handlers.ask(runtime, request, client_address(http, hops))

    api_trigger.click(user_errors(ask), inputs=[api_video, api_question, api_backends, api_fps, api_frames,
                                                api_tokens, api_params],
                      outputs=api_result, api_name="ask", concurrency_id=GPU_QUEUE, concurrency_limit=1)

    def backends() -> list[dict]:
        """Every registered method: name, label, paper, description and declared parameters."""
        return handlers.describe_backends()

    gr.api(backends, api_name="backends")

    def health() -> dict:
        """Feature cache bytes and limit, process RSS, decodes and vision-tower runs so far."""
        return handlers.health(runtime)

    # Off the queue, so it answers while the queue is full; undocumented, as it is for operators and tests.
    gr.api(health, api_name="health", queue=False, api_visibility="undocumented")
