"""Rate limits by GCRA (the generic cell rate algorithm): the verdict is pure; one number per window.

Each (bucket, window) keeps one value, its TAT (theoretical arrival time, integer µs): the time at
which the window would be back to full if no call came. A window of `limit` calls per `seconds`
has an emission interval T = ceil(seconds / limit) (in µs) and a burst tolerance tau = (limit-1) T.
A call at `now` conforms when max(tat, now) - now <= tau; then tat becomes max(tat, now) + T.
A refused call changes nothing (refused calls are not counted), and the wait until a call would
conform is exactly max(tat, now) - now - tau, which `Retry-After` gives rounded up to whole seconds
(never 0). Memory is O(1) per window, whatever the limit.

What "N per period" means here, compared to the sliding log this replaced (tests/test_ratelimit.py
proves each line, the first three property-tested with hypothesis):
- a burst of N calls at once is allowed, then calls come back at one per T (N per period sustained);
- every sequence of calls the sliding log accepted, GCRA accepts too (when N divides the period in
  µs; otherwise T is rounded up by under 1 µs, on the publisher's side), so no client that kept to
  "N in any rolling period" is refused;
- but GCRA is NOT "at most N calls in any rolling window of the period": a window of length L
  holds at most N + ceil(L / T) - 1 calls, so a rolling period can hold up to 2N - 1 (a full burst
  at its start, then the N - 1 cells that refill before its end). Equivalence with a sliding window
  would need each call's time (the O(N) log); no O(1) state gives it. What does hold exactly: at
  most N calls in any span shorter than T, and at most N + k calls in any span shorter than (k+1) T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

US = 1_000_000  # TATs and `now` are integer microseconds


@dataclass(frozen=True, slots=True)
class Window:
    scope: str  # 'minute' | 'day'
    seconds: int
    limit: int

    @property
    def interval_us(self) -> int:
        """T: one cell's worth of time, rounded up so the sustained rate never exceeds the limit."""
        return -(-self.seconds * US // self.limit)

    @property
    def tolerance_us(self) -> int:
        """tau: how far ahead of `now` the TAT may be for a call to conform (a burst of `limit`)."""
        return (self.limit - 1) * self.interval_us


@dataclass(frozen=True, slots=True)
class LimitVerdict:
    allowed: bool
    scope: str | None  # the window that refused, or the tightest one when allowed
    limit: int
    remaining: int
    reset_seconds: int  # until the tightest window is back to full (RateLimit-Reset); refused: = retry
    retry_after: int = 0  # whole seconds, >= 1 when refused


@dataclass(frozen=True, slots=True)
class Decision:
    """One window's answer to one call at `now`."""

    allowed: bool
    tat: int  # the window's new TAT (unchanged when refused)
    wait_us: int  # refused: until a call would conform; allowed: 0
    remaining: int  # allowed: how many more calls would conform right now
    full_us: int  # allowed: until the window is back to full (new tat - now)


def windows_for(per_minute: int, per_day: int) -> tuple[Window, ...]:
    return (Window("minute", 60, per_minute), Window("day", 86_400, per_day))


def bucket(listing_id: int, user_id: int) -> str:
    """One (listing, consumer) pair's rate-limit bucket: the user, not the key or OAuth token, else every
    key a consumer mints (and every token an OAuth client refreshes) would come with a fresh allowance.
    The user comes first: it is the hash tag its Redis keys share with the user's wallets (rate_keys in
    addon/cache/redis.py)."""
    return f"u{user_id}:{listing_id}"


def decide(now: int, tat: int, w: Window) -> Decision:
    """GCRA for one window: `tat` is the stored TAT (0 or any past time for an idle window)."""
    if w.limit <= 0:
        return Decision(False, tat, w.seconds * US, 0, 0)
    t, tau = w.interval_us, w.tolerance_us
    base = max(tat, now)
    if base - now > tau:
        return Decision(False, tat, base - now - tau, 0, 0)
    new = base + t
    ahead = new - now
    remaining = (tau - ahead) // t + 1 if ahead <= tau else 0
    return Decision(True, new, 0, remaining, ahead)


def check(now: int, tats: Sequence[int], windows: Sequence[Window]) -> tuple[LimitVerdict, tuple[int, ...]]:
    """Decide one call over every window at once: counted in all of them or (refused) in none.

    Returns the verdict and the TATs to store (the old ones when refused)."""
    decisions = [decide(now, tat, w) for tat, w in zip(tats, windows, strict=True)]
    refused = [(d.wait_us, w) for d, w in zip(decisions, windows, strict=True) if not d.allowed]
    if refused:
        # Waiting changes no TAT, and a window that conforms now still conforms later: the call
        # fits exactly when the slowest refusing window lets it.
        wait, w = max(refused, key=lambda r: r[0])
        retry = max(1, _ceil_seconds(wait))
        return LimitVerdict(False, w.scope, w.limit, 0, retry, retry), tuple(tats)
    d, w = min(zip(decisions, windows, strict=True), key=lambda dw: dw[0].remaining)
    return (LimitVerdict(True, w.scope, w.limit, d.remaining, max(1, _ceil_seconds(d.full_us))),
            tuple(d.tat for d in decisions))


def _ceil_seconds(us: int) -> int:
    return -(-us // US)


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
