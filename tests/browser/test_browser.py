"""The page in headless Chromium: upload a video, compare two methods, see both answers, plots and the summary.

Needs Debian's Chromium (`apt-get install -y chromium`) and the `playwright` Python package (its own browser
download is never used: the system Chromium is launched through `executable_path`). Skips cleanly without them.
A full-page screenshot is left in tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.registry import get_backend, list_backends
from tests.app_server import running_app
from tests.videos import make_video

pytestmark = [pytest.mark.browser, pytest.mark.timeout(400)]

CHROMIUM = Path(os.environ.get("FRAME_ARENA_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_MS = 180_000


def test_compare_two_methods_side_by_side(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    names = list_backends()
    if len(names) < 2:
        pytest.skip("only one backend is registered; a side-by-side run needs two")
    chosen = ["uniform", next(n for n in names if n != "uniform")]
    labels = [get_backend(n).label for n in chosen]
    video = make_video(tmp_path / "counter.mp4", num_frames=40, fps=10)
    env = {"FRAME_ARENA_PRESET": "tiny", "FRAME_ARENA_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}

    with running_app(tmp_path, env) as url, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#run", timeout=60_000)
            for name in names:
                page.get_by_label(get_backend(name).label, exact=True).set_checked(name in chosen)
            page.wait_for_function("document.querySelectorAll('.method-column').length === 2")
            page.set_input_files("#video-input input[type=file]", str(video))
            page.wait_for_selector("#video-input video", timeout=30_000)
            page.fill("#question textarea", "Which number is shown?")
            for slider, value in (("#max-frames", "6"), ("#max-new-tokens", "4"), ("#fps", "2")):
                page.fill(f"{slider} input[type=number]", value)
                page.press(f"{slider} input[type=number]", "Enter")
            page.click("#run")

            # Each column ends with its attention and cost plots; the summary table names both methods.
            page.wait_for_function(
                "labels => document.querySelectorAll('.method-column .js-plotly-plot').length === 4"
                " && labels.every(l => document.querySelector('#summary').innerText.includes(l))",
                arg=labels, timeout=RUN_TIMEOUT_MS,
            )
            columns = page.locator(".method-column")
            assert [columns.nth(i).locator("h3").inner_text() for i in range(2)] == labels
            for i in range(2):
                column = columns.nth(i)
                assert column.locator("textarea").count() == 1
                assert "6 frames" in column.locator(".stats").first.inner_text()
                assert column.locator("img").count() >= 1
            overlay_traces = page.evaluate("document.querySelector('#all-methods .js-plotly-plot').data.length")
            assert overlay_traces == 2
            assert "6 frames sampled" in page.locator("#video-info").inner_text()
            page.wait_for_function("!document.querySelector('#export').disabled", timeout=30_000)
            assert page.locator(".toast-body.error").count() == 0
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            raise
        else:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser-compare.png"), full_page=True)
        finally:
            context.close()
