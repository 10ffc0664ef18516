"""What the gateway keeps out of flows, logs and answers. Pure.

Flows are what mitmproxy saves (`-w`) and mitmweb shows, so secrets are replaced on the
flow itself as soon as the request's headers are read: the consumer's credentials (they never go
upstream) and those it wraps for the upstream (`X-Forward-Authorization`: the gateway keeps them
off the flow until it forwards); the publisher's upstream headers before the flow can be seen
(compat puts their values, and the unwrapped ones, back only in the bytes sent upstream).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

from mitmproxy.http import Headers

from .auth import KEY_PATTERN, Credential

REDACTED = "(redacted)"
# What a consumer may send that carries a credential; forwarding strips all of them.
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
# A consumer's own credential for the upstream, wrapped so the gateway forwards it (see forwarding).
FORWARDED_CREDENTIAL_HEADERS = tuple(f"x-forward-{name}" for name in CREDENTIAL_HEADERS)
GATEWAY_PREFIX = "x-mcpmeter-"


_CREDENTIAL_NAMES = frozenset(name.encode() for name in CREDENTIAL_HEADERS)
_FORWARDED_NAMES = frozenset(name.encode() for name in FORWARDED_CREDENTIAL_HEADERS)
_REDACTED = REDACTED.encode()
_KEY = re.compile(KEY_PATTERN + "+")
# A field name's characters (RFC 9110 §5.6.2 tchar). Kept here, not in forwarding (which builds its own
# patterns from it): the guard's redactor uses this module and imports nothing a broken reload could take away.
TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
TOKEN = re.compile(TCHAR + rb"+")


def redact_credentials(headers: Headers, key_prefix: str | None = None) -> None:
    """Replace every credential header's value (its fields become one, where the first was); a
    bearer key keeps its displayable prefix. A header whose values are all redacted is left as is."""
    # One pass over the raw fields: on every request, and Headers' by-name methods each rescan them.
    fields = headers.fields
    done: dict[bytes, bool] = {}  # credential header -> all its values are redacted already
    for name, value in fields:
        low = name.lower()
        if low in _CREDENTIAL_NAMES:
            done[low] = done.get(low, True) and value.endswith(_REDACTED)
    if all(done.values()):
        return
    shown = {low: (f"Bearer {key_prefix} {REDACTED}".encode("utf-8", "surrogateescape")
                   if low == b"authorization" and key_prefix else _REDACTED) for low in done}
    kept: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        low = name.lower()
        if low not in done or done[low]:
            kept.append((name, value))
        elif low in shown:
            kept.append((name, shown.pop(low)))  # the first field of the header; the others go
    headers.fields = tuple(kept)


def redact_untokened(headers: Headers) -> None:
    """Replace the value of every field whose name is not a token (`Cookie : x`, `Authorization\t: ...`):
    the request is refused (forwarding.untokened), but a server that trims the name would read a credential
    there, and the flow is saved as it is."""
    fields = headers.fields
    if not all(TOKEN.fullmatch(name) for name, _ in fields):
        headers.fields = tuple((name, value if TOKEN.fullmatch(name) else _REDACTED) for name, value in fields)


def take_forwarded_credentials(headers: Headers) -> list[str]:
    """Replace every `X-Forward-Authorization` (or cookie) value with REDACTED; return the values, in
    field order, for `reveal_forwarded_credentials` (only the bytes sent upstream carry them)."""
    fields = headers.fields
    taken = [value.decode("utf-8", "surrogateescape") for name, value in fields if name.lower() in _FORWARDED_NAMES]
    if taken:
        headers.fields = tuple((name, _REDACTED if name.lower() in _FORWARDED_NAMES else value)
                               for name, value in fields)
    return taken


def reveal_forwarded_credentials(fields: Iterable[tuple[str, str]], taken: list[str]) -> list[tuple[str, str]]:
    """`fields` (as Headers.items(multi=True) gives them) with the values `take_forwarded_credentials`
    took put back, in order, into the fields they came from."""
    values = iter(taken)
    return [(name, next(values, value) if name.lower() in FORWARDED_CREDENTIAL_HEADERS else value)
            for name, value in fields]


def drop_gateway_headers(headers: Headers) -> list[str]:
    """Remove the X-Mcpmeter-* headers an upstream sent: only the gateway sets them. Returns their names."""
    names = list({name.lower(): name for name in headers if name.lower().startswith(GATEWAY_PREFIX)}.values())
    for name in names:
        del headers[name]
    return names


# A publisher header value shorter than this is not looked for in answers: "1", "true" or "json" would
# drop unrelated headers, and a value that short is no secret worth guarding.
MIN_ECHOED_SECRET_CHARS = 8


def drop_echoed_secrets(headers: Headers, secrets: Iterable[str]) -> list[str]:
    """Remove every field whose value holds one of `secrets` (the publisher's upstream header values, which
    an upstream, its framework's error page or a debugging proxy may repeat in its answer: the consumer and
    saved flows would see them). Exact bytes only; values under MIN_ECHOED_SECRET_CHARS are not looked
    for. Bodies are not searched. Returns the names of the fields removed."""
    needles = [s.encode("utf-8", "surrogateescape") for s in secrets if len(s) >= MIN_ECHOED_SECRET_CHARS]
    if not needles:
        return []
    fields = headers.fields
    dropped = [name for name, value in fields if any(n in value for n in needles)]
    if dropped:
        headers.fields = tuple((name, value) for name, value in fields if not any(n in value for n in needles))
    return [name.decode("utf-8", "surrogateescape") for name in dropped]


def holds_key(text: str) -> bool:
    """Whether `text` holds what looks like a bearer key, raw or percent-encoded (`mcpm%5Flive%5F...`)."""
    if "mcpm" not in text and "%" not in text:
        return False  # the common case: no key could be spelled here
    return _KEY.search(text) is not None or _KEY.search(unquote_plus(text, errors="replace")) is not None


def redact_target_key(path: str) -> str | None:
    """`path` (a request target) with the part holding what looks like a bearer key replaced by REDACTED:
    the query (`?key=mcpm_live_...`, `?access_token=mcpm%5Flive%5F...`), the path itself
    (`/slug/mcpm_live_...`), or both; None when it holds none. The request is then refused, and its
    flow keeps no key."""
    route, mark, query = path.partition("?")
    in_route, in_query = holds_key(route), holds_key(query)
    if not (in_route or in_query):
        return None
    return (f"/{REDACTED}" if in_route else route) + (f"?{REDACTED}" if in_query else mark + query)


def redact_header_keys(headers: Headers) -> list[str]:
    """Replace the value of every field holding what looks like a bearer key with REDACTED, and the name of
    every field named with one (`mcpm_live_...: 1`, headers built the wrong way round); return their names
    (REDACTED for the latter). The credential headers are left to `redact_credentials` (Authorization
    carries the key, and none is forwarded), the wrapped ones to `take_forwarded_credentials` (a consumer's
    credential for an upstream, which may be another gateway's key on purpose). Any other header is
    forwarded as it is: a key there (`X-Api-Key: mcpm_live_...`) would reach the publisher, so the request
    is refused."""
    fields = headers.fields
    named = {name for name, _ in fields if _holds_key_bytes(name)}
    found = [name for name, value in fields if name in named or (
        name.lower() not in _CREDENTIAL_NAMES and name.lower() not in _FORWARDED_NAMES and _holds_key_bytes(value))]
    if found:
        names = set(found)
        headers.fields = tuple((_REDACTED if name in named else name, _REDACTED if name in names else value)
                               for name, value in fields)
    return [REDACTED if name in named else name.decode("utf-8", "surrogateescape") for name in found]


def redact_trailers(trailers: Headers | None) -> None:
    """Redact a request's trailer fields as its header fields are. They come after `requestheaders`,
    with the end of the body, and are never forwarded (admission drops them), so a key there is not
    refused; but a refused flow kept them as sent, and is saved with them."""
    if trailers:
        redact_untokened(trailers)
        redact_credentials(trailers)
        take_forwarded_credentials(trailers)
        redact_header_keys(trailers)


def _holds_key_bytes(text: bytes) -> bool:
    return (b"mcpm" in text or b"%" in text) and holds_key(text.decode("utf-8", "surrogateescape"))


def scrub_keys(text: str) -> str:
    """`text` with every bearer key in it shown by its prefix only, as a flow shows it."""
    if "mcpm_" not in text:
        return text
    return _KEY.sub(lambda m: f"{Credential(m.group(0), m.group(1)).prefix} {REDACTED}", text)


class KeyFilter(logging.Filter):
    """Bearer keys out of log lines that quote client bytes: mitmproxy's message about a head it cannot
    read (`Invalid header line: b'Authorization Bearer mcpm_...'`), a refused request's path."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "mcpm_" in text:
            record.msg, record.args = scrub_keys(text), None
        return True
