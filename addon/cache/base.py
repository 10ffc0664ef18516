"""Caches and rate-limit windows, behind one async interface (in-process or Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from ..model import Consumer, Listing
from ..ratelimit import LimitVerdict, Window


class _Miss:
    def __repr__(self) -> str:
        return "MISS"


MISS: Final = _Miss()  # not cached; distinct from a cached None (known not to exist)


class Cache(Protocol):
    async def get_consumer(self, key_hash: str) -> Consumer | None | _Miss: ...

    async def put_consumer(self, key_hash: str, consumer: Consumer | None) -> None:
        """None caches 'no such key' for the negative TTL, which slows key guessing."""

    async def get_listing(self, slug: str) -> Listing | None | _Miss: ...

    async def put_listing(self, slug: str, listing: Listing | None) -> None: ...

    async def hit(self, bucket: str, windows: Sequence[Window]) -> LimitVerdict:
        """Count one call in every window of `bucket` if all have room; refused calls don't count."""

    async def bind_session(self, session_id: str, principal: str) -> None:
        """Remember which consumer opened an MCP session."""

    async def session_owner(self, session_id: str) -> str | None: ...

    async def health(self) -> dict[str, object]: ...

    async def close(self) -> None: ...
