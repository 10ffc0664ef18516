"""The gateway's own endpoints, answered before any route is metered: /health, /metrics and the
OAuth protected-resource metadata (RFC 9728)."""

from __future__ import annotations

import asyncio
import json
import logging
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
    for name, probe in (("store", gw.store.health), ("cache", gw.cache.health)):
        try:
            check = await asyncio.wait_for(probe(), timeout=1.0)
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
