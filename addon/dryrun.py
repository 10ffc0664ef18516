"""Replaying a flow in mitmweb is a dry run: what the meter would decide now, and nothing else.

mitmproxy 12.3 replays a flow in place (`replay.client` backs it up, clears its response and sends
the same flow object again), and the replayed request is the one the gateway forwarded: the key
was redacted, the URL is the upstream's. So the gateway remembers, in memory only, who made each
flow (the key's hash and prefix, never the key) under a reference kept in the flow's metadata, and
answers a replay itself: the consumer, listing, price, free tier left, balance and what the meter
would do, as JSON (status 200, `X-Mcpmeter-Dry-Run: 1`). Nothing is charged, counted (free tier,
rate limit) or forwarded. The original billing record stays in `metadata["mcpmeter_original"]`,
in the comment, and in the flow's backup (mitmweb's "Revert" restores it); the store's rows for
the original call are never touched.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from . import billing, display
from .auth import Credential
from .errors import GatewayError
from .jsonrpc import inspect_request
from .model import ChargeRequest

if TYPE_CHECKING:
    from .gateway import Call, Mcpmeter

log = logging.getLogger("mcpmeter")
META = "mcpmeter"
ORIGINAL = "mcpmeter_original"
MAX_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class Remembered:
    """What the store and caches need to find a consumer again: never the key itself."""

    hash: str
    kind: str
    prefix: str


class Originals:
    """Flow reference -> the credential that made it, bounded (oldest forgotten first)."""

    def __init__(self) -> None:
        self.by_ref: OrderedDict[str, Remembered] = OrderedDict()

    def remember(self, flow: http.HTTPFlow, credential: Credential | None) -> None:
        if credential is None:
            return
        ref = uuid.uuid4().hex
        self.by_ref[ref] = Remembered(credential.hash, credential.kind, credential.prefix)
        while len(self.by_ref) > MAX_REMEMBERED:
            self.by_ref.popitem(last=False)
        flow.metadata[display.CONSUMER] = {"key_prefix": credential.prefix, "ref": ref}

    def find(self, flow: http.HTTPFlow) -> Remembered | None:
        ref = (flow.metadata.get(display.CONSUMER) or {}).get("ref")
        return self.by_ref.get(ref) if isinstance(ref, str) else None


def is_replay(flow: http.HTTPFlow) -> bool:
    return flow.is_replay == "request"


async def answer(gw: Mcpmeter, flow: http.HTTPFlow, call: Call) -> None:
    """Answer a replayed flow with what the meter would decide now (never raises GatewayError)."""
    original = flow.metadata.get(META)
    if original is not None and ORIGINAL not in flow.metadata:
        flow.metadata[ORIGINAL] = {"billing": dict(original), "comment": flow.comment}
    kept = flow.metadata.get(ORIGINAL) or {}
    try:
        body = await _decide(gw, flow, call, (kept.get("billing") or {}).get("slug"))
    except GatewayError as e:
        body = {"would": "refuse", "status": e.status, "error": e.spec.code}
    except Exception as e:  # the store is down, say: a dry run still answers, and still forwards nothing
        log.warning("mcpmeter: dry run %s could not read the meter: %s", call.request_id, e)
        body = {"would": "unknown", "error": "store_unavailable", "reason": str(e) or type(e).__name__}
    body = {"dry_run": True, "charged": 0, "counted": False, "forwarded": False, **body,
            "original": {"request_id": (kept.get("billing") or {}).get("request_id"),
                         "decision": (kept.get("billing") or {}).get("decision")}}
    flow.metadata[META] = {"decision": "dry_run", "request_id": call.request_id, "dry_run": body}
    flow.response = http.Response.make(200, json.dumps(body, indent=2).encode(), {
        "Content-Type": "application/json", "X-Mcpmeter-Dry-Run": "1", "X-Mcpmeter-Billed": "0",
        "X-Mcpmeter-Request-Id": call.request_id})
    summary = _summary(body)
    before = kept.get("comment")
    display.gateway_answered(flow, f"dry run · {summary}" + (f" | original: {before}" if before else ""), ":mag:")


async def _decide(gw: Mcpmeter, flow: http.HTTPFlow, call: Call, slug: Any) -> dict[str, Any]:
    assert gw.config is not None and gw.store is not None
    who = gw.replays.find(flow)
    if who is None:
        return {"would": "refuse", "status": 401, "error": "invalid_token",
                "reason": "this gateway did not see the original call (or forgot it): no consumer to meter as"}
    if not isinstance(slug, str):
        return {"would": "refuse", "status": 404, "error": "not_found", "reason": "the original call named no listing"}
    consumer = await gw.admission.consumer(who)  # type: ignore[arg-type]  # hash and kind are all it reads
    if consumer is None:
        raise GatewayError("invalid_token")
    listing = await gw.admission.listing(slug)
    if listing is None:
        raise GatewayError("no_such_mcp")
    out: dict[str, Any] = {"consumer": {"user_id": consumer.user_id, "key_prefix": who.prefix,
                                        "status": consumer.status},
                           "listing": slug, "listing_status": listing.status,
                           "rate_limit": {"per_minute": listing.rate_limit_per_minute or gw.config.default_rpm,
                                          "per_day": listing.rate_limit_per_day or gw.config.default_rpd,
                                          "note": "a dry run is not counted and not checked against the window"}}
    if flow.request.method.upper() != "POST":
        return {**out, "would": "forward unpriced", "price": 0}
    inspection = inspect_request(flow.request.raw_content or b"", gw.config.billable_methods,
                                 flow.request.headers.get("mcp-method"), flow.request.headers.get("mcp-name"))
    if inspection.call is None:
        return {**out, "would": "forward unpriced", "method": inspection.method, "price": 0}
    tool = inspection.call.tool_name
    price = billing.price_of(listing, tool)
    req = ChargeRequest(request_id=call.request_id, user_id=consumer.user_id, project_id=consumer.project_id,
                        listing_id=listing.id, tool_name=tool, price=price,
                        free_allowance=listing.free_calls_per_consumer, period=billing.period(call.called_at))
    seen = await gw.store.preview(req)
    would = {"debited": "debit", "free": "use the free tier", "unpriced": "forward unpriced"}.get(
        seen.verdict.value, "refuse")
    if consumer.status == "suspended":
        would = "refuse"
        out["error"] = "account_suspended"
    elif listing.status != "live":
        would = "refuse"
        out["error"] = f"mcp_{listing.status}"
    out.update(tool=tool, price=price, would=would, verdict=seen.verdict.value, amount=seen.amount,
               free_allowance=seen.free_allowance, free_left=seen.free_left, balance=seen.balance,
               project_cap_cents=seen.cap_cents, project_spent=seen.spent,
               shadow=gw.config.shadow or slug in gw.config.shadow_listings)
    return out


def _summary(body: dict[str, Any]) -> str:
    who = body.get("consumer") or {}
    parts = [f"user {who['user_id']} ({who.get('key_prefix')})" if who else "no consumer",
             str(body.get("listing", "-"))]
    if "tool" in body:
        parts += [display.shown(str(body["tool"])), f"price {body['price']} µ¢", f"free left {body['free_left']}",
                  f"balance {body['balance']} µ¢"]
    would = f"would {body.get('would')}"
    if body.get("error"):
        would += f" ({body['error']})"
    elif body.get("verdict") in ("insufficient_credit", "project_cap_exceeded"):
        would += f" ({body['verdict']})"
    return " · ".join(parts + [would, "charged nothing"])
