"""Content-coded answers, decoded by the meter with a ceiling. Pure.

The gateway asks upstreams for `Accept-Encoding: identity`, but an upstream may compress
anyway, and a few kilobytes of gzip can inflate to gigabytes. mitmproxy's own decoding
(`Response.content`, `get_content`) has no ceiling, so the meter never calls it on an
answer: it decodes here, at most `limit` bytes, and gives up past that.
"""

from __future__ import annotations

import zlib
from typing import Any

import brotli

try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14
except ImportError:  # pragma: no cover - mitmproxy depends on the backport before 3.14
    from backports import zstd  # type: ignore[import-not-found,no-redef]


class TooLarge(ValueError):
    """The decoded answer would pass the limit."""


def decode_bounded(raw: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """`raw` with its content codings undone, or None if a coding is unknown or broken.

    Raises TooLarge as soon as a decoded step would pass `limit` bytes, having decoded at
    most `limit + 1` of them. An identity answer is returned as it is (it is already held).
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):  # the last coding applied is undone first
        if coding == "identity":
            continue
        try:
            decoded = _decode(data, coding, limit)
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError):
            return None
        if decoded is None:
            return None
        data = decoded
    return data


def _decode(data: bytes, coding: str, limit: int) -> bytes | None:
    if coding in ("gzip", "x-gzip"):
        return _drain(lambda: zlib.decompressobj(zlib.MAX_WBITS | 16), data, limit)
    if coding == "deflate":
        try:  # RFC 9110 deflate is zlib-wrapped; some servers send it raw
            return _drain(lambda: zlib.decompressobj(zlib.MAX_WBITS), data, limit)
        except zlib.error:
            return _drain(lambda: zlib.decompressobj(-zlib.MAX_WBITS), data, limit)
    if coding == "br":
        return _brotli(data, limit)
    if coding == "zstd":
        return _drain(zstd.ZstdDecompressor, data, limit)
    return None


def _drain(new: Any, data: bytes, limit: int) -> bytes:
    """Decode every member (gzip and zstd allow several) with at most limit + 1 bytes out."""
    out = bytearray()
    while data:
        d = new()
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise TooLarge(limit)
        if not d.eof:
            if getattr(d, "unconsumed_tail", b"") or not getattr(d, "needs_input", True):
                raise TooLarge(limit)  # output stopped at the ceiling with input left
            raise EOFError("truncated")
        data = d.unused_data
    return bytes(out)


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = bytearray(d.process(data, output_buffer_limit=limit + 1))
    while len(out) <= limit and not d.is_finished() and not d.can_accept_more_data():
        out += d.process(b"", output_buffer_limit=limit + 1 - len(out))
    if len(out) > limit:
        raise TooLarge(limit)
    if not d.is_finished():
        raise EOFError("truncated")
    return bytes(out)


class StreamDecoder:
    """Undo one content coding of a streamed answer, piece by piece, up to `limit` bytes in all.

    Past the limit (or on a broken stream) it yields nothing more: the meter stops reading,
    the client still gets every byte as sent. `too_large` says it stopped at the limit.
    """

    def __init__(self, coding: str, limit: int) -> None:
        coding = coding.strip().lower()
        self.limit, self.total, self.failed, self.too_large = limit, 0, False, False
        if coding in ("gzip", "x-gzip"):
            self._d: Any = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif coding == "deflate":
            self._d = zlib.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip header, detected
        elif coding == "zstd":
            self._d = zstd.ZstdDecompressor()
        elif coding == "br":
            self._d = brotli.Decompressor()
        else:
            self._d, self.failed = None, True

    def discard(self) -> None:
        """The stream is over: its decompressor's state goes; `failed` and `too_large` stay."""
        self._d = None

    def feed(self, chunk: bytes) -> bytes:
        if self.failed or not chunk or self._d is None:
            return b""
        room = self.limit - self.total
        try:
            if isinstance(self._d, brotli.Decompressor):
                out = self._d.process(chunk, output_buffer_limit=room + 1)
                if not self._d.can_accept_more_data():
                    self.failed = self.too_large = True  # output held back past the limit
            else:
                out = self._d.decompress(chunk, room + 1)
                if getattr(self._d, "unconsumed_tail", b""):
                    self.failed = self.too_large = True  # output stopped at the limit
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError):
            self.failed = True
            return b""
        self.total += len(out)
        if self.total > self.limit:
            self.failed = self.too_large = True
            return b""
        return out
