"""A per-client limit on runs: at most N in any minute, keyed by the client's address."""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from engine.errors import UserFacingError

RATE_LIMIT_ENV = "FRAME_ARENA_RATE_LIMIT_PER_MIN"
PROXY_HOPS_ENV = "FRAME_ARENA_PROXY_HOPS"
DEFAULT_PER_MINUTE = 20
WINDOW_S = 60.0
# Clients remembered at once; beyond it the least recently seen are forgotten, so a flood of addresses cannot grow
# memory without bound (a forgotten client starts over with a full allowance).
MAX_CLIENTS = 10_000


class RateLimited(UserFacingError):
    """The client has used up its runs for the current minute."""


class RateLimiter:
    """A sliding window: a client may start `per_minute` runs in any 60 s; 0 turns the limit off."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS) -> None:
        if per_minute < 0:
            raise ValueError(f"per_minute must be ≥ 0, got {per_minute}")
        self.per_minute, self.max_clients = per_minute, max_clients
        self._clock = clock
        self._starts: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> RateLimiter:
        """$FRAME_ARENA_RATE_LIMIT_PER_MIN runs per client per minute (default 20, 0 = no limit)."""
        raw = os.environ.get(RATE_LIMIT_ENV, "").strip()
        try:
            per_minute = int(raw) if raw else DEFAULT_PER_MINUTE
        except ValueError:
            raise ValueError(f"{RATE_LIMIT_ENV}={raw!r} is not a whole number") from None
        return cls(per_minute)

    def check(self, client: str) -> None:
        """Count one run for `client`, or raise RateLimited saying how long until the next one is allowed."""
        if not self.per_minute:
            return
        now = self._clock()
        with self._lock:
            starts = self._starts.pop(client, None) or deque()
            while starts and starts[0] <= now - WINDOW_S:
                starts.popleft()
            self._starts[client] = starts
            while len(self._starts) > self.max_clients:
                self._starts.popitem(last=False)
            if len(starts) >= self.per_minute:
                wait = max(1, math.ceil(starts[0] + WINDOW_S - now))
                raise RateLimited(
                    f"Too many requests, try again in {wait} s (the limit is {self.per_minute} runs per minute)."
                )
            starts.append(now)


def proxy_hops() -> int:
    """Reverse proxies in front of the app that append to X-Forwarded-For: $FRAME_ARENA_PROXY_HOPS, by default 1 on
    a Hugging Face Space ($SPACE_ID set), else 0."""
    raw = os.environ.get(PROXY_HOPS_ENV, "").strip()
    return int(raw) if raw else int(bool(os.environ.get("SPACE_ID")))


def client_address(request: Any, hops: int) -> str:
    """The rate limit's key for a gr.Request: with `hops` trusted proxies, the address the outermost one saw (the
    hops-th X-Forwarded-For entry from the right; entries further left are the client's own claim); else the peer."""
    if hops > 0:
        headers = getattr(request, "headers", None) or {}
        forwarded = [part.strip() for part in headers.get("x-forwarded-for", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"
