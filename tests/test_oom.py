"""A simulated CUDA OOM retries once with half the frames; a second one ends in a clear OutOfMemory."""

import pytest
import torch

from engine.errors import OutOfMemory
from engine.oom import RetryNotice, is_out_of_memory, run_with_oom_retry
from engine.types import Sampling


def flaky_run(failures: int, seen: list[int]):
    def run(sampling: Sampling):
        seen.append(sampling.max_frames)
        yield f"started with {sampling.max_frames}"
        if len(seen) <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield "done"

    return run


def test_one_oom_retries_with_half_the_frames_and_says_so():
    seen: list[int] = []
    events = list(run_with_oom_retry(flaky_run(1, seen), Sampling(max_frames=64)))
    assert seen == [64, 32]
    notices = [e for e in events if isinstance(e, RetryNotice)]
    assert len(notices) == 1 and "32" in notices[0].message and notices[0].sampling.max_frames == 32
    assert events[-1] == "done"


def test_a_second_oom_gives_a_user_facing_error():
    seen: list[int] = []
    with pytest.raises(OutOfMemory, match="even with 32 frames"):
        list(run_with_oom_retry(flaky_run(2, seen), Sampling(max_frames=64)))
    assert seen == [64, 32]


def test_other_errors_are_not_retried():
    def broken(sampling):
        yield "x"
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        list(run_with_oom_retry(broken, Sampling()))


def test_oom_recognised_from_runtime_error_text():
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
