"""budget.py: what buffers filled from peers hold, all connections together, and its users that are
pure (the SSE parser, the stream editor); the mitmproxy side is tested in test_adversarial_http."""

from __future__ import annotations

import gc
import json

from mitmproxy.test import tflow

from addon.budget import Budget, Share
from addon.sse import SseParser
from addon.stream_edit import StreamEditor


def test_a_budget_counts_each_owners_bytes_until_released_or_freed() -> None:
    reading = Budget()
    a, b = tflow.tflow(), tflow.tflow()
    assert reading.take(a, 600, limit=1000) and reading.take(a, 300, limit=1000)
    assert not reading.take(b, 200, limit=1000) and reading.held == 900  # refused: nothing counted
    reading.release(a)
    reading.release(a)  # twice: counted once
    assert reading.held == 0 and reading.take(b, 1000, limit=1000)
    del b
    gc.collect()
    assert reading.held == 0  # freed while counted (its connection gone some way no hook saw)


def test_a_share_gives_back_what_it_holds_when_told_or_freed() -> None:
    budget = Budget()
    one, two = Share(budget, 100), Share(budget, 100)
    assert one.reserve(60) and not two.reserve(50) and two.reserve(40) and budget.held == 100
    one.give_all()
    assert budget.held == 40
    del two
    gc.collect()
    assert budget.held == 0


def _answer(rpc_id: int, size: int) -> bytes:
    text = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {"content": [{"type": "text", "text": "x" * size}]}})
    return b"event: message\ndata: " + text.encode() + b"\n\n"


def test_an_event_past_the_parsers_share_is_scanned_and_still_answers() -> None:
    """An event held across chunks takes from the budget; once that is spent it is read on the fly by the
    scanner, as one over max_event_bytes is: memory stays bounded and its call still settles."""
    budget = Budget()
    crowded, parser = Share(budget, 50_000), SseParser(1 << 20, Share(budget, 50_000))
    assert crowded.reserve(45_000)  # others hold most of it
    event = _answer(7, 20_000)
    events = [e for i in range(0, len(event), 1000) for e in parser.feed(event[i:i + 1000])]
    assert len(events) == 1 and events[0].oversized and events[0].messages is not None
    assert events[0].messages[0].id_value() == 7 and events[0].messages[0].has_result
    assert budget.held == 45_000  # nothing left held by the parser
    crowded.give_all()
    parser = SseParser(1 << 20, Share(budget, 50_000))
    events = [e for i in range(0, len(event), 1000) for e in parser.feed(event[i:i + 1000])]
    assert len(events) == 1 and not events[0].oversized  # room again: held whole
    assert budget.held == 0


def test_an_editor_past_its_share_severs_a_stream_that_may_carry_a_refunded_answer() -> None:
    """Held to be blanked, an event the budget cannot hold is too big to hold: fail closed. Without
    anything to blank, it passes as it comes."""
    budget = Budget()
    crowded = Share(budget, 30_000)
    assert crowded.reserve(29_000)
    event = _answer(1, 10_000)
    for blanking, severed in ((True, True), (False, False)):
        editor = StreamEditor(None, lambda e: True, 1 << 20, lambda b=blanking: b, Share(budget, 30_000))
        parser, out = SseParser(1 << 20), b""
        for i in range(0, len(event), 1000):
            piece = event[i:i + 1000]
            events = parser.feed(piece)
            out += editor.feed(piece, events, parser.pending_from)
        assert editor.severed is severed and (out == b"" if severed else out == event)
        assert budget.held == 29_000


def test_a_full_budget_makes_room_by_closing_the_slowest_stalled_owners() -> None:
    """Bytes held by stalled bodies must not refuse every later body for ever: N uploads (no key needed)
    or answers (a publisher calling its own listing, refunded) that stall just under their limits spent
    the budget until their connections went idle (mitmproxy: 10 minutes), a 503 or 502 for everyone
    else meanwhile. When the budget is spent, owners that have gone on for EVICT_AFTER seconds below
    MIN_RATE or silent for as long are closed, slowest first, if that makes room; owners going at a fair
    rate are not."""
    from addon import budget as budgets
    now = [0.0]
    closed: list[object] = []
    budget = Budget(lambda flow, context: lambda: closed.append(flow), clock=lambda: now[0])
    stalled, fast, young, late = (tflow.tflow() for _ in range(4))
    assert budget.take(stalled, 400, limit=1000) and budget.take(fast, 100, limit=1000)
    now[0] = budgets.EVICT_AFTER + 1
    assert budget.take(young, 300, limit=1000)
    fast_bytes = int(budgets.MIN_RATE * (budgets.EVICT_AFTER + 1))
    assert budget.take(fast, fast_bytes, limit=10**9)  # its rate, from its first byte: above MIN_RATE
    full = budget.held + 10**6
    assert not budget.take(late, 10**6, limit=full - 401) and closed == []  # closing all the slow would not do
    assert budget.take(late, 10**6, limit=full - 350) and closed == [stalled]  # the stalled one is enough
    assert budget.held == 100 + fast_bytes + 300 + 10**6
    budget.release(stalled)  # its connection's end, later: counted once
    assert budget.held == 100 + fast_bytes + 300 + 10**6
    assert not budget.take(tflow.tflow(), 10**10 + 1, limit=10**10) and closed == [stalled]  # no room: none closed

    now[0], closed[:] = 0.0, []
    silent = Budget(lambda flow, context: (lambda: closed.append(flow)) if context is None else None,
                    clock=lambda: now[0])
    burst = tflow.tflow()
    kept = tflow.tflow()
    assert silent.take(kept, 10**8, limit=2 * 10**8, context=silent)  # its closer refuses to close it (its context)
    assert silent.take(burst, 10**8, limit=2 * 10**8)  # fast, then nothing: closed once silent long enough
    now[0] = budgets.EVICT_AFTER - 0.1
    assert not silent.take(tflow.tflow(), 1, limit=2 * 10**8) and closed == []
    now[0] = budgets.EVICT_AFTER
    assert not silent.take(tflow.tflow(), 10**8 + 1, limit=2 * 10**8) and closed == []  # kept cannot go
    assert silent.take(tflow.tflow(), 1, limit=2 * 10**8) and closed == [burst] and silent.held == 10**8 + 1


def test_a_full_budget_forgets_owners_whose_flows_ended_unseen() -> None:
    """A body cut off where no hook or protocol error tells the budget (mitmproxy's body_size_limit,
    say) stays counted while its flow lives, and mitmweb keeps flows for ever: when the budget is spent,
    owners whose flows are no longer live hold nothing and are forgotten, with no connection closed."""
    closed: list[object] = []
    budget = Budget(lambda flow, context: lambda: closed.append(flow))
    ended, running = tflow.tflow(), tflow.tflow()
    assert budget.take(ended, 600, limit=1000) and budget.take(running, 300, limit=1000)
    ended.live = False  # mitmproxy gave up on it and cleared its buffer; the flow is kept
    new = tflow.tflow()
    assert budget.take(new, 600, limit=1000) and closed == [] and budget.held == 900
    assert not budget.take(tflow.tflow(), 200, limit=1000)  # the running owners stay counted
    share = Share(budget, 1000)  # not a flow: always live to the budget
    assert not share.reserve(200) and budget.held == 900
