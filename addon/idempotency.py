"""Idempotency-Key: a retried priced call gets the first attempt's answer and pays nothing more.

Stripe's semantics, scoped per consumer principal and listing. The first call with a key claims
it (in flight), runs and is charged as usual; when it is over, its answer (status, a few headers,
the body, at most MAX_STORED_BYTES; a streamed answer as the bytes that were streamed) is stored
for TTL_SECONDS in place of the claim. Then, for the same key:

- same body (sha256)  -> the stored answer, with `Idempotent-Replayed: true`; not forwarded, not charged
- another body        -> 422 idempotency_key_reused
- first still running -> 409 idempotency_in_flight, Retry-After: 1

A call refused before it was forwarded (400, 402, 429, 503...) releases its claim: nothing is
stored, so a retry after topping up runs normally. So does a call that got no answer from the
upstream (the gateway's own 502/504, refunded): the retry runs, and pays once. A claim whose
gateway died before either expires after the listing's timeout + IN_FLIGHT_MARGIN_SECONDS.

This module is pure (no mitmproxy, no I/O): the key check, the fingerprint, the records as they
are stored (one JSON string under one cache key) and the verdict on an existing record. The state
lives behind the cache interface (addon/cache/idempotency.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .budget import Share

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
TTL_SECONDS = 24 * 3600
IN_FLIGHT_MARGIN_SECONDS = 30.0
MAX_STORED_BYTES = 1024 * 1024
IN_FLIGHT_RETRY_AFTER = "1"
# The answer's headers a replay repeats; the X-Mcpmeter-* ones are the first call's final metering.
STORED_HEADERS = ("content-type", "content-encoding", "mcp-session-id")


class InvalidKey(ValueError):
    pass


def check_key(values: list[str]) -> str | None:
    """The request's Idempotency-Key, or None without one; InvalidKey when it is not usable."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidKey("one Idempotency-Key header at most")
    key = values[0]
    if not 1 <= len(key) <= MAX_KEY_LENGTH or any(not 0x20 <= ord(c) <= 0x7E for c in key):
        raise InvalidKey(f"the Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters")
    return key


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def cache_key(listing_id: int, principal: str, key: str) -> str:
    """Where a key's record lives (under the cache's prefix), per (listing, API key or token): a
    single-key record, its `{listing:principal}` hash tag only keeps one key's records in one Redis
    Cluster slot. The client's key is hashed, so any printable key makes a short, safe Redis key."""
    return f"idem:{{{listing_id}:{principal}}}:{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class Answer:
    """A stored outcome: what a replay sends."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(slots=True)
class Claim:
    """This gateway's claim on a key, for one call: stored or released when the call is over."""

    key: str
    fingerprint: str
    value: str  # the claim record exactly as stored: finishing or releasing compares it
    ttl_seconds: float
    captured: bytearray | None = None  # a streamed answer's bytes, as they passed
    share: Share | None = None  # what `captured` holds of max_holding_bytes (budget.HOLDING)
    overflow: bool = False  # the answer was over MAX_STORED_BYTES, or the budget: not stored
    ended: bool = False  # the claim was finished or released


def new_claim(key: str, body: bytes, ttl_seconds: float) -> Claim:
    fp = fingerprint(body)
    value = json.dumps({"state": "in_flight", "fp": fp, "token": uuid.uuid4().hex}, separators=(",", ":"))
    return Claim(key, fp, value, ttl_seconds)


def done_record(fp: str, answer: Answer) -> str:
    return json.dumps({"state": "done", "fp": fp, "status": answer.status, "headers": list(answer.headers),
                       "body": base64.b64encode(answer.body).decode()}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an existing record means for a call with fingerprint `fp`."""

    kind: str  # "replay" | "in_flight" | "reused" | "claim" (unreadable record: treat as free)
    answer: Answer | None = None


def judge(record: str, fp: str) -> Verdict:
    try:
        data: dict[str, Any] = json.loads(record)
        if data["fp"] != fp:
            return Verdict("reused")
        if data["state"] == "in_flight":
            return Verdict("in_flight")
        headers = tuple((str(k), str(v)) for k, v in data["headers"])
        return Verdict("replay", Answer(int(data["status"]), headers, base64.b64decode(data["body"])))
    except (ValueError, KeyError, TypeError):
        return Verdict("claim")


def answer_of(status: int, headers: Iterable[tuple[str, str]], body: bytes,
              metering: dict[str, str]) -> Answer | None:
    """The answer to store, or None when it is too big to keep."""
    if len(body) > MAX_STORED_BYTES:
        return None
    kept = [(k, v) for k, v in headers if k.lower() in STORED_HEADERS]
    return Answer(status, tuple(kept + sorted(metering.items())), body)


def should_store(billed: bool, upstream_answered: bool) -> bool:
    """Store what the client paid for, and refunded answers the upstream gave (so the retry sees the
    same refund); a call the upstream never answered (timeout, unreachable) is released instead."""
    return billed or upstream_answered


def capture(stream: Any, claim: Claim, share: Share | None = None) -> Callable[[bytes], Any]:
    """Wrap a response's stream callable so the bytes that pass are kept, up to MAX_STORED_BYTES, and
    while `share` (of what is held of answers, all calls together) takes them: calls in flight are not
    bounded in number, the copies are."""
    claim.captured, claim.share = bytearray(), share

    def watch(chunk: bytes) -> Any:
        out = stream(chunk) if callable(stream) else chunk
        if not isinstance(out, bytes):
            out = list(out or [])  # an iterable of chunks: read it once, hand the same back
        try:
            buf = claim.captured
            for part in [out] if isinstance(out, bytes) else out:
                if buf is None or claim.overflow:
                    break
                if len(buf) + len(part) > MAX_STORED_BYTES or not _room(share, len(part)):
                    drop_capture(claim, overflow=True)
                    break
                buf.extend(part)
        except Exception:  # capture only: never disturb the answer
            drop_capture(claim, overflow=True)
        return out

    return watch


def _room(share: Share | None, n: int) -> bool:
    """Take `n` bytes of `share` if they fit as things are: a copy for a replay gives way, it never
    makes the budget close a stalled answer to make room for it."""
    return share is None or (share.budget.held + n <= share.limit and share.reserve(n))


def drop_capture(claim: Claim, overflow: bool = False) -> None:
    """Let go of a streamed answer's copy, and of what it held of the budget."""
    claim.captured = None
    claim.overflow = claim.overflow or overflow
    if claim.share is not None:
        claim.share.give_all()
