"""A table bounded in all and per consumer: one consumer's entries cannot push out another's.

deferred.py remembers, for a while, what other consumers' money depends on (a task's end seen early,
a task call on its way, a tasks/result request awaiting its answer). A table bounded only in all lets
one consumer, at its rate limit, evict every other consumer's entries; here an owner (a user id) past
its share loses its own oldest entry instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Shares(Generic[K, V]):
    """A map of at most `limit()` entries, at most `share()` of them one owner's, oldest out first.

    A new entry of an owner at its share evicts that owner's oldest; one that finds the table full
    evicts the oldest of all (with shares of a tenth, only ten owners or more fill it). With a `ttl`,
    an entry older than that is gone: never returned, and dropped as new ones come. The bounds are
    read at each put (they are module constants, patched by the tests). Each operation is O(1),
    dropping expired entries amortised (each entry is dropped once)."""

    def __init__(self, limit: Callable[[], int], share: Callable[[], int], ttl: float | None = None) -> None:
        self._limit, self._share, self._ttl = limit, share, ttl
        self._entries: dict[K, tuple[int, V, float]] = {}  # owner, value, when put: oldest first
        self._owned: dict[int, dict[K, None]] = {}  # each owner's keys, oldest first; no empty ones

    def put(self, key: K, owner: int, value: V) -> None:
        """Remember `value` under `key` as `owner`'s newest entry (put again, it is the newest)."""
        now = time.monotonic()
        self._drop_expired(now)
        self.pop(key)
        owned = self._owned.get(owner)
        if owned and len(owned) >= self._share():
            self.pop(next(iter(owned)))
        if self._entries and len(self._entries) >= self._limit():
            self.pop(next(iter(self._entries)))
        self._entries[key] = owner, value, now
        self._owned.setdefault(owner, {})[key] = None

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None or self._expired(entry, time.monotonic()) else entry[1]

    def owner(self, key: K) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def pop(self, key: K) -> V | None:
        """Forget `key`; its value unless it had expired."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        owned = self._owned[entry[0]]
        del owned[key]
        if not owned:
            del self._owned[entry[0]]
        return None if self._expired(entry, time.monotonic()) else entry[1]

    def owned(self, owner: int) -> int:
        """How many entries `owner` has (expired ones not dropped yet included)."""
        return len(self._owned.get(owner, ()))

    def items(self) -> list[tuple[K, V]]:
        """A copy: for the sweeper's turn (not per call)."""
        return [(key, entry[1]) for key, entry in self._entries.items()]

    def _expired(self, entry: tuple[int, V, float], now: float) -> bool:
        return self._ttl is not None and entry[2] + self._ttl <= now

    def _drop_expired(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not self._expired(entry, now):
                return
            self.pop(key)

    def __repr__(self) -> str:
        return f"Shares({ {key: entry[1] for key, entry in self._entries.items()} !r})"

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
