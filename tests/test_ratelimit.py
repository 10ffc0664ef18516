"""addon.ratelimit: sliding-window verdicts, exact Retry-After, and the RateLimit headers."""

from __future__ import annotations

import pytest

from addon.ratelimit import LimitVerdict, Window, headers, verdict, windows_for


class Limiter:
    """What a cache adapter does around `verdict`: keep each window's log of accepted calls."""

    def __init__(self, per_minute: int, per_day: int) -> None:
        self.windows = windows_for(per_minute, per_day)
        self.logs: list[list[float]] = [[] for _ in self.windows]

    def hit(self, now: float) -> LimitVerdict:
        v = verdict(self.logs, self.windows, now)
        if v.allowed:  # refused calls are not counted
            for log in self.logs:
                log.append(now)
        return v


T0 = 1_700_000_000.0  # an arbitrary instant; minute boundaries are T0 rounded to 60


def test_windows_for() -> None:
    assert windows_for(60, 10_000) == (Window("minute", 60, 60), Window("day", 86_400, 10_000))


@pytest.mark.parametrize("limit", [1, 2, 5, 60])
def test_n_calls_allowed_then_refused(limit: int) -> None:
    lim = Limiter(limit, 10_000)
    for i in range(limit):
        assert lim.hit(T0 + i * 0.1).allowed, f"call {i + 1} of {limit}"
    v = lim.hit(T0 + limit * 0.1)
    assert not v.allowed
    assert v.scope == "minute" and v.limit == limit and v.remaining == 0


def test_remaining_counts_down_on_the_tightest_window() -> None:
    lim = Limiter(5, 10_000)
    assert [lim.hit(T0 + i).remaining for i in range(5)] == [4, 3, 2, 1, 0]
    assert lim.hit(T0 + 5).remaining == 0


def test_remaining_and_scope_follow_the_day_window_when_it_is_tighter() -> None:
    lim = Limiter(60, 3)
    got = [lim.hit(T0 + i * 120) for i in range(3)]
    assert [(v.scope, v.limit, v.remaining) for v in got] == [("day", 3, 2), ("day", 3, 1), ("day", 3, 0)]


@pytest.mark.parametrize("elapsed, retry_after", [
    (0.0, 60), (0.001, 60), (0.5, 60), (0.999, 60), (1.0, 59), (1.001, 59), (30.0, 30),
    (58.5, 2), (59.0, 1), (59.001, 1), (59.999, 1),  # never 0, always rounded up
])
def test_retry_after_is_exact_whole_seconds_until_the_oldest_call_leaves(elapsed: float, retry_after: int) -> None:
    lim = Limiter(1, 10_000)
    assert lim.hit(T0).allowed
    v = lim.hit(T0 + elapsed)
    assert not v.allowed
    assert v.retry_after == retry_after
    assert v.reset_seconds == retry_after


def test_retry_after_waits_for_the_oldest_counted_call_not_the_newest() -> None:
    lim = Limiter(3, 10_000)
    for t in (0, 10, 20):
        assert lim.hit(T0 + t).allowed
    v = lim.hit(T0 + 25)
    assert (v.allowed, v.retry_after) == (False, 35)  # the call at 0 leaves at 60
    assert lim.hit(T0 + 59.9).allowed is False
    assert lim.hit(T0 + 60).allowed is True  # exactly when Retry-After said
    assert lim.hit(T0 + 60.5).allowed is False  # the calls at 10 and 20 still count, and the one at 60
    assert lim.hit(T0 + 70).allowed is True


def test_a_call_is_counted_for_exactly_the_window_length() -> None:
    lim = Limiter(1, 10_000)
    lim.hit(T0)
    assert not lim.hit(T0 + 59.999999).allowed
    assert lim.hit(T0 + 60).allowed


def test_the_window_slides_across_a_clock_minute_boundary() -> None:
    boundary = (T0 // 60 + 1) * 60  # the start of a clock minute
    lim = Limiter(10, 10_000)
    for i in range(10):  # all in the last 5 s of one clock minute
        assert lim.hit(boundary - 5 + i * 0.5).allowed
    # A fixed window would reset here; a sliding one still counts the 10 calls.
    v = lim.hit(boundary + 1)
    assert not v.allowed
    assert v.retry_after == 54  # the first call (at boundary - 5) leaves at boundary + 55
    assert lim.hit(boundary + 54.9).allowed is False
    assert lim.hit(boundary + 55).allowed is True


def test_calls_older_than_a_window_are_ignored_whatever_their_age() -> None:
    windows = windows_for(2, 10_000)
    old = [T0 - 100_000, T0 - 90_000, T0 - 61, T0 - 60]
    v = verdict([old, old], windows, T0)
    assert v.allowed and v.scope == "minute" and v.remaining == 1


def test_the_day_window_refuses_independently_of_the_minute_window() -> None:
    lim = Limiter(60, 3)
    for i in range(3):  # far apart: the minute window never fills
        assert lim.hit(T0 + i * 3600).allowed
    v = lim.hit(T0 + 3 * 3600)
    assert not v.allowed
    assert v.scope == "day" and v.limit == 3
    assert v.retry_after == 86_400 - 3 * 3600  # the first call of the day leaves the window
    assert not lim.hit(T0 + 86_399).allowed
    assert lim.hit(T0 + 86_400).allowed


def test_when_both_windows_refuse_the_larger_wait_wins() -> None:
    minute, day = Window("minute", 60, 2), Window("day", 86_400, 2)
    log = [T0, T0 + 30]
    v = verdict([log, log], [minute, day], T0 + 40)
    assert (v.allowed, v.scope, v.limit, v.retry_after) == (False, "day", 2, 86_360)
    v = verdict([log, log], [day, minute], T0 + 40)  # whatever the order of the windows
    assert (v.allowed, v.scope, v.retry_after) == (False, "day", 86_360)


def test_a_minute_refusal_with_room_in_the_day_reports_the_minute_wait() -> None:
    minute, day = Window("minute", 60, 2), Window("day", 86_400, 100)
    log = [T0, T0 + 30]
    v = verdict([log, log], [minute, day], T0 + 40)
    assert (v.allowed, v.scope, v.limit, v.remaining, v.retry_after) == (False, "minute", 2, 0, 20)


def test_a_zero_limit_always_refuses_with_a_whole_window_wait() -> None:
    v = verdict([[], []], [Window("minute", 60, 0), Window("day", 86_400, 10)], T0)
    assert (v.allowed, v.scope, v.retry_after) == (False, "minute", 60)


def test_reset_when_allowed_is_until_the_oldest_counted_call_leaves() -> None:
    windows = windows_for(5, 10_000)
    v = verdict([[], []], windows, T0)
    assert (v.allowed, v.reset_seconds, v.retry_after) == (True, 60, 0)
    log = [T0 - 50.5, T0 - 10]
    v = verdict([log, log], windows, T0)
    assert (v.allowed, v.remaining, v.reset_seconds) == (True, 2, 10)  # ceil(9.5)


def test_a_log_that_overshot_the_limit_waits_for_enough_calls_to_leave() -> None:
    # Another instance may have raced past the limit; the wait covers every surplus call.
    log = [T0 + 0, T0 + 5, T0 + 10, T0 + 15]
    v = verdict([log, log], windows_for(2, 10_000), T0 + 20)
    assert (v.allowed, v.retry_after) == (False, 50)  # calls at 0, 5 and 10 must leave: 10 + 60 - 20


# --- headers -----------------------------------------------------------------------------------

def test_headers_when_allowed() -> None:
    windows = windows_for(60, 10_000)
    v = verdict([[T0 - 30], [T0 - 30]], windows, T0)
    assert headers(v, windows) == {
        "RateLimit-Policy": "60;w=60, 10000;w=86400",
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "58",
        "RateLimit-Reset": "30",
    }


def test_headers_when_refused_carry_retry_after() -> None:
    windows = windows_for(1, 10_000)
    v = verdict([[T0 - 20.5], [T0 - 20.5]], windows, T0)
    assert headers(v, windows) == {
        "RateLimit-Policy": "1;w=60, 10000;w=86400",
        "RateLimit-Limit": "1",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "40",
        "Retry-After": "40",
    }


def test_remaining_header_is_never_negative() -> None:
    v = LimitVerdict(True, "minute", 5, -3, 10)
    assert headers(v, windows_for(5, 10))["RateLimit-Remaining"] == "0"
