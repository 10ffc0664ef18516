"""addon.ratelimit: GCRA verdicts, exact Retry-After, what GCRA's burst allows, and the RateLimit headers."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings, strategies as st

from addon.ratelimit import US, LimitVerdict, Window, check, decide, headers, windows_for


class Limiter:
    """What a cache adapter does around `check`: keep each window's TAT (refused calls keep them)."""

    def __init__(self, per_minute: int, per_day: int, windows: tuple[Window, ...] | None = None) -> None:
        self.windows = windows or windows_for(per_minute, per_day)
        self.tats: tuple[int, ...] = tuple(0 for _ in self.windows)

    def hit(self, now: float) -> LimitVerdict:
        v, self.tats = check(round(now * US), self.tats, self.windows)
        return v


T0 = 1_700_000_000.0  # an arbitrary instant; minute boundaries are T0 rounded to 60


def test_windows_for() -> None:
    assert windows_for(60, 10_000) == (Window("minute", 60, 60), Window("day", 86_400, 10_000))


def test_a_cell_is_the_period_over_the_limit_rounded_up_to_a_microsecond() -> None:
    assert (Window("minute", 60, 60).interval_us, Window("minute", 60, 60).tolerance_us) == (US, 59 * US)
    assert Window("day", 86_400, 7).interval_us == 12_342_857_143  # 86400e6 / 7 = ...142.86


@pytest.mark.parametrize("limit", [1, 2, 5, 60])
def test_n_calls_allowed_then_refused(limit: int) -> None:
    lim = Limiter(limit, 10_000)
    for i in range(limit):
        assert lim.hit(T0).allowed, f"call {i + 1} of {limit}"  # a burst of N at one instant
    v = lim.hit(T0)
    assert not v.allowed
    assert v.scope == "minute" and v.limit == limit and v.remaining == 0


def test_remaining_counts_down_on_the_tightest_window() -> None:
    lim = Limiter(5, 10_000)
    assert [lim.hit(T0).remaining for i in range(5)] == [4, 3, 2, 1, 0]
    assert lim.hit(T0).remaining == 0


def test_remaining_and_scope_follow_the_day_window_when_it_is_tighter() -> None:
    lim = Limiter(60, 3)
    got = [lim.hit(T0 + i * 120) for i in range(3)]
    assert [(v.scope, v.limit, v.remaining) for v in got] == [("day", 3, 2), ("day", 3, 1), ("day", 3, 0)]


@pytest.mark.parametrize("elapsed, retry_after", [
    (0.0, 60), (0.000001, 60), (0.5, 60), (0.999, 60), (1.0, 59), (1.001, 59), (30.0, 30),
    (58.5, 2), (59.0, 1), (59.001, 1), (59.999999, 1),  # never 0, always rounded up
])
def test_retry_after_is_exact_whole_seconds_until_the_next_cell(elapsed: float, retry_after: int) -> None:
    lim = Limiter(1, 10_000)
    assert lim.hit(T0).allowed
    v = lim.hit(T0 + elapsed)
    assert not v.allowed
    assert v.retry_after == retry_after
    assert v.reset_seconds == retry_after


def test_retry_after_is_when_the_call_fits_and_not_a_microsecond_earlier() -> None:
    lim = Limiter(3, 10_000)  # a cell is 20 s, the tolerance two cells (40 s)
    for _ in range(3):
        assert lim.hit(T0).allowed  # TAT T0 + 60
    v = lim.hit(T0 + 5)
    assert (v.allowed, v.retry_after) == (False, 15)  # conforms once TAT - now <= 40 s, at T0 + 20
    assert lim.hit(T0 + 19.999999).allowed is False
    assert lim.hit(T0 + 20).allowed is True  # exactly when Retry-After said; TAT T0 + 80
    assert lim.hit(T0 + 20.5).allowed is False
    assert lim.hit(T0 + 40).allowed is True


def test_one_call_per_period_is_counted_for_exactly_the_period() -> None:
    lim = Limiter(1, 10_000)
    lim.hit(T0)
    assert not lim.hit(T0 + 59.999999).allowed
    assert lim.hit(T0 + 60).allowed


def test_crossing_a_clock_minute_gives_nothing_back() -> None:
    boundary = (T0 // 60 + 1) * 60  # the start of a clock minute
    lim = Limiter(10, 10_000)  # a cell is 6 s
    for i in range(10):  # all in the last 5 s of one clock minute
        assert lim.hit(boundary - 5 + i * 0.5).allowed
    # A fixed window would hand out 10 more here; GCRA refills one cell 6 s after the burst began.
    v = lim.hit(boundary + 0.5)
    assert (v.allowed, v.retry_after) == (False, 1)
    assert lim.hit(boundary + 0.999999).allowed is False
    assert lim.hit(boundary + 1).allowed is True
    assert lim.hit(boundary + 1).allowed is False


def test_an_idle_window_is_full_whatever_the_age_of_its_tat() -> None:
    windows = windows_for(2, 10_000)
    for stale in (0, round(T0 * US) - 100_000 * US, round(T0 * US)):
        v, _ = check(round(T0 * US), (stale, stale), windows)
        assert v.allowed and v.scope == "minute" and v.remaining == 1


def test_the_day_window_refuses_independently_of_the_minute_window() -> None:
    lim = Limiter(60, 3)  # a day cell is 8 h
    for i in range(3):  # far apart: the minute window never fills
        assert lim.hit(T0 + i * 60).allowed
    v = lim.hit(T0 + 3 * 60)
    assert not v.allowed
    assert v.scope == "day" and v.limit == 3
    assert v.retry_after == 8 * 3600 - 3 * 60  # the day's first cell refills 8 h after the burst
    assert not lim.hit(T0 + 8 * 3600 - 0.000001).allowed
    assert lim.hit(T0 + 8 * 3600).allowed


def test_when_both_windows_refuse_the_larger_wait_wins() -> None:
    minute, day = Window("minute", 60, 2), Window("day", 86_400, 2)
    now = round(T0 * US)
    tats = (now + 60 * US, now + 86_400 * US)  # two calls just now in each
    v, kept = check(now, tats, (minute, day))
    assert (v.allowed, v.scope, v.limit, v.retry_after) == (False, "day", 2, 43_200)
    assert kept == tats
    v, _ = check(now, tats[::-1], (day, minute))  # whatever the order of the windows
    assert (v.allowed, v.scope, v.retry_after) == (False, "day", 43_200)


def test_a_minute_refusal_with_room_in_the_day_reports_the_minute_wait() -> None:
    minute, day = Window("minute", 60, 2), Window("day", 86_400, 100)
    now = round(T0 * US)
    v, _ = check(now, (now + 50 * US, now + 10 * US), (minute, day))
    assert (v.allowed, v.scope, v.limit, v.remaining, v.retry_after) == (False, "minute", 2, 0, 20)


def test_a_zero_limit_always_refuses_with_a_whole_window_wait() -> None:
    v, _ = check(round(T0 * US), (0, 0), [Window("minute", 60, 0), Window("day", 86_400, 10)])
    assert (v.allowed, v.scope, v.retry_after) == (False, "minute", 60)


def test_reset_when_allowed_is_until_the_window_is_full_again() -> None:
    windows = windows_for(5, 10_000)  # a minute cell is 12 s
    now = round(T0 * US)
    v, _ = check(now, (0, 0), windows)
    assert (v.allowed, v.remaining, v.reset_seconds, v.retry_after) == (True, 4, 12, 0)
    v, _ = check(now, (now + 9_500_000, 0), windows)
    assert (v.allowed, v.remaining, v.reset_seconds) == (True, 3, 22)  # ceil(9.5 + 12)


def test_a_tat_that_overshot_waits_for_every_surplus_cell() -> None:
    # A publisher lowered the limit (or another instance raced): the wait covers the whole surplus.
    now = round(T0 * US)
    v, _ = check(now, (now + 240 * US, 0), windows_for(2, 10_000))  # 8 calls' worth at 2/min
    assert (v.allowed, v.retry_after) == (False, 210)  # until TAT - tolerance (30 s)


# --- GCRA against a sliding window, property-tested ------------------------------------------

def run(times: list[int], w: Window) -> list[int]:
    """The accepted calls among `times` (sorted µs) through one window."""
    tat, accepted = 0, []
    for t in times:
        d = decide(t, tat, w)
        assert d.allowed or d.tat == tat  # a refused call changes nothing
        if d.allowed:
            tat = d.tat
            accepted.append(t)
    return accepted


def arrivals(max_gap_us: int) -> st.SearchStrategy[list[int]]:
    gaps = st.lists(st.one_of(st.just(0), st.integers(0, max_gap_us)), min_size=1, max_size=120)
    return gaps.map(lambda g: [1_700_000_000 * US + sum(g[: i + 1]) for i in range(len(g))])


windows_st = st.builds(Window, st.just("minute"), st.integers(1, 120), st.integers(1, 12))


@settings(max_examples=300, deadline=None)
@given(w=windows_st, data=st.data())
def test_gcra_admits_at_most_n_plus_ceil_l_over_t_minus_1_in_any_window_of_length_l(w: Window, data) -> None:
    """The exact bound: accepted calls i < j are at least (j - i + 1 - N) cells apart. Hence at most N
    calls in any span shorter than one cell, and at most 2N - 1 in any rolling window of the period."""
    times = data.draw(arrivals(3 * w.seconds * US // w.limit))
    got = run(times, w)
    t, n, period = w.interval_us, w.limit, w.seconds * US
    for i in range(len(got)):
        for j in range(i + 1, len(got)):
            assert got[j] - got[i] >= (j - i + 1 - n) * t
        in_period = sum(1 for x in got[i:] if x < got[i] + period)
        assert in_period <= 2 * n - 1
        assert sum(1 for x in got[i:] if x < got[i] + t) <= n


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_a_rolling_period_can_hold_2n_minus_1_calls_so_gcra_is_not_a_sliding_window(n: int) -> None:
    w = Window("minute", 60, n)
    start = round(T0 * US)
    times = [start] * n + [start + k * w.interval_us for k in range(1, n)]  # a burst, then each refill
    assert run(times, w) == times
    assert all(x < start + 60 * US for x in times) and len(times) == 2 * n - 1


def sliding_log(times: list[int], w: Window) -> list[int]:
    accepted: list[int] = []
    for t in times:
        if sum(1 for a in accepted if a > t - w.seconds * US) < w.limit:
            accepted.append(t)
    return accepted


@settings(max_examples=300, deadline=None)
@given(w=windows_st, data=st.data())
def test_gcra_accepts_every_sequence_the_sliding_log_accepted(w: Window, data) -> None:
    """No client that kept to "N in any rolling period" is refused by GCRA (N dividing the period in µs:
    otherwise a cell is rounded up by under 1 µs, which can refuse such a client by that much)."""
    assume(w.seconds * US % w.limit == 0)
    kept = sliding_log(data.draw(arrivals(2 * w.seconds * US // w.limit)), w)
    assert run(kept, w) == kept


@settings(max_examples=300, deadline=None)
@given(per_minute=st.integers(0, 6), per_day=st.integers(0, 9), data=st.data())
def test_retry_after_is_exact_and_refusals_change_nothing(per_minute: int, per_day: int, data) -> None:
    """Over two windows: a refused call keeps every TAT; it would fit Retry-After seconds later, and
    (when that is more than one second) not a second earlier; an accepted call advances every TAT."""
    windows = (Window("minute", 60, per_minute), Window("day", 600, per_day))
    tats: tuple[int, ...] = (0, 0)
    for now in data.draw(arrivals(40 * US)):
        v, new = check(now, tats, windows)
        if not v.allowed:
            assert new == tats and v.retry_after >= 1 and v.reset_seconds == v.retry_after
            if min(per_minute, per_day) == 0:  # a zero limit refuses for ever
                continue
            assert check(now + v.retry_after * US, tats, windows)[0].allowed
            if v.retry_after > 1:
                assert not check(now + (v.retry_after - 1) * US, tats, windows)[0].allowed
        else:
            assert all(b > a for a, b in zip(tats, new, strict=True))
        tats = new


# --- headers -----------------------------------------------------------------------------------

def test_headers_when_allowed() -> None:
    windows = windows_for(60, 10_000)
    now = round(T0 * US)
    v, _ = check(now, (now - 30 * US, 0), windows)
    assert headers(v, windows) == {
        "RateLimit-Policy": "60;w=60, 10000;w=86400",
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "59",
        "RateLimit-Reset": "1",
    }


def test_headers_when_refused_carry_retry_after() -> None:
    windows = windows_for(1, 10_000)
    now = round(T0 * US)
    v, _ = check(now, (now + 39_500_000, 0), windows)
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
