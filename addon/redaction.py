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


def redact_credentials(headers: Headers, key_prefix: str | None = None) -> None:
    """Replace every credential header's value; a bearer key keeps its displayable prefix."""
    for name in CREDENTIAL_HEADERS:
        if name in headers and not all(v.endswith(REDACTED) for v in headers.get_all(name)):
            shown = f"Bearer {key_prefix} {REDACTED}" if name == "authorization" and key_prefix else REDACTED
            headers[name] = shown


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
