"""Hostile requests against the running app on 127.0.0.1: forged file paths and URLs are refused and read nothing,
oversized uploads get 413, over-long questions and out-of-range numbers are refused with the limit in the message,
and each client is held to the per-minute rate limit, keyed by its address."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from packaging.requirements import Requirement
from packaging.version import Version

from tests.app_server import ROOT, running_app
from tests.videos import make_video
from ui.rate_limit import RateLimited, RateLimiter, client_address, proxy_hops

pytestmark = pytest.mark.timeout(300)

MAX_FILE_BYTES = 64 * 1024
QUESTION_CAP = 300
RATE_PER_MIN = 3
FILE_DATA = {"_type": "gradio.FileData"}
HTTP_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def canary() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that records every request it gets: (base URL, paths requested)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x00\x00\x00\x18ftypmp42")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, TMPDIR, GRADIO_TEMP_DIR) of an app behind one (pretend) proxy hop, with small limits."""
    work = tmp_path_factory.mktemp("hostile")
    tmp = work / "tmp"
    for d in (work / "hf_home", tmp):
        d.mkdir()
    env = {
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home"), "FRAME_ARENA_PRESET": "tiny",
        "FRAME_ARENA_CACHE": os.environ["FRAME_ARENA_CACHE"], "FRAME_ARENA_DEVICE": "cpu",
        "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "FRAME_ARENA_MAX_FILE_MB": str(MAX_FILE_BYTES / 2**20), "FRAME_ARENA_MAX_QUESTION_CHARS": str(QUESTION_CAP),
        "FRAME_ARENA_RATE_LIMIT_PER_MIN": str(RATE_PER_MIN), "FRAME_ARENA_PROXY_HOPS": "1",
        # uvicorn must not read X-Forwarded-For itself (by default it trusts it from 127.0.0.1): the app does.
        "FORWARDED_ALLOW_IPS": "192.0.2.1",
    }
    with running_app(work, env) as url:
        yield url, tmp, tmp / "gradio"


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "counter.mp4", num_frames=20, fps=10)


def client_at(url: str, address: str | None = None) -> Client:
    """A gradio_client as seen through the proxy from `address` (each test its own, so rate limits do not mix)."""
    headers = {"X-Forwarded-For": address} if address else None
    return Client(url, verbose=False, download_files=False, headers=headers)


def ask(client: Client, video, question: str = "What number is shown?", backends=("uniform",), max_frames=2,
        params=None) -> dict:
    return client.predict(video=video, question=question, backends=list(backends), fps=1.0, max_frames=max_frames,
                          max_new_tokens=1, params=params or {}, api_name="/ask")


def health(url: str) -> dict:
    return client_at(url).predict(api_name="/health")


def call_ask_raw(url: str, data: list) -> tuple[str, dict | None]:
    """POST /gradio_api/call/ask with plain urllib, then read the event stream: (last event name, its data)."""
    request = urllib.request.Request(f"{url}/gradio_api/call/ask", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/ask/{event_id}", timeout=HTTP_TIMEOUT_S) as response:
        lines = response.read().decode().splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return events[-1], json.loads(payloads[-1]) if payloads else None


def upload(url: str, name: str, data: bytes) -> tuple[int, bytes]:
    """POST one file to /gradio_api/upload as multipart/form-data: (status, body)."""
    boundary = "frame-arena-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --- the rate limiter on its own -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_n_runs_in_any_minute_per_client():
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock)
    limiter.check("a")
    clock.now += 10
    limiter.check("a")
    clock.now += 10
    with pytest.raises(RateLimited, match=r"^Too many requests, try again in 40 s \(the limit is 2 runs per minute\)"):
        limiter.check("a")
    limiter.check("b")  # another client has its own allowance
    clock.now += 40  # the first run is now a minute old
    limiter.check("a")
    with pytest.raises(RateLimited, match="try again in 10 s"):
        limiter.check("a")


def test_rate_limiter_off_and_from_env(monkeypatch):
    limiter = RateLimiter(0)
    for _ in range(1000):
        limiter.check("a")
    monkeypatch.delenv("FRAME_ARENA_RATE_LIMIT_PER_MIN", raising=False)
    assert RateLimiter.from_env().per_minute == 20
    monkeypatch.setenv("FRAME_ARENA_RATE_LIMIT_PER_MIN", "5")
    assert RateLimiter.from_env().per_minute == 5
    monkeypatch.setenv("FRAME_ARENA_RATE_LIMIT_PER_MIN", "lots")
    with pytest.raises(ValueError, match="FRAME_ARENA_RATE_LIMIT_PER_MIN"):
        RateLimiter.from_env()


def test_rate_limiter_remembers_a_bounded_number_of_clients():
    limiter = RateLimiter(1, clock=FakeClock(), max_clients=2)
    for client in ("a", "b", "c"):
        limiter.check(client)
    limiter.check("a")  # forgotten to make room for c: a flood of addresses cannot grow memory
    with pytest.raises(RateLimited):
        limiter.check("c")


def test_client_address_trusts_only_the_proxies_it_is_told_of(monkeypatch):
    request = SimpleNamespace(client=SimpleNamespace(host="10.0.0.5"),
                              headers={"x-forwarded-for": "6.6.6.6, 198.51.100.1, 10.0.0.9"})
    assert client_address(request, 0) == "10.0.0.5"
    assert client_address(request, 1) == "10.0.0.9"
    assert client_address(request, 2) == "198.51.100.1"
    assert client_address(SimpleNamespace(client=SimpleNamespace(host="10.0.0.5"), headers={}), 1) == "10.0.0.5"
    assert client_address(None, 1) == "unknown"
    monkeypatch.delenv("FRAME_ARENA_PROXY_HOPS", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert proxy_hops() == 0
    monkeypatch.setenv("SPACE_ID", "someone/frame-arena")
    assert proxy_hops() == 1
    monkeypatch.setenv("FRAME_ARENA_PROXY_HOPS", "2")
    assert proxy_hops() == 2


# --- dependencies -------------------------------------------------------------------------------------------------


def test_gradio_is_pinned_to_a_release_with_the_file_and_ssrf_fixes():
    line = next(raw for raw in (ROOT / "requirements.txt").read_text().splitlines() if raw.startswith("gradio"))
    spec = Requirement(line).specifier
    # 6.25 is the first release the pin allows; nothing older may satisfy it, and what is installed must.
    assert not spec.contains("6.24.99") and spec.contains("6.25.0")
    installed = Version(version("gradio"))
    assert installed >= Version("6.25") and spec.contains(installed)


# --- forged paths and URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, message", [
    ({"path": "/etc/passwd"}, "not uploaded by a user"),
    ({"path": "../../../../../../etc/passwd"}, "not uploaded by a user"),
    ({"path": str(ROOT / "app.py")}, "not uploaded by a user"),
    ({"path": "/gradio_api/file=/etc/passwd"}, "not uploaded by a user"),
    ({"path": "file:///etc/passwd"}, "not uploaded by a user"),
    ({"path": "clip.mp4", "url": "{canary}/gradio_api/file=/etc/passwd"}, "not uploaded by a user"),
    ({"path": "{canary}/clip.mp4"}, "Hostname 127.0.0.1 failed validation"),
    ({"path": "http://169.254.169.254/latest/meta-data/"}, "Hostname 169.254.169.254 failed validation"),
], ids=["absolute", "dot-dot", "app-source", "file-route", "file-scheme", "url-field", "loopback-url", "metadata-url"])
def test_forged_file_paths_in_a_raw_request_are_refused_and_read_nothing(app, canary, payload, message):
    url, _, gradio_tmp = app
    base, hits = canary
    before, decodes = files_under(gradio_tmp), health(url)["decode_calls"]
    forged = {key: value.format(canary=base) for key, value in payload.items()} | {"meta": FILE_DATA}
    event, data = call_ask_raw(url, [forged, "What?", ["uniform"], 1, 2, 1, {}])
    assert event == "error" and message in data["error"]
    assert hits == [], "the app fetched a URL on the loopback interface"
    assert health(url)["decode_calls"] == decodes, "the engine was handed the forged path"
    assert files_under(gradio_tmp) == before, "something was copied into gradio's cache"


@pytest.mark.parametrize("target, message", [
    ("{canary}/clip.mp4", "Hostname 127.0.0.1 failed validation"),
    ("http://localhost:{port}/clip.mp4", "failed validation"),
    ("http://169.254.169.254/latest/meta-data/iam/", "Hostname 169.254.169.254 failed validation"),
], ids=["loopback", "localhost", "metadata"])
def test_urls_to_internal_addresses_sent_by_gradio_client_are_refused(app, canary, target, message):
    url = app[0]
    base, hits = canary
    decodes = health(url)["decode_calls"]
    link = target.format(canary=base, port=base.rsplit(":", 1)[1])
    with pytest.raises(AppError, match=message):
        ask(client_at(url), handle_file(link))
    assert hits == [] and health(url)["decode_calls"] == decodes


@pytest.mark.parametrize("path", ["/etc/passwd", str(ROOT / "app.py"), "../../../../../../etc/passwd",
                                  str(ROOT / "engine" / "api.py"), os.environ.get("FRAME_ARENA_CACHE", "/tmp")])
def test_files_outside_the_allowed_folders_are_not_served(app, path):
    try:
        with urllib.request.urlopen(f"{app[0]}/gradio_api/file={path}", timeout=HTTP_TIMEOUT_S) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    assert status in (403, 404) and b"root:" not in body and b"import" not in body


# --- uploads, questions, numbers ----------------------------------------------------------------------------------


def test_an_upload_over_max_file_size_gets_413_and_leaves_no_partial_file(app):
    url, tmp, _ = app
    before = files_under(tmp)
    status, body = upload(url, "big.mp4", os.urandom(MAX_FILE_BYTES + 4096))
    assert status == 413 and b"maximum allowed size" in body
    assert files_under(tmp) == before
    status, body = upload(url, "small.mp4", os.urandom(MAX_FILE_BYTES - 4096))
    assert status == 200 and json.loads(body)[0].endswith("small.mp4")


def test_gradio_client_also_refuses_to_send_an_oversized_file(app, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(client_at(app[0]), handle_file(str(big)))


@pytest.mark.parametrize("length", [QUESTION_CAP + 1, 1_000_000])
def test_a_question_over_the_cap_is_refused_with_the_cap_in_the_message(app, video, length):
    url = app[0]
    decodes = health(url)["decode_calls"]
    start = time.monotonic()
    with pytest.raises(AppError, match=f"The question is {length} characters long; the limit is {QUESTION_CAP}."):
        ask(client_at(url), handle_file(str(video)), question="x" * length)
    assert time.monotonic() - start < 10 and health(url)["decode_calls"] == decodes


@pytest.mark.parametrize("changes, message", [
    ({"max_frames": 1_000_000}, "Max frames is 1,000,000; the limit is 256."),
    ({"params": {"vilamp": {"k": 10**9}}}, "Invalid parameters for vilamp: k must be at most 256"),
    ({"params": {"videoxl2": {"group_size": "4; rm -rf /"}}}, "group_size must be a whole number"),
    ({"params": {"hico": {"drop_layers": "1,2,3,4,5,6,7,8"}}}, "drop_layers must be one of"),
    # gradio's own check of the dropdown's choices.
    ({"backends": ["uniform", "../../etc/passwd"]}, "'../../etc/passwd' (type: <class 'str'>) is not in the list"),
])
def test_out_of_range_numbers_and_names_are_refused_before_any_work(app, video, changes, message):
    url = app[0]
    decodes = health(url)["decode_calls"]
    with pytest.raises(AppError) as caught:
        ask(client_at(url), handle_file(str(video)), **changes)
    assert message in str(caught.value) and health(url)["decode_calls"] == decodes


@pytest.mark.parametrize("fps, max_frames, message", [
    (float("inf"), 2, "Frames per second must be a number above 0."),
    (float("nan"), 2, "Frames per second must be a number above 0."),
    # max_frames is a whole-number field: gradio refuses it before the handler.
    (1.0, float("inf"), "cannot convert float infinity to integer"),
])
def test_non_finite_numbers_in_a_raw_request_are_refused(app, video, fps, max_frames, message):
    url = app[0]
    decodes = health(url)["decode_calls"]
    upload_status, body = upload(url, "counter.mp4", video.read_bytes())
    uploaded = {"path": json.loads(body)[0], "meta": FILE_DATA}
    # json.dumps writes Infinity and NaN, which the server's JSON parser accepts.
    event, data = call_ask_raw(url, [uploaded, "What?", ["uniform"], fps, max_frames, 1, {}])
    assert upload_status == 200 and event == "error" and message in data["error"]
    assert health(url)["decode_calls"] == decodes


def test_a_method_named_many_times_runs_once(app, video):
    record = ask(client_at(app[0], "198.51.100.40"), handle_file(str(video)), backends=["uniform"] * 50)
    assert [a["backend"] for a in record["answers"]] == ["uniform"]


# --- rate limit ---------------------------------------------------------------------------------------------------


def test_each_client_is_held_to_the_rate_limit_by_its_address(app, video):
    url = app[0]
    first = client_at(url, "198.51.100.7")
    for _ in range(RATE_PER_MIN):
        assert ask(first, handle_file(str(video)))["answers"]
    # The same client claiming another origin in front of it: only the entry the proxy appended counts.
    spoofed = client_at(url, "203.0.113.99, 198.51.100.7")
    with pytest.raises(AppError) as caught:
        ask(spoofed, handle_file(str(video)))
    message = str(caught.value)
    assert message.startswith("Too many requests, try again in ") and f"limit is {RATE_PER_MIN} runs" in message
    wait = int(message.removeprefix("Too many requests, try again in ").split(" s")[0])
    assert 1 <= wait <= 60
    # Someone else is not affected.
    assert ask(client_at(url, "198.51.100.8"), handle_file(str(video)))["answers"]


def test_the_server_still_answers_after_all_of_that(app, video):
    record = ask(client_at(app[0], "198.51.100.99"), handle_file(str(video)))
    assert record["answers"][0]["backend"] == "uniform"
