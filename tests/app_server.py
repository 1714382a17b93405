"""Start `python app.py` in a child process on 127.0.0.1 and a free port, as a Space would run it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/config", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


@contextmanager
def running_app(workdir: Path, env: dict[str, str]) -> Iterator[str]:
    """Yield the URL of a running app.py (environment = ours + `env`; a key mapped to "" is removed)."""
    port = free_port()
    full_env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **env}
    full_env = {k: v for k, v in full_env.items() if v != ""}
    log = workdir / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def offline_env(workdir: Path, **settings: str) -> dict[str, str]:
    """The environment of an offline test server on CPU with an empty hub cache, plus FRAME_ARENA_* `settings`."""
    (workdir / "hf_home").mkdir(exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home"), "FRAME_ARENA_DEVICE": "cpu",
           "FRAME_ARENA_CACHE": os.environ["FRAME_ARENA_CACHE"]}
    env.update({f"FRAME_ARENA_{name.upper()}": value for name, value in settings.items()})
    return env
