"""Caches and rate-limit windows, behind one async interface (in-process or Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Final, Protocol

from ..model import Consumer, Listing
from ..ratelimit import LimitVerdict, Window
from .breaker import CircuitStore


class _Miss(Enum):  # an enum, so that type checkers narrow `value is MISS`
    MISS = "MISS"

    def __repr__(self) -> str:
        return "MISS"


MISS: Final = _Miss.MISS  # not cached; distinct from a cached None (known not to exist)


class Cache(CircuitStore, Protocol):
    async def get_consumer(self, key_hash: str) -> Consumer | None | _Miss: ...

    async def put_consumer(self, key_hash: str, consumer: Consumer | None) -> None:
        """None caches 'no such key' for the negative TTL, which slows key guessing."""

    async def get_listing(self, slug: str) -> Listing | None | _Miss: ...

    async def put_listing(self, slug: str, listing: Listing | None) -> None: ...

    async def hit(self, bucket: str, windows: Sequence[Window]) -> LimitVerdict:
        """Count one call in every window of `bucket` if all have room; refused calls don't count."""

    async def bind_session(self, listing_id: int, session_id: str, principal: str) -> None:
        """Remember which consumer opened an MCP session of a listing. Per listing: session ids are
        the upstreams', and two listings' upstreams may hand out the same one."""

    async def session_owner(self, listing_id: int, session_id: str) -> str | None: ...

    # --- Idempotency-Key records (addon/cache/idempotency.py) ---------------------------------

    async def idem_claim(self, key: str, claim: str, ttl_seconds: float) -> str | None:
        """Claim `key` (atomic SET NX with a TTL): None when claimed, else the record it holds."""

    async def idem_finish(self, key: str, claim: str, record: str, ttl_seconds: float = ...) -> bool:
        """Replace our claim (compared exactly) by the stored answer; False if it is not ours any more."""

    async def idem_release(self, key: str, claim: str) -> bool:
        """Delete our claim (compared exactly), so a retry runs normally."""

    async def health(self) -> dict[str, object]: ...

    async def close(self) -> None: ...
