"""The circuit breaker of a listing's upstream, as a pure state machine. No I/O here.

N consecutive upstream failures of priced calls (a 5xx answer, an unreachable upstream, a timeout) open the
circuit for a cool-down; while it is open, priced calls are refused before any money moves. When
the cool-down is over the circuit is half-open: one probe call is let through (the cache hands
out that single slot across gateways), and its success closes the circuit while its failure opens
it again for another cool-down. A client that walks away or a gateway fault says nothing about the
upstream and counts neither way.

Failures are attributed to consumers (the user), because a failed call is refunded: one consumer
who can make the upstream fail (a tool that times out, arguments it answers with a 5xx) must not
be able to shut a listing for everyone at no cost. The rule: every opening needs two consumers.
The circuit keeps a window of failures, from the last success or from the failure that last opened
it, and remembers only its first consumer and whether another consumer failed in it (two fields:
O(1) state, no per-consumer set). A failure opens the circuit (again) only when the streak of
consecutive failures has reached the threshold AND the window, this failure included, holds two
consumers; the window then restarts at this failure. So a failed half-open probe re-opens the
circuit when another consumer failed in its window (the one whose failure opened it, or one since);
otherwise it closes the circuit, the streak going on (another consumer's next failure re-opens it at
once). One consumer taking and failing every probe can thus neither keep the circuit open nor hold
its only probe slot, and cannot open it at all without another consumer's failure in the window. A
failure while the circuit is open that does not re-open it only adds to the streak and the window.
A success still resets everything. Honest traffic from several consumers opens as before, and
re-opens on a failed probe unless that probe's consumer is the one whose failure opened it.
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
    first: int | None = None  # the window's first failing consumer (user id); None: no failure since a success
    mixed: bool = False  # another consumer failed in the window too


CLOSED = Circuit()


def state(circuit: Circuit, now: float) -> CircuitState:
    if circuit.open_until <= 0:
        return CircuitState.CLOSED
    return CircuitState.OPEN if now < circuit.open_until else CircuitState.HALF_OPEN


def after_failure(circuit: Circuit, settings: BreakerSettings, now: float, consumer: int) -> Circuit:
    """One more failure, `consumer`'s: the circuit opens for a cool-down when the streak is at the
    threshold and the window holds two consumers; a half-open circuit whose failure does not re-open
    it closes (the streak and its window go on)."""
    failures = circuit.failures + 1
    if circuit.first is None:
        first, mixed = consumer, False
    else:
        first, mixed = circuit.first, circuit.mixed or consumer != circuit.first
    if failures >= settings.failures and mixed:
        return Circuit(failures, now + settings.cooldown_seconds, consumer)  # opened: the window restarts here
    if state(circuit, now) is CircuitState.HALF_OPEN:
        return Circuit(failures, 0.0, first, mixed)  # one consumer alone does not keep it shut
    return Circuit(failures, circuit.open_until, first, mixed)


def upstream_failed(status: int | None, failure: Failure | None) -> bool | None:
    """True for an upstream failure, False for a success, None when the call says nothing of it."""
    if failure in (Failure.UPSTREAM, Failure.TIMEOUT):
        return True
    if failure is not None or status is None:
        return None  # the client left, or the gateway failed: not the upstream's doing
    return status >= 500
