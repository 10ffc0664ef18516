"""The circuit breaker of a listing's upstream, as a pure state machine. No I/O here.

N consecutive upstream failures of priced calls (a 5xx answer, an unreachable upstream, a timeout) open the
circuit for a cool-down; while it is open, priced calls are refused before any money moves. When
the cool-down is over the circuit is half-open: one probe call is let through (the cache hands
out that single slot across gateways), and its success closes the circuit while its failure opens
it again for another cool-down. A client that walks away or a gateway fault says nothing about the
upstream and counts neither way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .billing import Failure


class CircuitState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 5  # consecutive upstream failures that open the circuit; 0 turns the breaker off
    cooldown_seconds: float = 30.0  # how long an open circuit refuses priced calls


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The defaults, and the listings (by slug) that set their own thresholds."""

    default: BreakerSettings = field(default_factory=BreakerSettings)
    listings: Mapping[str, BreakerSettings] = field(default_factory=dict)

    def for_listing(self, slug: str) -> BreakerSettings:
        return self.listings.get(slug, self.default)


@dataclass(frozen=True, slots=True)
class Circuit:
    """What the cache holds for one listing."""

    failures: int = 0  # consecutive upstream failures since the last success
    open_until: float = 0.0  # unix seconds; 0 while the circuit has not opened since the last success


CLOSED = Circuit()


def state(circuit: Circuit, now: float) -> CircuitState:
    if circuit.open_until <= 0:
        return CircuitState.CLOSED
    return CircuitState.OPEN if now < circuit.open_until else CircuitState.HALF_OPEN


def after_failure(circuit: Circuit, settings: BreakerSettings, now: float) -> Circuit:
    """One more failure: at the threshold (or on a failed probe) the circuit opens for a cool-down."""
    failures = circuit.failures + 1
    if failures >= settings.failures:
        return Circuit(failures, now + settings.cooldown_seconds)
    return Circuit(failures, circuit.open_until)


def upstream_failed(status: int | None, failure: Failure | None) -> bool | None:
    """True for an upstream failure, False for a success, None when the call says nothing of it."""
    if failure in (Failure.UPSTREAM, Failure.TIMEOUT):
        return True
    if failure is not None or status is None:
        return None  # the client left, or the gateway failed: not the upstream's doing
    return status >= 500
