"""What the gateway says on a flow: its error answers, the metering headers, and the decision
left on the flow for other addons and mitmweb (metadata, comment, mark)."""

from __future__ import annotations

import time

from mitmproxy import http

from . import billing, commands, display, rpc_errors, shadow
from .call import META, Call, Label
from .errors import GatewayError
from .model import Verdict


def error_response(error: GatewayError, call: Call, top_up_url: str | None) -> http.Response:
    """The JSON (or JSON-RPC) refusal of `error`, with the metering headers: nothing billed.

    A call the rate limit counted says under what (`call.limit_headers`, empty before the count),
    as its 429 or its answer would; the error's own headers (a Retry-After) win. The limiter's
    Retry-After goes on its 429 only: a call shadow mode let through over the limit keeps it, and a
    later refusal (a 403, a 410) must not tell the client to try again in so many seconds."""
    limit = call.limit_headers if error.spec.code == "rate_limited" else {
        k: v for k, v in call.limit_headers.items() if k != "Retry-After"}
    headers = {"Content-Type": "application/json", **limit, **error.headers,
               "X-Mcpmeter-Request-Id": call.request_id, "X-Mcpmeter-Billed": "0",
               "X-Mcpmeter-Duration-Ms": str(call.elapsed_ms())}
    if call.balance is not None:
        headers["X-Mcpmeter-Balance"] = str(call.balance)
    body = rpc_errors.refusal_body(error, call.request_id, call.rpc_id, top_up_url)
    return http.Response.make(error.status, body, headers)


def mark_refused(flow: http.HTTPFlow, call: Call, error: GatewayError) -> None:
    meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
    meta.update(decision=Label.REFUSED, error=error.spec.code)
    who = display.consumer_label(flow, call.consumer.user_id) if call.consumer else "no consumer"
    display.gateway_answered(flow, f"{who} · {meta.get('slug', '-')} · refused {error.status} {error.spec.code}",
                             ":no_entry:")


def stamp(flow: http.HTTPFlow, call: Call) -> None:
    """The metering headers, on a response whose headers have not been sent yet."""
    assert flow.response is not None
    values = {"X-Mcpmeter-Request-Id": call.request_id, "X-Mcpmeter-Billed": call.billed_header,
              "X-Mcpmeter-Duration-Ms": str(call.elapsed_ms())}
    if call.balance is not None:
        values["X-Mcpmeter-Balance"] = str(call.balance)
    if call.refunded:
        values["X-Mcpmeter-Refunded"] = "1"
    values.update(call.limit_headers)
    replace_headers(flow.response.headers, values)


def replace_headers(headers: http.Headers, values: dict[str, str]) -> None:
    """Set each of `values` as the one field of its name, in one pass over the fields: each
    `headers[name] = value` is a pass of its own, lower-casing every name (17 µs for a stamp's 8)."""
    drop = {name.lower().encode() for name in values}
    headers.fields = (*(f for f in headers.fields if f[0].lower() not in drop),
                      *((name.encode(), value.encode("utf-8", "surrogateescape")) for name, value in values.items()))


_MARKS = {Label.BILLED: ":moneybag:", Label.FREE: ":gift:", Label.REFUNDED: ":leftwards_arrow_with_hook:",
          Label.SHADOW: ":ghost:"}


def annotate(flow: http.HTTPFlow, call: Call, decision: billing.Decision, status: int,
             results: commands.Results | None = None) -> None:
    """The metering decision on the flow: metadata for addons, comment and mark for mitmweb."""
    assert call.charged is not None and call.charge is not None and call.listing is not None
    assert call.consumer is not None
    verdict = call.charged.verdict
    meta = flow.metadata.setdefault(META, {"request_id": call.request_id})
    label = Label.REFUNDED if decision.refund else (Label.FREE if verdict is Verdict.FREE else Label.BILLED)
    amount = "free tier" if verdict is Verdict.FREE else f"{call.charged.amount} µ¢"
    if (would := meta.get("shadow")) is not None:  # shadow mode: recorded unpriced, the would-be verdict shown
        label, amount = Label.SHADOW, f"would {shadow.describe(would)}, charged nothing"
    billed = 0 if decision.refund else call.charged.amount
    meta.update(decision=label, reason=decision.reason, billed=billed, balance=call.balance, status=status,
                user_id=call.consumer.user_id)
    price = meta.setdefault("price", call.charge.price)
    who = display.consumer_label(flow, call.consumer.user_id)
    flow.comment = (f"{who} · {call.listing.slug} · {display.shown(call.charge.tool_name)} · price {price} µ¢ · "
                    f"{label} ({amount}; {decision.reason}) · balance {call.balance} µ¢")
    flow.marked = _MARKS[label]
    if results is not None:
        results.note(commands.Recent(
            time.time(), call.request_id, call.consumer.user_id, call.listing.slug,
            call.charge.tool_name[:commands.TOOL_CHARS], label, billed, status))
