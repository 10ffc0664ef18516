"""Circuit breaker state in the cache: in-process, or in Redis shared by every gateway.

Kept apart from the caches' other methods: MemoryCache and RedisCache take these as mixins.
Keys (under the prefix): `circuit:<listing id>` a hash {failures, open_until, first, mixed}, and
`circuit:<listing id>:probe` the half-open circuit's single probe slot (SET NX with a TTL, so a
probe that never reports back frees the slot; it holds the probe's token, so that a probe that
ends saying nothing of the upstream frees it at once, and only its own). Only failures, resets and
probes write; a healthy listing's calls write nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..breaker import CLOSED, BreakerSettings, Circuit, after_failure

FORGET_SECONDS = 3600  # failures older than this (with no new one) are forgotten

# KEYS[1] the circuit hash, KEYS[2] its probe slot; ARGV[1] threshold, ARGV[2] now, ARGV[3] open_until
# should this failure open the circuit, ARGV[4] the hash's TTL in ms, ARGV[5] the failing consumer.
# addon/breaker.py's after_failure, atomically: returns {failures, open_until, first, mixed}.
FAILURE_SCRIPT = """
local f = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local first = redis.call('HGET', KEYS[1], 'first')
local mixed = redis.call('HGET', KEYS[1], 'mixed') == '1'
if not first then
  redis.call('HSET', KEYS[1], 'first', ARGV[5])
elseif first ~= ARGV[5] and not mixed then
  mixed = true
  redis.call('HSET', KEYS[1], 'mixed', '1')
end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if f >= tonumber(ARGV[1]) and mixed then
  redis.call('HSET', KEYS[1], 'open_until', ARGV[3], 'first', ARGV[5])
  redis.call('HDEL', KEYS[1], 'mixed')
elseif open_until > 0 and tonumber(ARGV[2]) >= open_until then
  redis.call('HSET', KEYS[1], 'open_until', '0')
end
if tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') ~= open_until then
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('HMGET', KEYS[1], 'failures', 'open_until', 'first', 'mixed')
"""

# KEYS[1] the probe slot, ARGV[1] the token that claimed it: deleted only if that token still holds it.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class MemoryBreakers:
    """For MemoryCache: the state of this process's circuits."""

    def _circuits(self) -> tuple[dict[int, Circuit], dict[int, tuple[float, str]]]:
        state = self.__dict__.get("_breaker_state")
        if state is None:
            state = self.__dict__["_breaker_state"] = ({}, {})
        return state

    async def circuit(self, listing_id: int) -> Circuit:
        return self._circuits()[0].get(listing_id, CLOSED)

    async def circuit_failed(self, listing_id: int, settings: BreakerSettings, now: float,
                             consumer: int) -> Circuit:
        circuits, probes = self._circuits()
        old = circuits.get(listing_id, CLOSED)
        circuit = circuits[listing_id] = after_failure(old, settings, now, consumer)
        if circuit.open_until != old.open_until:
            probes.pop(listing_id, None)  # opened, or a half-open circuit closed: a new probe slot
        return circuit

    async def circuit_reset(self, listing_id: int) -> None:
        circuits, probes = self._circuits()
        circuits.pop(listing_id, None)
        probes.pop(listing_id, None)

    async def circuit_probe(self, listing_id: int, ttl_seconds: float, now: float, token: str = "1") -> bool:
        """Claim the half-open circuit's one probe; False while another probe holds it."""
        probes = self._circuits()[1]
        if probes.get(listing_id, (0.0, ""))[0] > now:
            return False
        probes[listing_id] = (now + ttl_seconds, token)
        return True

    async def circuit_release_probe(self, listing_id: int, token: str) -> None:
        probes = self._circuits()[1]
        if probes.get(listing_id, (0.0, ""))[1] == token:
            del probes[listing_id]


class RedisBreakers:
    """For RedisCache: shared circuits; on Redis failure, the in-process fallback's."""

    _redis: Any
    _prefix: str
    _fallback: Any
    _run: Any

    def _circuit_keys(self, listing_id: int) -> tuple[str, str]:
        return circuit_keys(self._prefix, listing_id)

    async def circuit(self, listing_id: int) -> Circuit:
        async def read() -> Circuit:
            raw = await self._redis.hgetall(self._circuit_keys(listing_id)[0])
            return parse_circuit(raw.get("failures"), raw.get("open_until"), raw.get("first"),
                                 raw.get("mixed")) if raw else CLOSED

        return await self._run(read, lambda: self._fallback.circuit(listing_id))

    async def circuit_failed(self, listing_id: int, settings: BreakerSettings, now: float,
                             consumer: int) -> Circuit:
        async def fail() -> Circuit:
            opened = now + settings.cooldown_seconds
            ttl_ms = int(max(FORGET_SECONDS, settings.cooldown_seconds * 2) * 1000)
            raw = await self._redis.eval(FAILURE_SCRIPT, 2, *self._circuit_keys(listing_id), settings.failures,
                                         repr(now), repr(opened), ttl_ms, str(consumer))
            return parse_circuit(*raw)

        return await self._run(fail, lambda: self._fallback.circuit_failed(listing_id, settings, now, consumer))

    async def circuit_reset(self, listing_id: int) -> None:
        await self._run(lambda: self._redis.delete(*self._circuit_keys(listing_id)),
                        lambda: self._fallback.circuit_reset(listing_id))

    async def circuit_probe(self, listing_id: int, ttl_seconds: float, now: float, token: str = "1") -> bool:
        async def claim() -> bool:
            key = self._circuit_keys(listing_id)[1]
            return bool(await self._redis.set(key, token, nx=True, px=max(1, int(ttl_seconds * 1000))))

        return await self._run(claim, lambda: self._fallback.circuit_probe(listing_id, ttl_seconds, now, token))

    async def circuit_release_probe(self, listing_id: int, token: str) -> None:
        async def release() -> None:
            await self._redis.eval(RELEASE_SCRIPT, 1, self._circuit_keys(listing_id)[1], token)

        await self._run(release, lambda: self._fallback.circuit_release_probe(listing_id, token))


class CircuitStore(Protocol):
    """The part of the Cache interface the circuit breaker uses."""

    async def circuit(self, listing_id: int) -> Circuit: ...

    async def circuit_failed(self, listing_id: int, settings: BreakerSettings, now: float,
                             consumer: int) -> Circuit: ...

    async def circuit_reset(self, listing_id: int) -> None: ...

    async def circuit_probe(self, listing_id: int, ttl_seconds: float, now: float, token: str = "1") -> bool: ...

    async def circuit_release_probe(self, listing_id: int, token: str) -> None:
        """Free the probe slot if `token` still holds it: its call ended saying nothing of the upstream."""


def circuit_keys(prefix: str, listing_id: int) -> tuple[str, str]:
    """A circuit's hash and its probe slot. FAILURE_SCRIPT touches both, so they share the hash tag
    `{<listing id>}`: one slot, and the script runs unchanged on Redis Cluster."""
    key = f"{prefix}circuit:{{{listing_id}}}"
    return key, key + ":probe"


def parse_circuit(failures: Any, open_until: Any, first: Any, mixed: Any) -> Circuit:
    """A circuit from its hash fields (as Redis returns them: strings, or None when absent)."""
    return Circuit(int(failures or 0), float(open_until or 0), None if first is None else int(first),
                   str(mixed) == "1")
