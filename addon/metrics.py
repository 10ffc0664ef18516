"""Prometheus metrics: what the gateway counted, for `GET /metrics`. No mitmproxy here.

Each gateway owns one CollectorRegistry (never prometheus-client's global one: a process, or a
test run, may hold several gateways). Labels are bounded whatever clients send: a listing label
is the slug of a listing the store knows, a tool label is a tool that has a price rule on its
listing (every other tool is `other`), a status label is one of a fixed set or its class, and a
refusal's code comes from the error table.

The endpoint reveals business volume, so it is closed unless configured: with `metrics_token`
set, a scrape must send `Authorization: Bearer <metrics_token>` (401 without it, 403 with another
one); without a token it answers 404 unless `metrics_public: true`.
"""

from __future__ import annotations

import hmac
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .auth import Credential
from .errors import GatewayError
from .model import Verdict

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("mcpmeter")

OTHER = "other"
NO_TOOL = "-"  # calls that are not priced: initialize, tools/list, streams...
STATUSES = frozenset({200, 202, 204, 400, 401, 403, 404, 429, 499, 500, 502, 503, 504})
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


class _Histogram:
    """Bucket counts of one histogram series (`le` buckets, cumulated at scrape time)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound >= value
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class _CallTally:
    """What every forwarded call updates, kept as plain numbers on the event loop and turned into
    metric families only when scraped: prometheus-client's own counters and histograms lock and
    validate labels on every update, which measured ~15 µs per settled call here (issue 10's
    budget is 50 µs for all of the agent protocol)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, str, str], int] = {}
        self.billed: dict[str, int] = {}
        self.refunded: dict[str, int] = {}
        self.overhead = _Histogram(OVERHEAD_BUCKETS)
        self.upstream: dict[str, _Histogram] = {}

    def describe(self) -> list[Any]:
        return list(self._families(empty=True))

    def collect(self) -> Iterator[Any]:
        return self._families(empty=False)

    def _families(self, empty: bool) -> Iterator[Any]:
        calls = CounterMetricFamily("mcpmeter_calls", "Forwarded calls, by listing, tool, decision and status.",
                                    labels=["listing", "tool", "decision", "status"])
        billed = CounterMetricFamily("mcpmeter_billed_micro_cents", "µ¢ billed to consumers (after refunds).",
                                     labels=["listing"])
        refunded = CounterMetricFamily("mcpmeter_refunded_micro_cents", "µ¢ debited then refunded.",
                                       labels=["listing"])
        overhead = HistogramMetricFamily("mcpmeter_gateway_overhead_seconds",
                                         "Time from the request to its forwarding: auth, rate limit, debit.")
        upstream = HistogramMetricFamily("mcpmeter_upstream_seconds",
                                         "Time from forwarding to the call's answer (or failure), by listing.",
                                         labels=["listing"])
        if not empty:
            for key, n in self.calls.items():
                calls.add_metric(list(key), n)
            for slug, amount in self.billed.items():
                billed.add_metric([slug], amount)
            for slug, amount in self.refunded.items():
                refunded.add_metric([slug], amount)
            overhead.add_metric([], self.overhead.buckets(), self.overhead.sum)
            for slug, hist in self.upstream.items():
                upstream.add_metric([slug], hist.buckets(), hist.sum)
        yield from (calls, billed, refunded, overhead, upstream)


class Metrics:
    """The gateway's counters, histograms and gauges, and their exposition."""

    def __init__(self, backlog: Callable[[], float] = lambda: 0,
                 cache_degraded: Callable[[], float] = lambda: 0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.tally = _CallTally()
        r.register(self.tally)
        self.refusals = Counter("mcpmeter_refusals", "Requests the gateway answered itself, by error code.",
                                ["code"], registry=r)
        Gauge("mcpmeter_settlement_backlog", "Answered calls whose settlement is still being written.",
              registry=r).set_function(backlog)
        Gauge("mcpmeter_cache_degraded", "1 while the shared cache (Redis) fails and caches are per process.",
              registry=r).set_function(cache_degraded)
        self.circuit = Gauge("mcpmeter_circuit_state", "Upstream circuit per listing: 0 closed, 1 half-open, 2 open.",
                             ["listing"], registry=r)

    # --- observations (each a few dictionary look-ups and additions) -------------------------

    def refused(self, code: str) -> None:
        try:
            self.refusals.labels(code).inc()
        except Exception:  # counting must never cost a call its answer
            log.exception("mcpmeter: counting a refusal failed")

    def settled(self, call: Any, refund: bool | None, status: int | None) -> None:
        """A forwarded call got its answer (or failed): `refund` None for a call that was not priced.

        Runs on the settlement path, before the ledger write: it never raises."""
        try:
            self._settled(call, refund, status)
        except Exception:
            log.exception("mcpmeter: counting call %s failed", getattr(call, "request_id", "?"))

    def _settled(self, call: Any, refund: bool | None, status: int | None) -> None:
        listing = call.listing
        if listing is None:
            return
        t, slug = self.tally, listing.slug
        if call.forwarded is not None:
            t.overhead.observe(call.forwarded - call.started)
            hist = t.upstream.get(slug)
            if hist is None:
                hist = t.upstream[slug] = _Histogram(UPSTREAM_BUCKETS)
            hist.observe(time.monotonic() - call.forwarded)
        if refund is None or call.charged is None or call.charge is None:
            key = (slug, NO_TOOL, "passthrough", _status(status))
        else:
            tool = call.charge.tool_name if call.charge.tool_name in listing.tool_prices else OTHER
            amount = call.charged.amount
            if refund:
                decision = "refunded"
                if amount:
                    t.refunded[slug] = t.refunded.get(slug, 0) + amount
            else:
                decision = {Verdict.FREE: "free", Verdict.UNPRICED: "unpriced"}.get(call.charged.verdict, "billed")
                if amount:
                    t.billed[slug] = t.billed.get(slug, 0) + amount
            key = (slug, tool, decision, _status(status))
        t.calls[key] = t.calls.get(key, 0) + 1

    def circuit_state(self, slug: str, state: str) -> None:
        self.circuit.labels(slug).set(CIRCUIT_STATES[state])

    # --- the endpoint -----------------------------------------------------------------------------

    def scrape(self, config: Config, method: str, credential: Credential | None,
               sent_authorization: bool) -> tuple[int, bytes, dict[str, str]]:
        """Status, body and headers of `GET /metrics`; raises GatewayError for a refused scrape."""
        token = config.metrics_token
        if token is None and not config.metrics_public:
            raise GatewayError("not_found")
        if token is not None:
            if credential is None and not sent_authorization:
                raise GatewayError("metrics_unauthorized",
                                   headers={"WWW-Authenticate": 'Bearer realm="mcpmeter-metrics"'})
            if credential is None or not hmac.compare_digest(credential.token.encode(), token.encode()):
                raise GatewayError("metrics_forbidden")
        if method.upper() not in ("GET", "HEAD"):
            raise GatewayError("method_not_allowed")
        return 200, generate_latest(self.registry), {"Content-Type": CONTENT_TYPE_LATEST}


def _status(status: int | None) -> str:
    if status is None:
        return "none"
    if status in STATUSES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


def cache_degraded(cache: Any) -> float:
    """1.0 while a Redis cache runs on its in-process fallback."""
    return 1.0 if getattr(cache, "_degraded", False) else 0.0
