"""What the gateway keeps out of flows, logs and answers. Pure.

Flows are what mitmproxy saves (`-w`) and mitmweb shows, so secrets are replaced on the
flow itself: the consumer's credentials as soon as the request's headers are read (they
never go upstream anyway), the publisher's upstream headers before the flow can be seen
(compat puts their values back only in the bytes sent upstream).
"""

from __future__ import annotations

from mitmproxy.http import Headers

REDACTED = "(redacted)"
# What a consumer may send that carries a credential; forwarding strips all of them.
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")
# A consumer's own credential for the upstream, wrapped so the gateway forwards it (see forwarding).
FORWARDED_CREDENTIAL_HEADERS = tuple(f"x-forward-{name}" for name in CREDENTIAL_HEADERS)
GATEWAY_PREFIX = "x-mcpmeter-"


_CREDENTIAL_NAMES = frozenset(name.encode() for name in CREDENTIAL_HEADERS)
_REDACTED = REDACTED.encode()


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


def redact_forwarded_credentials(headers: Headers) -> None:
    """A request that is not forwarded keeps no `X-Forward-Authorization` (or cookie) value on its flow."""
    for name in FORWARDED_CREDENTIAL_HEADERS:
        if name in headers:
            headers.set_all(name, [REDACTED] * len(headers.get_all(name)))


def drop_gateway_headers(headers: Headers) -> list[str]:
    """Remove the X-Mcpmeter-* headers an upstream sent: only the gateway sets them. Returns their names."""
    names = list({name.lower(): name for name in headers if name.lower().startswith(GATEWAY_PREFIX)}.values())
    for name in names:
        del headers[name]
    return names
