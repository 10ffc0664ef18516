"""Bytes held for reading, all connections together. Pure.

Each buffer the gateway fills from a peer is bounded on its own (`max_body_bytes`, 4 x that for an
answer held whole, `max_event_bytes` for an SSE event), but connections and calls are not bounded in
number: N slow uploads before anything is authenticated, or N answers an upstream sends most of and
stalls, held N times a limit. A Budget counts what such buffers hold, so a limit can be put on all of
them together: READING for request bodies (`max_reading_bytes`), HOLDING for what is held of answers
(`max_holding_bytes`: a JSON answer held whole, an SSE event held until it ends).
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# A holder of a budget (a request body, an answer held whole) may be closed when the budget is spent, to
# make room, once it has gone on EVICT_AFTER seconds and either received nothing for as long or averages
# below MIN_RATE since its first byte (a trickle after a burst): else stalled holders keep the budget
# until their connections go idle (mitmproxy's tcp_timeout, 10 minutes) or their calls time out (up to
# 300 s), and every other body meanwhile is refused.
EVICT_AFTER = 5.0  # seconds
MIN_RATE = 256 * 1024  # bytes per second
EVICT_SCAN = 64  # holders looked at per refusal, oldest first: bounded work, and stalled holders are old
# closer(owner, context): what closes a stalled owner (its connection...), or None if it may not be closed.
Closer = Callable[[Any, Any], Callable[[], object] | None]


@dataclass(slots=True)
class _Holder:
    counted: int
    started: float
    last: float  # when its latest bytes came
    owner: weakref.ref[Any]
    context: weakref.ref[Any] | None  # what its closer needs to know (its HTTP layer), if anything
    finalizer: weakref.finalize


class Budget:
    def __init__(self, closer: Closer | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.held = 0
        self.closer = closer  # set by compat.install: closing a connection is mitmproxy's business
        self._clock = clock
        self._owners: dict[int, _Holder] = {}  # id(owner) -> what it holds; oldest first byte first

    def take(self, owner: Any, n: int, limit: int, context: Any = None) -> bool:
        """Count `n` more bytes of `owner` (a flow, a Share), unless that would pass `limit`: given back by
        `release(owner)`, or when it is freed.
        Past `limit`, the slowest stalled owners are closed first if that makes room (`closer`)."""
        key = id(owner)
        if self.held + n > limit and not self._make_room(self.held + n - limit, key):
            return False
        self.held += n
        holder = self._owners.get(key)
        if holder is None:
            holder = self._owners[key] = _Holder(0, self._clock(), 0.0, weakref.ref(owner),
                                                 None if context is None else weakref.ref(context),
                                                 weakref.finalize(owner, self._drop, key))
        holder.counted += n
        holder.last = self._clock()
        return True

    def release(self, owner: Any) -> None:
        self._drop(id(owner))

    def _drop(self, key: int) -> _Holder | None:
        """Forget an owner: released, closed, or freed while counted (its finalizer: id(owner) is unique
        while it lives, and detaching a finalizer that is running does nothing)."""
        if (holder := self._owners.pop(key, None)) is not None:
            self.held -= holder.counted
            holder.finalizer.detach()
        return holder

    def _make_room(self, need: int, own: int) -> bool:
        """Close the slowest stalled owners holding at least `need` bytes, if there are such; else none.
        Owners whose flows ended where nothing released them (mitmproxy's body_size_limit...) hold no
        buffer any more: they are forgotten first (mitmweb keeps flows, so they would count for ever)."""
        for key, holder in list(itertools.islice(self._owners.items(), EVICT_SCAN)):
            if key != own and not getattr(holder.owner(), "live", True):  # (a Share has no `live`)
                self._drop(key)
                need -= holder.counted
        if need <= 0:
            return True
        if self.closer is None:
            return False
        now = self._clock()
        slow = sorted((holder.counted / (now - holder.started), key)
                      for key, holder in itertools.islice(self._owners.items(), EVICT_SCAN)
                      if key != own and now - holder.started >= EVICT_AFTER
                      and (now - holder.last >= EVICT_AFTER or holder.counted < MIN_RATE * (now - holder.started)))
        chosen: list[tuple[int, Callable[[], object]]] = []
        freed = 0
        for _, key in slow:
            if freed >= need:
                break
            holder = self._owners[key]
            owner, context = holder.owner(), holder.context() if holder.context is not None else None
            if owner is not None and (close := self.closer(owner, context)) is not None:
                chosen.append((key, close))
                freed += holder.counted
        if freed < need:
            return False
        for key, close in chosen:
            self._drop(key)
            close()
        return True


READING = Budget()  # request bodies, before their `request` hook
HOLDING = Budget()  # answers: held whole before their `response` hook, or an SSE event until it ends


class Share:
    """One holder's part of a Budget under a limit (an SSE parser's event, an editor's held bytes): what
    it reserved is given back when it says so, or when it is freed."""

    def __init__(self, budget: Budget, limit: int) -> None:
        self.budget, self.limit = budget, limit

    def reserve(self, n: int) -> bool:
        return self.budget.take(self, n, self.limit)

    def give_all(self) -> None:
        self.budget.release(self)


def holding(config: Any) -> Share | None:
    """A share of HOLDING under the gateway's `max_holding_bytes` (None: no config, nothing bounded)."""
    return None if config is None else Share(HOLDING, config.max_holding_bytes)
