"""Test-wide setup: offline hub, an isolated engine cache, one tiny engine shared by the session."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FRAME_ARENA_CACHE", tempfile.mkdtemp(prefix="frame-arena-test-cache-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engine():
    from engine.api import Engine

    return Engine.from_preset("tiny", device="cpu")
