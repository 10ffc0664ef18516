"""Shadow mode: meter and record what would be billed or refused, refuse and charge nothing.

On (globally with `shadow: true` / MCPMETER_SHADOW=1, or per listing with `shadow_listings`), a
priced call is recorded through the store as an unpriced one (its journal and usage rows, billed
0: balances and the ledger are never touched), and the verdict it would have had (debit, free
tier, insufficient credit, project cap, rate limit) goes on the flow (`metadata["mcpmeter"]["shadow"]`,
comment, mark :ghost:) and into the log, line `mcpmeter: shadow ...`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from mitmproxy import http

from .config import Config
from .display import shown
from .model import ChargeRequest, Listing

log = logging.getLogger("mcpmeter")
META = "mcpmeter"


def applies(config: Config, listing: Listing) -> bool:
    return config.shadow or listing.slug in config.shadow_listings


def describe(would: dict[str, Any]) -> str:
    parts = [f"be refused {would['refused']}"] if would.get("refused") else []
    verdict = would.get("verdict")
    if verdict == "debited":
        parts.append(f"debit {would['amount']} µ¢")
    elif verdict in ("insufficient_credit", "project_cap_exceeded"):
        parts.append(f"be refused {verdict}")
    elif verdict:
        parts.append({"free": "use the free tier", "unpriced": "be free (price 0)"}.get(verdict, verdict))
    return " and ".join(parts) or "pass"


def settled_reason(flow: http.HTTPFlow, refunded: bool) -> str | None:
    """The reason a shadow call is recorded with (`mcpmeter_calls.reason`), so `mcpmeter usage --by
    reason` shows what shadow mode would have done: `shadow:rate_limited`, `shadow:insufficient_credit`,
    `shadow:project_cap_exceeded`, `shadow:refunded` (the answer would have been refunded), else
    `shadow:debited`, `shadow:free` or `shadow:unpriced`. None for a call not in shadow mode."""
    would = (flow.metadata.get(META) or {}).get("shadow")
    if would is None:
        return None
    verdict = would.get("verdict")
    refused = would.get("refused") or (verdict if verdict in ("insufficient_credit", "project_cap_exceeded") else None)
    if refused:
        return f"shadow:{refused}"
    return "shadow:refunded" if refunded else f"shadow:{verdict or 'unpriced'}"


def note_refusal(flow: http.HTTPFlow, code: str) -> None:
    """A refusal shadow mode lets through (e.g. the rate limit), remembered on the flow."""
    flow.metadata.setdefault(META, {}).setdefault("shadow", {})["refused"] = code
    log.info("mcpmeter: shadow %s would be refused %s", flow.metadata[META].get("request_id"), code)


async def charge_request(store: Any, flow: http.HTTPFlow, req: ChargeRequest) -> ChargeRequest:
    """What the call would cost, put on the flow; returns the request to record it at no cost."""
    would = (await store.preview(req)).as_dict()
    note = flow.metadata.setdefault(META, {}).setdefault("shadow", {})
    note.update(would)
    log.info("mcpmeter: shadow %s %s would %s", req.request_id, shown(req.tool_name), describe(note))
    return replace(req, price=0, free_allowance=0)
