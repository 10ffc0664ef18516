"""Prices and receipts in the MCP messages themselves, for agents that never see HTTP headers.

Three `_meta` keys (documented in README, "Prices and receipts in `_meta`"):

- `mcpmeter/price` on each tool of a `tools/list` result: what a call costs and how many free calls
  are left this month for this consumer.
- `mcpmeter/pricing` in an `initialize` result's `_meta`: the listing's whole price list.
- `mcpmeter/receipt` on the message that answers a priced call (`result._meta`, or `error.data`
  when it is an object): billed, free or refunded, why, the amount and the balance after.

The editing is pure (messages in, messages out); the receipt is computed as the answer passes, from
`billing.decide` and the charge's own result, so it needs no database. Rewriting is bounded: a body
or an SSE event over `MAX_REWRITE_BYTES` passes unchanged, as does one the strict parse refuses
(duplicate keys, NaN, nesting too deep to write back) or an encoded (gzip...) body, except that the
keys of the meter's namespace the upstream wrote are renamed in it (`_rename_ours`): only the meter
writes `mcpmeter/...` keys (`scrub`). An SSE event is rewritten whole: its
`id:`, `event:`, comment and `retry:` lines keep their place and line ends; its `data:` lines become
one. At most one event is held back, and only until the answer has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from cachetools import TTLCache

from mitmproxy import http

from . import billing, rpc_errors
from .jsonrpc import JSON, JsonId, Outcome, answer_outcome, media_type
from .model import Listing, Verdict

log = logging.getLogger("mcpmeter")

PRICE, PRICING, RECEIPT = "mcpmeter/price", "mcpmeter/pricing", "mcpmeter/receipt"
NAMESPACE = "mcpmeter/"  # the meter's `_meta` keys: only the meter writes them (forged ones are dropped)
EDITED_METHODS = ("tools/list", "initialize")  # answers that carry prices or pricing
CURRENCY = "USD micro-cents"  # 1 µ¢ = 1e-6 cent
MAX_REWRITE_BYTES = 1024 * 1024  # bodies and events bigger than this pass unchanged
FREE_LEFT_TIMEOUT = 0.5  # seconds a tools/list answer waits at most for the free-calls count
# Free-tier counts read for tools/list, kept a few seconds: an agent listing tools again and again
# (one list per session is common) must not put the database on the path of unpriced requests.
FREE_USED_SECONDS = 10.0
FreeUsed = TTLCache[tuple[int, int, str], int]


def free_used_cache() -> FreeUsed:
    """One per gateway (its store): (listing id, user id, month) -> free calls used."""
    return TTLCache(maxsize=100_000, ttl=FREE_USED_SECONDS)
META = "mcpmeter"


# --- what goes in the messages (pure) ------------------------------------------------------------

def price_meta(listing: Listing, tool_name: str, free_left: int | None) -> dict[str, Any]:
    return {"micro_cents": billing.price_of(listing, tool_name), "free_calls_left": free_left, "currency": CURRENCY}


def pricing_meta(listing: Listing) -> dict[str, Any]:
    return {"default_micro_cents": max(listing.default_price or 0, 0),
            "tools": {name: max(price or 0, 0) for name, price in listing.tool_prices.items()},
            "free_calls_per_month": listing.free_calls_per_consumer, "currency": CURRENCY}


def receipt(request_id: str, decision: billing.Decision, verdict: Verdict, amount: int, balance: int) -> dict[str, Any]:
    """What the call cost in the end. `amount`/`balance` are the charge's (debited µ¢, balance after it):
    a refund gives the amount back, so the balance after it is derived without reading it."""
    if decision.refund:
        return {"request_id": request_id, "decision": "refunded", "reason": decision.reason,
                "amount_micro_cents": 0, "refunded_micro_cents": amount, "balance_micro_cents": balance + amount}
    label = "free" if verdict is Verdict.FREE or amount == 0 else "billed"
    return {"request_id": request_id, "decision": label, "reason": decision.reason,
            "amount_micro_cents": amount, "balance_micro_cents": balance}


def call_receipt(call: Any, outcome: Outcome | None) -> dict[str, Any] | None:
    """The receipt of a gateway Call answered with `outcome`, or None if it was not paid for."""
    if call.charged is None or call.listing is None:
        return None
    decision = billing.decide(call.status, outcome, call.failure, call.listing.bill_tool_errors)
    return receipt(call.request_id, decision, call.charged.verdict, call.charged.amount, call.charged.balance)


class Plan:
    """What to write into the answers of one request: prices, pricing, a receipt."""

    def __init__(self, rpc_id: JsonId | None, method: str | None, listing: Listing, free_left: int | None = None,
                 receipt_of: Callable[[Outcome], dict[str, Any] | None] | None = None) -> None:
        """`rpc_id` None: a stream that may carry answers to other requests (a session's GET stream):
        nothing is written, the namespace's keys the upstream wrote are dropped from every message."""
        self.rpc_id, self.method, self.listing, self.free_left = rpc_id, method, listing, free_left
        self.receipt_of = receipt_of
        self.done = False  # the answer to rpc_id has passed (edited or not)
        # Only a receipt to write (no prices, no pricing): the answer's result can be spliced into.
        self.receipt_only = method not in EDITED_METHODS

    def edit(self, message: Any) -> bool:
        """Edit `message` in place if it answers the request; True if it changed."""
        if self.rpc_id is None:
            return scrub(message, False)  # the stream's every message, and never done
        outcome = answer_outcome(message, self.rpc_id)
        if outcome is None:
            return False
        self.done = True
        changed = scrub(message, self.method == "tools/list")
        result = message.get("result")
        if isinstance(result, dict) and outcome is not Outcome.RPC_ERROR:
            if self.method == "tools/list" and isinstance(result.get("tools"), list):
                for tool in result["tools"]:
                    if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                        changed |= _put_meta(tool, PRICE, price_meta(self.listing, tool["name"], self.free_left))
            elif self.method == "initialize":
                changed |= _put_meta(result, PRICING, pricing_meta(self.listing))
        if self.receipt_of is not None and (paid := self.receipt_of(outcome)) is not None:
            if outcome is Outcome.RPC_ERROR:
                data = message["error"].get("data", {}) if isinstance(message.get("error"), dict) else None
                if isinstance(data, dict):  # a non-object `data` is the server's: left as it is
                    data[RECEIPT] = paid
                    message["error"]["data"] = data
                    changed = True
            elif isinstance(result, dict):
                changed |= _put_meta(result, RECEIPT, paid)
        return changed


def scrub(message: Any, tools: bool) -> bool:
    """Drop the keys of the meter's namespace the upstream wrote where the meter writes its own (and
    agents look for them): `result._meta`, `error.data` and, with `tools`, each listed tool's `_meta`.
    A forged receipt ("refunded" for a billed call) or price must not reach an agent that trusts it,
    whether or not the meter writes the real one. True if anything was dropped."""
    if not isinstance(message, dict):
        return False
    changed = False
    result = message.get("result")
    if isinstance(result, dict):
        changed = _drop_ours(result.get("_meta"))
        listed = result.get("tools") if tools else None
        if isinstance(listed, list):
            for tool in listed:
                if isinstance(tool, dict):
                    changed |= _drop_ours(tool.get("_meta"))
    error = message.get("error")
    if isinstance(error, dict):
        changed |= _drop_ours(error.get("data"))
    return changed


def _drop_ours(holder: Any) -> bool:
    if not isinstance(holder, dict):
        return False  # a non-object `_meta` or `data` has no keys to forge
    forged = [key for key in holder if key.startswith(NAMESPACE)]
    for key in forged:
        del holder[key]
    return bool(forged)


def _put_meta(holder: dict[str, Any], key: str, value: Any) -> bool:
    meta = holder.setdefault("_meta", {})
    if not isinstance(meta, dict):
        return False  # the server's own non-object `_meta`: not ours to replace
    meta[key] = value
    return True


# --- strict parse and re-serialisation ----------------------------------------------------------

class _Refused(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Refused("duplicate key")  # re-serialising would silently drop one of them
    return d


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def loads(text: str | bytes) -> Any:
    """json.loads refusing what could not be written back as it was (duplicate keys, NaN/Infinity) or
    at all (nesting past the interpreter's recursion limit); raises ValueError for those."""
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except RecursionError:
        raise _Refused("too deep") from None


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # built once: json.dumps with
_decoder = json.JSONDecoder(parse_constant=_constant)  # options builds one per call
_escape = json.encoder.encode_basestring  # the C one when available; ensure_ascii=False, like dumps()


def dumps(value: Any) -> str:
    """One line (SSE-safe: newlines in strings are escaped), key order kept."""
    return _encoder.encode(value)


_UNCHANGED = object()
_FALL_BACK = object()
_RESULT_KEY = re.compile(r'"result"\s*:\s*\{')


def _top_level_result(text: str) -> tuple[int, Any] | None:
    """Where the top-level `result` object of a single message opens, and its value, when that
    member is the message's last; None otherwise (the strict path decides).

    It is the first `"result": {` whose key opens a member (after `{` or `,`: a quote inside a string
    is escaped) and whose object is followed by nothing but the closing brace, which only a member of
    the top-level object can be. Members before it are `jsonrpc` and `id`, so the first candidate is
    the one."""
    found = _RESULT_KEY.search(text)
    if found is None or not text[:found.start()].rstrip().endswith((",", "{")):
        return None
    brace = found.end() - 1
    try:
        result, end = _decoder.raw_decode(text, brace)
    except (ValueError, RecursionError):
        return None
    if text[end:].strip() != "}":
        return None  # not the last member: another `result` may follow, or a nested one matched
    return brace, result


def _insert_receipt(text: str, brace: int, paid: dict[str, Any]) -> str:
    """`text` with `"_meta": {"mcpmeter/receipt": paid}` as the first member of the object at `brace`."""
    rest = text[brace + 1:]
    member = '"_meta":{"' + RECEIPT + '":' + flat_json(paid) + "}"
    return text[:brace + 1] + member + ("" if rest.lstrip().startswith("}") else ",") + rest


def flat_json(value: dict[str, Any]) -> str:
    """dumps() of a flat object of strings, numbers, booleans and None (a receipt), without building an
    encoder's machinery for six members."""
    parts = []
    for key, v in value.items():
        if isinstance(v, str):
            text = _escape(v)
        elif v is None or isinstance(v, bool):
            text = "null" if v is None else ("true" if v else "false")
        elif isinstance(v, int):
            text = str(v)
        else:
            text = dumps(v)
        parts.append(_escape(key) + ":" + text)
    return "{" + ",".join(parts) + "}"


def _splice_receipt(text: str, plan: Plan) -> Any:
    """The common case at C speed: a single message whose `result` object is its last member and has
    no `_meta`. The receipt is inserted into the upstream's own text, which is otherwise kept byte for
    byte. Returns the new text, _UNCHANGED (not the answer, or nothing to write) or _FALL_BACK (let
    the strict parse and re-serialisation decide)."""
    rpc_id = plan.rpc_id
    # Not the answer: unchanged, unless it may hold keys of the namespace (another id's answer) to drop.
    other = _FALL_BACK if _may_forge(text) else _UNCHANGED
    if rpc_id is None:
        return _FALL_BACK
    located = _top_level_result(text)
    if located is None:  # no result member last (a notification, a request, an error...): parse it all
        try:
            message = _decoder.decode(text)
        except (ValueError, RecursionError):
            return _FALL_BACK
        if isinstance(message, dict) and answer_outcome(message, rpc_id) is None:
            return other  # a notification, a request, another call's answer
        return _FALL_BACK
    # The members before `result` are read as an object of their own (the result is parsed already):
    # with the result put back, the same message the whole parse gives (last duplicate wins in both).
    brace, result = located
    head = text[:text.rfind('"result"', 0, brace)].rstrip()
    if not head.endswith(","):
        return other  # `result` is the only member: no id, not an answer
    try:
        message = _decoder.decode(head[:-1] + "}")
    except (ValueError, RecursionError):
        return _FALL_BACK
    if not isinstance(message, dict):
        return _FALL_BACK
    message["result"] = result
    outcome = answer_outcome(message, rpc_id)
    if outcome is None:
        return other  # another call's answer, or a request
    if outcome is Outcome.RPC_ERROR or not isinstance(result, dict) or "_meta" in result:
        return _FALL_BACK
    plan.done = True
    paid = plan.receipt_of(outcome) if plan.receipt_of is not None else None
    return _UNCHANGED if paid is None else _insert_receipt(text, brace, paid)


def _splice_into(text: str, plan: Plan, outcome: Outcome) -> str | None:
    """The receipt for `outcome` spliced into the message `text` answering the plan's call (its
    outcome read already), or None to let the strict path decide."""
    located = _top_level_result(text)
    if located is None or not isinstance(located[1], dict) or "_meta" in located[1]:
        return None
    plan.done = True
    paid = plan.receipt_of(outcome) if plan.receipt_of is not None else None
    return None if paid is None else _insert_receipt(text, located[0], paid)


def edit_json(text: str | bytes, plan: Plan) -> str | None:
    """The message (or batch) with the plan applied, or None to leave it unchanged."""
    if len(text) > MAX_REWRITE_BYTES or not text.strip():  # an empty data field: a priming event
        return None
    if plan.receipt_of is None and plan.receipt_only and not _may_forge(text):
        return None  # nothing to write, and no key of the namespace to drop: not parsed at all
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None  # not UTF-8: no answer to the SDKs (jsonrpc.answer_messages), and left as sent
    if text.startswith("\ufeff"):
        return None  # a byte order mark: the same (rewriting it away would deliver what was refunded)
    if plan.receipt_only and not plan.done and plan.rpc_id is not None:
        if not may_edit(plan, text):
            return None  # no "id" member, even escaped: a notification (progress...), not the answer
        spliced = _splice_receipt(text, plan)
        if spliced is _UNCHANGED:
            return None
        if isinstance(spliced, str):
            return spliced
    try:
        value = loads(text)
    except (ValueError, UnicodeDecodeError):
        return _rename_ours(text)  # not written back: only the namespace's keys are renamed in place
    messages = value if isinstance(value, list) else [value]
    changed = False
    for message in messages:  # a batch's other messages too: one may answer the same id, or claim to
        changed |= (not plan.done and plan.edit(message)) or scrub(message, plan.method == "tools/list")
    if not changed:
        return None
    out = dumps(value)
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:  # an escaped lone surrogate (\ud800) cannot be written back as UTF-8
        return _rename_ours(text)
    return out


_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')  # a JSON string token, escapes included
_COLON = re.compile(r"[ \t\r\n]*:")
RENAMED = "upstream/"  # what a key of the namespace becomes in a message that is not written back


def _rename_ours(text: str) -> str | None:
    """`text`, which the gateway cannot write back, with every object key of the namespace, at any
    depth and however escaped, replaced by `"upstream/mcpmeter/..."` (ASCII-escaped); None if it has
    none. Only whole string tokens are replaced, by string tokens: the framing and every other byte
    stay as sent, so an agent reads the same message without a key it would take for the meter's."""
    if not _may_forge(text):
        return None
    out, at, pos = [], 0, 0
    # Token by token from the start, never from inside one: finditer would try again at every quote a
    # string left unterminated escapes (`"\\"\\"\\"...`), reading to the end each time (quadratic).
    while (pos := text.find('"', pos)) >= 0 and (token := _STRING.match(text, pos)) is not None:
        pos = token.end()
        raw = token.group()
        if ("mcpmeter" not in raw and "\\u" not in raw) or not _COLON.match(text, token.end()):
            continue  # cannot spell the namespace, or a value rather than a key
        try:
            key = json.loads(raw) if "\\" in raw else raw[1:-1]
        except ValueError:
            continue
        if isinstance(key, str) and key.startswith(NAMESPACE):
            out += [text[at:token.start()], json.dumps(RENAMED + key)]
            at = token.end()
    return None if not out else "".join(out) + text[at:]


def _may_forge(text: str | bytes) -> bool:
    """Whether `text` may hold a key of the meter's namespace: it spells `mcpmeter`, or escapes a
    character (`\\u006d`...) as a key's letters can be. `mcpmeter\\/` still spells it."""
    if isinstance(text, bytes):
        return b"mcpmeter" in text or b"\\u" in text
    return "mcpmeter" in text or "\\u" in text


# --- the gateway's hooks delegate here ----------------------------------------------------------------

async def plan_for(flow: http.HTTPFlow, call: Any, store: Any, free_used: FreeUsed) -> Plan | None:
    """What this flow's answers should carry, or None (no listing, or no request id to answer).
    A request that is not paid for gets a plan too, with nothing to write: the upstream's own keys of
    the namespace are dropped from its answer (a forged receipt on a free or continued call)."""
    listing = call.listing
    method = (flow.metadata.get(META) or {}).get("method")
    if listing is None:
        return None
    if flow.request.method == "GET":  # a session's stream (or a resumed one) carries parked calls' answers
        return Plan(None, None, listing) if call.session is not None else None
    if flow.request.method != "POST":
        return None
    rpc_id = call.priced.rpc_id if call.priced is not None else rpc_errors.peek_id(flow.request.raw_content)
    if rpc_id is None:
        return None
    free_left = await _free_left(store, free_used, call, listing) if method == "tools/list" else None
    receipt_of = (lambda outcome: call_receipt(call, outcome)) if call.charged is not None else None
    return Plan(rpc_id, method, listing, free_left, receipt_of)


async def _free_left(store: Any, free_used: FreeUsed, call: Any, listing: Listing) -> int | None:
    """Free calls left this month, as of at most FREE_USED_SECONDS ago: only for tools/list on a
    listing with a free tier (priced calls never wait for it). None when there is no free tier or
    the read fails or is slow."""
    if listing.free_calls_per_consumer <= 0 or call.consumer is None or store is None:
        return None
    key = (listing.id, call.consumer.user_id, billing.period(call.called_at))
    used = free_used.get(key)
    if used is None:
        try:
            counted: int = await asyncio.wait_for(store.free_calls_used(*key), FREE_LEFT_TIMEOUT)
        except Exception:
            log.warning("mcpmeter: no free-calls count for %s", call.request_id, exc_info=True)
            return None
        free_used[key] = used = counted
    return max(listing.free_calls_per_consumer - used, 0)


def _body_headers(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[str, str, bool]:
    """Content-Encoding and Content-Type (repeated fields joined, as mitmproxy's Headers do), and
    whether a Transfer-Encoding is set."""
    encoding: list[bytes] = []
    content_type: list[bytes] = []
    chunked = False
    for name, value in fields:
        lower = name.lower()
        if lower == b"content-encoding":
            encoding.append(value)
        elif lower == b"content-type":
            content_type.append(value)
        elif lower == b"transfer-encoding":
            chunked = True
    return (b", ".join(encoding).decode("latin-1"), b", ".join(content_type).decode("latin-1"), chunked)


def _with_length(fields: tuple[tuple[bytes, bytes], ...], length: int) -> tuple[tuple[bytes, bytes], ...]:
    """The fields with one Content-Length of `length`, where the first one was (else at the end)."""
    value, out, done = str(length).encode(), [], False
    for name, v in fields:
        if name.lower() == b"content-length":
            if not done:
                out.append((name, value))
                done = True
            continue
        out.append((name, v))
    if not done:
        out.append((b"content-length", value))
    return tuple(out)


async def write_body(flow: http.HTTPFlow, call: Any, store: Any, free_used: FreeUsed) -> None:
    """A JSON answer (not a stream): prices or receipt written into its body, Content-Length redone."""
    response = flow.response
    if call.parser is not None or response is None or response.raw_content is None:
        return
    if len(response.raw_content) > MAX_REWRITE_BYTES:
        return
    # The header fields read in one pass (mitmproxy's Headers look-ups are the dearest part of this).
    encoding, content_type, chunked = _body_headers(response.headers.fields)
    if encoding.strip().lower() not in ("", "identity"):
        return  # decoding is bounded elsewhere; an encoded body passes unchanged
    if media_type(content_type) != JSON:
        return  # as the settlement read it (stream_watch.py): only an application/json answer
    try:
        plan = await plan_for(flow, call, store, free_used)
        new = None
        if (plan is not None and plan.receipt_only and plan.receipt_of is not None
                and call.outcome in (Outcome.RESULT, Outcome.TOOL_ERROR)):
            # The settlement read this body already (call.outcome): no second parse of the message,
            # only of its result object, to find where the receipt goes.
            try:
                new = _splice_into(response.raw_content.decode("utf-8"), plan, call.outcome)
            except UnicodeDecodeError:
                pass
        if plan is not None and new is None and not plan.done:
            new = edit_json(response.raw_content, plan)
        if new is not None:
            # Identity-encoded (checked above), so the bytes are set as they are, without mitmproxy's
            # encoding round; Content-Length follows unless the upstream chose a transfer-encoding.
            response.raw_content = body = new.encode("utf-8")
            if not chunked:
                response.headers.fields = _with_length(response.headers.fields, len(body))
    except Exception:  # prices and receipts are a courtesy; the answer goes out regardless
        log.exception("mcpmeter: could not write the receipt of %s", call.request_id)


async def stream_plan(flow: http.HTTPFlow, call: Any, store: Any, free_used: FreeUsed) -> Plan | None:
    """What an SSE answer's events should carry (stream_edit.StreamEditor writes it), or None."""
    try:
        return await plan_for(flow, call, store, free_used)
    except Exception:
        log.exception("mcpmeter: no receipt plan for %s", call.request_id)
        return None


def edit_event_data(data: str, plan: Plan, outcome: Outcome | None) -> str | None:
    """An SSE event's data with the plan applied, or None to leave it. `outcome`: what the event
    says of the call, when the meter read it already (then the message is not parsed again)."""
    new = None
    if outcome in (Outcome.RESULT, Outcome.TOOL_ERROR) and plan.receipt_only and plan.receipt_of is not None:
        new = _splice_into(data, plan, outcome)
    if new is None and not plan.done:
        new = edit_json(data, plan)
    return new


def may_edit(plan: Plan, data: str) -> bool:
    """False when editing the event with this data would leave it unchanged for certain: the answer
    has passed, or a receipt is all there is to write and the data has no "id" member, not even
    escaped (a key's letters can only be escaped as \\uXXXX): priming events and notifications; or
    nothing is to be written and the data cannot hold a key of the namespace to drop."""
    if plan.done or not plan.receipt_only:
        return not plan.done
    if plan.receipt_of is None:
        return _may_forge(data)
    return '"id"' in data or "\\u" in data
