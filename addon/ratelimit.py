"""Sliding-window rate limits: the verdict is pure; the windows' state lives in a cache adapter.

Each window keeps the times of the calls it let through (a sliding log), so "N per
minute" holds over every 60-second span, not per clock minute, and Retry-After is the
exact moment the oldest counted call leaves the window. Refused calls are not counted.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    scope: str  # 'minute' | 'day'
    seconds: int
    limit: int


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    allowed: bool
    scope: str | None  # the window that refused, or the tightest one when allowed
    limit: int
    remaining: int
    reset_seconds: int  # until the tightest window has room again (RateLimit-Reset)
    retry_after: int = 0  # whole seconds, >= 1 when refused


def windows_for(per_minute: int, per_day: int) -> tuple[Window, ...]:
    return (Window("minute", 60, per_minute), Window("day", 86_400, per_day))


def verdict(logs: Sequence[Sequence[float]], windows: Sequence[Window], now: float) -> LimitVerdict:
    """Decide one call given each window's log of accepted call times (oldest first, any age)."""
    refused: list[tuple[float, Window]] = []
    tightest: tuple[int, int, Window] | None = None
    for log, w in zip(logs, windows, strict=True):
        start = bisect.bisect_right(log, now - w.seconds)  # calls older than the window don't count
        count = len(log) - start
        if count >= w.limit:
            # The call fits once enough of the oldest calls have aged out of the window.
            frees_at = log[start + count - w.limit] + w.seconds if w.limit > 0 else now + w.seconds
            refused.append((frees_at - now, w))
            continue
        remaining = w.limit - count - 1
        reset = math.ceil(log[start] + w.seconds - now) if count else w.seconds
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, reset, w)
    if refused:
        wait, w = max(refused, key=lambda r: r[0])
        retry = max(1, math.ceil(wait))
        return LimitVerdict(False, w.scope, w.limit, 0, retry, retry)
    assert tightest is not None
    remaining, reset, w = tightest
    return LimitVerdict(True, w.scope, w.limit, remaining, max(reset, 1))


def headers(v: LimitVerdict, windows: Sequence[Window]) -> dict[str, str]:
    """IETF draft RateLimit headers, plus Retry-After on refusals."""
    h = {
        "RateLimit-Policy": ", ".join(f"{w.limit};w={w.seconds}" for w in windows),
        "RateLimit-Limit": str(v.limit),
        "RateLimit-Remaining": str(max(v.remaining, 0)),
        "RateLimit-Reset": str(v.reset_seconds),
    }
    if not v.allowed:
        h["Retry-After"] = str(v.retry_after)
    return h
