"""The circuit breakers as the gateway uses them: admit a call, record how the upstream did.

State lives in the cache (addon/cache/breaker.py), shared by every gateway on Redis. Each gateway
keeps a near copy per listing, read again at most every REFRESH_SECONDS, so a healthy listing's
calls cost no round trip and no write: the cache is written only on a failure, on the success that
closes a circuit, and to claim a half-open circuit's probe. Another gateway's verdict therefore
reaches this one within REFRESH_SECONDS. The database is never involved.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from .billing import Failure
from .breaker import CLOSED, BreakerConfig, Circuit, CircuitState, state, upstream_failed
from .cache.breaker import CircuitStore
from .errors import GatewayError
from .model import Listing

log = logging.getLogger("mcpmeter")

REFRESH_SECONDS = 1.0


class Circuits:
    def __init__(self, cache: Callable[[], CircuitStore | None], config: Callable[[], BreakerConfig | None],
                 on_change: Callable[[str, str], None] = lambda slug, state: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._cache, self._config, self._on_change, self._clock = cache, config, on_change, clock
        self._near: dict[int, tuple[Circuit, float, str]] = {}  # listing id -> (circuit, read at, slug)
        self._reading: dict[int, asyncio.Future[Circuit]] = {}  # the one read in flight per listing

    async def admit(self, listing: Listing, priced: bool, token: str = "1") -> bool:
        """Refuse a priced call to an open circuit (503 upstream_unavailable); let one probe through.

        True when this call (named by `token`) is a half-open circuit's probe: it holds the one slot
        until its outcome is recorded, or `release` frees it (a call refused before it is forwarded,
        or one whose end says nothing of the upstream, must not hold it for a whole cool-down)."""
        config, cache = self._config(), self._cache()
        if not priced or config is None or cache is None:
            return False
        settings = config.for_listing(listing.slug)
        if settings.failures <= 0:
            return False
        circuit = await self._read(cache, listing)
        now = self._clock()
        current = state(circuit, now)
        if current is CircuitState.CLOSED:
            return False
        if current is CircuitState.HALF_OPEN and await cache.circuit_probe(
                listing.id, settings.cooldown_seconds, now, token):
            log.warning("mcpmeter: circuit of %s half-open: letting one probe call through", listing.slug)
            return True
        retry = max(1, math.ceil(circuit.open_until - now)) if current is CircuitState.OPEN else 1
        raise GatewayError("upstream_unavailable", headers={"Retry-After": str(retry)}, retry_after=retry)

    async def closed(self, listing: Listing) -> bool:
        """Whether `admit` lets a priced call of this listing through without a probe slot or a refusal:
        no breaker, or its circuit closed (the near copy `admit` reads too)."""
        config, cache = self._config(), self._cache()
        if config is None or cache is None or config.for_listing(listing.slug).failures <= 0:
            return True
        return state(await self._read(cache, listing), self._clock()) is CircuitState.CLOSED

    async def release(self, listing: Listing, token: str) -> None:
        """Free the probe slot `token` holds, if it still does. Never raises."""
        try:
            cache = self._cache()
            if cache is not None:
                await cache.circuit_release_probe(listing.id, token)
        except Exception:
            log.exception("mcpmeter: releasing the circuit probe of %s failed", listing.slug)

    async def record(self, listing: Listing | None, consumer: int, status: int | None, failure: Failure | None,
                     probe: str | None = None) -> None:
        """How the upstream did on a forwarded call of `consumer` (the user id; `probe`: the call's token,
        if it was the probe). Never raises."""
        try:
            config, cache = self._config(), self._cache()
            if listing is None or config is None or cache is None:
                return
            failed = upstream_failed(status, failure)
            settings = config.for_listing(listing.slug)
            if failed is None and probe is not None:  # a cancelled or abandoned probe: let another one try
                await self.release(listing, probe)
            if failed is None or settings.failures <= 0:
                return
            if failed:
                self._remember(listing, await cache.circuit_failed(listing.id, settings, self._clock(), consumer))
            elif (await self._read(cache, listing)).failures > 0:
                await cache.circuit_reset(listing.id)
                self._remember(listing, CLOSED)
        except Exception:
            log.exception("mcpmeter: recording the circuit of %s failed", listing and listing.slug)

    def snapshot(self) -> dict[str, str]:
        """The circuits this gateway last saw not closed, by slug (for /health)."""
        now = self._clock()
        return {slug: str(state(c, now)) for c, _, slug in self._near.values()
                if state(c, now) is not CircuitState.CLOSED}

    async def _read(self, cache: CircuitStore, listing: Listing) -> Circuit:
        """The near copy, read again when older than REFRESH_SECONDS: one read for all waiting calls."""
        near = self._near.get(listing.id)
        if near is not None and time.monotonic() - near[1] < REFRESH_SECONDS:
            return near[0]
        reading = self._reading.get(listing.id)
        if reading is None:
            reading = self._reading[listing.id] = asyncio.ensure_future(self._fetch(cache, listing))
            reading.add_done_callback(lambda _: self._reading.pop(listing.id, None))
        return await asyncio.shield(reading)

    async def _fetch(self, cache: CircuitStore, listing: Listing) -> Circuit:
        try:
            circuit = await cache.circuit(listing.id)
        except Exception:  # the caches fall back rather than raise; should one raise, keep what we knew
            log.exception("mcpmeter: reading the circuit of %s failed", listing.slug)
            near = self._near.get(listing.id)
            return near[0] if near is not None else CLOSED
        self._remember(listing, circuit)
        return circuit

    def _remember(self, listing: Listing, circuit: Circuit) -> None:
        now = self._clock()
        old = self._near.get(listing.id)
        self._near[listing.id] = (circuit, time.monotonic(), listing.slug)
        before, after = state(old[0] if old else CLOSED, now), state(circuit, now)
        if old is None or before is not after:
            self._on_change(listing.slug, str(after))
        if before is not after:
            log.warning("mcpmeter: circuit of %s %s (%d consecutive upstream failures)",
                        listing.slug, after.replace("_", "-"), circuit.failures)
