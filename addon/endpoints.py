"""The gateway's own endpoints, answered before any route is metered: /health, /metrics and the
OAuth protected-resource metadata (RFC 9728)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from . import display, origins
from .auth import Credential
from .call import META, Call, Label
from .config import Config
from .errors import GatewayError

if TYPE_CHECKING:
    from .gateway import Mcpmeter

log = logging.getLogger("mcpmeter")

PUBLIC_HEALTH_FIELDS = ("store", "cache", "ok", "degraded")
RESOURCE_METADATA = "/.well-known/oauth-protected-resource"
HEALTH_WAIT = 1.0  # seconds a /health request waits for a probe before reporting it failed
PROBE_ABANDONED = 10.0  # seconds after which a probe still running is given up and a new one started
Probe = Callable[[], Awaitable[dict[str, object]]]


class Probes:
    """At most one health probe of each store or cache in flight, shared by every /health request
    that comes while it runs. /health is public: without this, each anonymous request would queue a
    job for the store (the queue charges wait in) and a query for Redis."""

    def __init__(self) -> None:
        self._running: dict[str, tuple[object, float, asyncio.Task[dict[str, object]]]] = {}

    async def check(self, name: str, owner: object, probe: Probe) -> dict[str, Any]:
        """`owner`'s probe (a reload may replace the store): the one in flight, else a new one."""
        running = self._running.get(name)
        now = time.monotonic()
        if running is None or running[0] is not owner or now - running[1] > PROBE_ABANDONED:
            if running is not None:
                running[2].cancel()
            task = asyncio.ensure_future(probe())
            task.add_done_callback(lambda done: self._finished(name, done))
            running = self._running[name] = (owner, now, task)
        probe_task = running[2]
        try:
            return dict(await asyncio.wait_for(asyncio.shield(probe_task), timeout=HEALTH_WAIT))
        except asyncio.CancelledError:
            # The probe given up for a newer one (too long, or a reload's store): a failed check, not
            # this request's cancellation, which mitmproxy does not catch (its hook would never end).
            current = asyncio.current_task()
            if not probe_task.cancelled() or (current is not None and current.cancelling()):
                raise
            raise RuntimeError(f"the {name} probe was given up for a newer one") from None

    def _finished(self, name: str, task: asyncio.Task[dict[str, object]]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a probe every waiter gave up on must not log "never retrieved"
        if (running := self._running.get(name)) is not None and running[2] is task:
            del self._running[name]


async def answer(gw: Mcpmeter, flow: http.HTTPFlow, call: Call, credential: Credential | None) -> bool:
    """Answer `flow` if it asks for one of the gateway's own endpoints; False for any other path."""
    assert gw.config is not None
    req = flow.request
    path = req.path.partition("?")[0]
    if path == "/health":
        await _health(gw, flow, call)
    elif path == "/metrics":
        flow.response = http.Response.make(*gw.metrics.scrape(gw.config, req.method, credential,
                                                              "authorization" in req.headers))
    elif path == RESOURCE_METADATA or path.startswith(RESOURCE_METADATA + "/"):
        _resource_metadata(gw.config, flow, call)
    else:
        return False
    return True


def public_url(config: Config | None, flow: http.HTTPFlow) -> str:
    """Where clients reach the gateway: `public_url`, else the request's Host if it is a plain
    host[:port] (it is reflected in the metadata and WWW-Authenticate), else 400."""
    if config and config.public_url:
        return config.public_url
    host = flow.request.host_header
    if not host or not origins.valid_host(host):
        raise GatewayError("invalid_request", reason="the Host header is not a valid host[:port]")
    return f"{flow.request.scheme}://{host}"


def _only_get(flow: http.HTTPFlow) -> None:
    if flow.request.method.upper() not in ("GET", "HEAD"):
        raise GatewayError("method_not_allowed", headers={"Allow": "GET, HEAD"})


async def _health(gw: Mcpmeter, flow: http.HTTPFlow, call: Call) -> None:
    _only_get(flow)
    assert gw.store is not None and gw.cache is not None
    checks: dict[str, Any] = {}
    for name, owner in (("store", gw.store), ("cache", gw.cache)):
        try:
            check = await gw.probes.check(name, owner, owner.health)
        except Exception as e:  # health reports, it does not fail
            check = {"ok": False, "error": str(e) or type(e).__name__}
        if not check.get("ok"):
            log.warning("mcpmeter: health: %s %s", name, check)
        # /health is public: addresses and driver messages (hosts, database names) go to the log only.
        checks[name] = {k: v for k, v in check.items() if k in PUBLIC_HEALTH_FIELDS}
    ok = bool(checks["store"].get("ok"))
    body = {"status": "ok" if ok else "degraded", **checks, "circuits": gw.circuits.snapshot()}
    flow.response = http.Response.make(200 if ok else 503, json.dumps(body).encode(),
                                       {"Content-Type": "application/json",
                                        "X-Mcpmeter-Request-Id": call.request_id})
    flow.metadata[META] = {"decision": Label.HEALTH}
    display.gateway_answered(flow, f"health {body['status']}", ":information_source:")


def _resource_metadata(config: Config, flow: http.HTTPFlow, call: Call) -> None:
    _only_get(flow)
    base = public_url(config, flow)
    body: dict[str, Any] = {"resource": base}
    if config.authorization_servers:
        # The servers that issue tokens for this gateway (RFC 9728 §2): only the configured ones,
        # never the gateway itself unless it is configured as one.
        body["authorization_servers"] = list(config.authorization_servers)
    body.update(bearer_methods_supported=["header"], resource_name="mcpmeter")
    flow.response = http.Response.make(200, json.dumps(body).encode(), {
        "Content-Type": "application/json", "X-Mcpmeter-Request-Id": call.request_id})
    flow.metadata[META] = {"decision": Label.METADATA}
    display.gateway_answered(flow, "OAuth protected-resource metadata", ":information_source:")
