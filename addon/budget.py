"""Bytes held for reading, all connections together. Pure.

Each buffer the gateway fills from a peer is bounded on its own (`max_body_bytes`, 4 x that for an
answer held whole, `max_event_bytes` for an SSE event), but connections and calls are not bounded in
number: N slow uploads before anything is authenticated, or N answers an upstream sends most of and
stalls, held N times a limit. A Budget counts what such buffers hold, so a limit can be put on all of
them together: READING for request bodies (`max_reading_bytes`), HOLDING for what is held of answers
(`max_holding_bytes`: a JSON answer held whole, an SSE event held until it ends).
"""

from __future__ import annotations

import weakref
from typing import Any


class Budget:
    def __init__(self) -> None:
        self.held = 0
        self._owners: dict[int, tuple[int, weakref.finalize]] = {}  # id(owner): bytes counted, its finalizer

    def reserve(self, n: int, limit: int) -> bool:
        """Count `n` more bytes, unless that would pass `limit`; the caller gives them back (`give`)."""
        if self.held + n > limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n

    def take(self, owner: Any, n: int, limit: int) -> bool:
        """`reserve` for `owner` (a flow): its bytes are given back by `release(owner)`, or when it is freed."""
        if not self.reserve(n, limit):
            return False
        key = id(owner)
        counted, finalizer = self._owners.get(key) or (0, weakref.finalize(owner, self._gone, key))
        self._owners[key] = (counted + n, finalizer)
        return True

    def release(self, owner: Any) -> None:
        if (entry := self._owners.pop(id(owner), None)) is not None:
            self.held -= entry[0]
            entry[1].detach()

    def _gone(self, key: int) -> None:  # an owner freed while counted (id(owner) is unique while it lives)
        if (entry := self._owners.pop(key, None)) is not None:
            self.held -= entry[0]


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
