"""Frame Arena — the Space entry point: build the page from ui/ around the shared engine, queue it, launch it.

`python app.py` (preset from $FRAME_ARENA_PRESET; without hub access it starts on `tiny` with a banner saying so).
"""

import os

# Before gradio is imported: it reads these once. No usage analytics, no telemetry, no update checks.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path

from engine.video import VideoLimits, decoders_from_env
from ui.layout import EXAMPLES_DIR, build_demo
from ui.runtime import shared_runtime

ASSETS = Path(__file__).resolve().parent / "assets"
QUEUE_SIZE = int(os.environ.get("FRAME_ARENA_QUEUE_SIZE", "16"))
# Settings read per request, checked now: a typo fails the start, not every upload.
LIMITS = VideoLimits.from_env()
decoders_from_env()

demo = build_demo(shared_runtime()).queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)

if __name__ == "__main__":
    demo.launch(
        max_file_size=LIMITS.max_file_bytes,
        show_error=True,
        enable_monitoring=False,
        css_paths=[ASSETS / "style.css"],
        allowed_paths=[str(EXAMPLES_DIR)],
        footer_links=["api", "gradio"],
    )
