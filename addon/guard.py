"""Fail closed when the meter is gone: a guard that outlives the `-s` script.

mitmproxy hot-reloads the script; when the new file (or something it imports) fails to
load, mitmproxy drops the meter and keeps proxying to the reverse-mode target, unmetered.
The guard is added once to the master itself, at the end of the addon chain (after the
script loader, so after the meter), and stays there across reloads. Its `request` hook
answers 503 `meter_unavailable` to every flow that no working meter has claimed and that
nobody has answered: a meter claims a flow only when it decided to forward it.

It also redacts credential headers in `requestheaders`, the consumer's and those it wraps for the
upstream (a no-op after the meter did), so a flow saved while no meter is loaded holds no key
either. Last in the chain, it keeps every answer to HEAD body-less: mitmproxy sends the body an
addon put in an answer even to HEAD, and a keep-alive client would read those bytes as the next
answer. It imports nothing that a reload or a broken dependency could take away, and keeps no
state but a weak set of claimed flows.
"""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from typing import Any

from mitmproxy import http

from .errors import ERRORS
from .redaction import redact_credentials, take_forwarded_credentials

log = logging.getLogger("mcpmeter")

NAME = "mcpmeter_guard"
_SPEC = ERRORS["meter_unavailable"]
_claimed: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()


def claim(flow: http.HTTPFlow) -> None:
    """A working meter has metered this flow and lets it go upstream."""
    _claimed.add(flow)


class FailClosedGuard:
    name = NAME

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # The meter redacts first; without one, the guard does (idempotent), before any flow is saved.
        redact_credentials(flow.request.headers)
        take_forwarded_credentials(flow.request.headers)  # nothing is forwarded without a meter

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
    """Add the guard to `master` unless it is there already (a reload runs this again)."""
    if master is not None and master.addons.get(NAME) is None:
        master.addons.add(FailClosedGuard())
