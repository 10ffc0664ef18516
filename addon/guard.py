"""Fail closed when the meter is gone: a guard that outlives the `-s` script.

mitmproxy hot-reloads the script; when the new file (or something it imports) fails to
load, mitmproxy drops the meter and keeps proxying to the reverse-mode target, unmetered.
The guard is added once to the master itself, at the end of the addon chain (after the
script loader, so after the meter), and stays there across reloads. Its `request` hook
answers 503 `meter_unavailable` to every flow that no working meter has claimed and that
nobody has answered: a meter claims a flow only when it decided to forward it.

A second small addon, right after the script loader (so after the meter, before mitmweb's view,
which shows a flow from `requestheaders` on), redacts credential headers in that hook, the
consumer's and those it wraps for the upstream, and a key in the query (a no-op after the meter did),
and the same in a request's trailer fields in `request`,
so a flow shown or saved while no meter is loaded holds no key either. The guard, last in the chain,
keeps every answer to HEAD body-less: mitmproxy sends the body an addon put in an answer even to HEAD,
and a keep-alive client would read those bytes as the next answer. Both import nothing that a reload or a broken
dependency could take away, and keep no state but a weak set of claimed flows.
"""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from typing import Any

from mitmproxy import http

from .errors import ERRORS
from .redaction import (redact_credentials, redact_header_keys, redact_target_key, redact_trailers,
                        redact_untokened, take_forwarded_credentials)

log = logging.getLogger("mcpmeter")

NAME = "mcpmeter_guard"
REDACTOR = "mcpmeter_redactor"
_SPEC = ERRORS["meter_unavailable"]
_claimed: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()


def claim(flow: http.HTTPFlow) -> None:
    """A working meter has metered this flow and lets it go upstream."""
    _claimed.add(flow)


class CredentialRedactor:
    """Redacts what the meter would in `requestheaders` (a no-op after it did): right after the script
    loader, so before mitmweb's view, which sends a flow to the browser in that hook."""

    name = REDACTOR

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        redact_untokened(flow.request.headers)
        redact_credentials(flow.request.headers)
        take_forwarded_credentials(flow.request.headers)  # nothing is forwarded without a meter
        redact_header_keys(flow.request.headers)
        if (redacted := redact_target_key(flow.request.path)) is not None:
            flow.request.path = redacted

    def request(self, flow: http.HTTPFlow) -> None:
        redact_trailers(flow.request.trailers)  # they come with the end of the body, after requestheaders


class FailClosedGuard:
    name = NAME

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return  # answered (by the meter or anyone else) or already dead: nothing goes upstream
        if flow in _claimed:
            _claimed.discard(flow)
            return
        request_id = str(uuid.uuid4())
        log.warning("mcpmeter: no meter loaded; refusing %s %s (%s)", flow.request.method,
                  flow.request.path[:200], request_id)
        body = {"error": _SPEC.code, "message": _SPEC.message, "request_id": request_id}
        flow.response = http.Response.make(_SPEC.status, json.dumps(body).encode(), {
            "Content-Type": "application/json", "Retry-After": "1",
            "X-Mcpmeter-Request-Id": request_id, "X-Mcpmeter-Billed": "0"})
        flow.comment, flow.marked = f"refused {_SPEC.status} {_SPEC.code}", ":no_entry:"

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.request.method.upper() == "HEAD" and flow.response is not None and flow.response.raw_content:
            flow.response.raw_content = b""  # Content-Length stays: what a GET would have carried


def install(master: Any) -> None:
    """Add the guard to `master`, and the redactor right after the script loader (without one: at the
    end), unless they are there already (a reload runs this again)."""
    if master is None:
        return
    if master.addons.get(REDACTOR) is None:
        chain, loader = master.addons.chain, master.addons.get("scriptloader")
        redactor = master.addons.register(CredentialRedactor())
        chain.insert(chain.index(loader) + 1 if loader in chain else len(chain), redactor)
    if master.addons.get(NAME) is None:
        master.addons.add(FailClosedGuard())
