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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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


class Metrics:
    """The gateway's counters, histograms and gauges, and their exposition."""

    def __init__(self, backlog: Callable[[], float] = lambda: 0,
                 cache_degraded: Callable[[], float] = lambda: 0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.calls = Counter("mcpmeter_calls", "Forwarded calls, by listing, tool, decision and status.",
                             ["listing", "tool", "decision", "status"], registry=r)
        self.billed = Counter("mcpmeter_billed_micro_cents", "µ¢ billed to consumers (after refunds).",
                              ["listing"], registry=r)
        self.refunded = Counter("mcpmeter_refunded_micro_cents", "µ¢ debited then refunded.",
                                ["listing"], registry=r)
        self.refusals = Counter("mcpmeter_refusals", "Requests the gateway answered itself, by error code.",
                                ["code"], registry=r)
        self.overhead = Histogram("mcpmeter_gateway_overhead_seconds",
                                  "Time from the request to its forwarding: auth, rate limit, debit.",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.upstream = Histogram("mcpmeter_upstream_seconds",
                                  "Time from forwarding to the call's answer (or failure), by listing.",
                                  ["listing"], buckets=UPSTREAM_BUCKETS, registry=r)
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
        slug, now = listing.slug, time.monotonic()
        if call.forwarded is not None:
            self.overhead.observe(call.forwarded - call.started)
            self._child(self.upstream, slug).observe(now - call.forwarded)
        if refund is None or call.charged is None or call.charge is None:
            self._child(self.calls, slug, NO_TOOL, "passthrough", _status(status)).inc()
            return
        tool = call.charge.tool_name if call.charge.tool_name in listing.tool_prices else OTHER
        amount = call.charged.amount
        if refund:
            decision = "refunded"
            if amount:
                self._child(self.refunded, slug).inc(amount)
        else:
            decision = {Verdict.FREE: "free", Verdict.UNPRICED: "unpriced"}.get(call.charged.verdict, "billed")
            if amount:
                self._child(self.billed, slug).inc(amount)
        self._child(self.calls, slug, tool, decision, _status(status)).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), remembered: prometheus-client validates and locks on every call,
        and the label sets are bounded (see the module's docstring)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

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
