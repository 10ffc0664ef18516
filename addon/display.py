"""What mitmweb shows of a metered flow: a bounded copy of streamed answers, and who was metered.

mitmproxy keeps no body of a streamed answer (mitmweb says "Content is missing"). Under mitmweb the
gateway keeps the first `MAX_COPY_BYTES` of each streamed answer and sets it as the flow's content
when the stream ends. The copy lives only on the flow in memory (and in a file saved with `-w`);
it is never written to the database or the logs.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

MAX_COPY_BYTES = 1024 * 1024
NAME_CHARS = 191  # of a client-chosen name (a tool's) shown or kept for display: the ledger's column
TRUNCATED = b"\n[mcpmeter: display copy truncated at %d bytes]\n"
GATEWAY = "gateway answered"  # the comment prefix of flows the gateway answered itself
CONSUMER = "mcpmeter_consumer"  # flow.metadata key: {"user_id", "key_prefix"} of whoever called


def under_mitmweb(master: Any) -> bool:
    return type(master).__name__ == "WebMaster"


def keep_copy(flow: http.HTTPFlow, limit: int = MAX_COPY_BYTES) -> None:
    """Wrap the response's stream callable so what passes is also kept, up to `limit` bytes."""
    assert flow.response is not None
    inner = flow.response.stream
    if not callable(inner):
        return
    copy = bytearray()
    truncated = False

    def watch(chunk: bytes) -> Any:
        nonlocal truncated
        out = inner(chunk)
        if not isinstance(out, bytes):
            out = list(out or [])  # an iterable of chunks: read it once, hand the same back
        try:
            for part in [out] if isinstance(out, bytes) else out:
                room = limit - len(copy)
                if len(part) > room:
                    truncated = True
                copy.extend(part[: max(room, 0)])
            if chunk == b"" and flow.response is not None:  # the end of the stream
                flow.response.data.content = bytes(copy) + (TRUNCATED % limit if truncated else b"")
        except Exception:  # display only: never disturb the answer
            pass
        return out

    flow.response.stream = watch


def shown(name: str, limit: int = NAME_CHARS) -> str:
    """A client-chosen name (a tool's: any characters, up to 1,024 of them) as a comment, a log
    line or a command's answer shows it: cut at `limit` characters, control and other unprintable
    characters escaped, so it can neither run on nor start a line of its own."""
    return escaped(name[:limit]) + ("…" if len(name) > limit else "")


def escaped(text: str) -> str:
    """`text` as it is safe to print: a string with a control or other unprintable character (an
    escape sequence, a bidirectional override) is shown escaped, whole; any other as it is."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def consumer_label(flow: http.HTTPFlow, user_id: int | None) -> str:
    who = flow.metadata.get(CONSUMER) or {}
    prefix = who.get("key_prefix")
    user = f"user {user_id}" if user_id is not None else "user ?"
    return f"{user} ({prefix})" if prefix else user


def gateway_answered(flow: http.HTTPFlow, text: str, mark: str) -> None:
    flow.comment = f"{GATEWAY}: {text}"
    flow.marked = mark

