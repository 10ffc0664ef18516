"""addon.decoding: answers decoded by the meter never grow past the limit."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import brotli
import pytest

from addon.decoding import TooLarge, decode_bounded

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]

BODY = b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}'


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


CODERS = {
    "gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("coding", [*CODERS, "GZip "])
def test_each_coding_decodes(coding: str) -> None:
    assert decode_bounded(CODERS[coding.strip().lower()](BODY), coding, 1000) == BODY


def test_raw_deflate_and_stacked_codings() -> None:
    assert decode_bounded(deflate_raw(BODY), "deflate", 1000) == BODY
    assert decode_bounded(brotli.compress(gzip.compress(BODY)), "gzip, br", 1000) == BODY
    assert decode_bounded(gzip.compress(BODY) + gzip.compress(BODY), "gzip", 1000) == BODY * 2
    assert decode_bounded(BODY, None, 10) == BODY  # identity: already held, returned as is
    assert decode_bounded(BODY, "identity", 10) == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_bomb_stops_at_the_limit(coding: str) -> None:
    bomb = CODERS[coding](b"\0" * (48 * 1024 * 1024))
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            decode_bounded(bomb, coding, 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize("raw, coding", [
    (b"not gzip", "gzip"), (gzip.compress(BODY)[:-10], "gzip"), (b"xx", "br"), (b"xx", "zstd"),
    (BODY, "compress"), (zstd.compress(BODY)[:-3], "zstd"),
])
def test_unknown_or_broken_codings_are_unreadable(raw: bytes, coding: str) -> None:
    assert decode_bounded(raw, coding, 1000) is None


def test_exactly_the_limit_passes() -> None:
    assert decode_bounded(gzip.compress(b"a" * 100), "gzip", 100) == b"a" * 100
    with pytest.raises(TooLarge):
        decode_bounded(gzip.compress(b"a" * 101), "gzip", 100)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_stream_decodes_in_pieces_and_stops_at_the_limit(coding: str) -> None:
    from addon.decoding import StreamDecoder

    data = b"data: hello\n\n" * 1000
    raw = CODERS[coding](data)
    d = StreamDecoder(coding, 1 << 20)
    assert b"".join(d.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) == data and not d.failed
    assert not d.too_large
    bomb = CODERS[coding](b"\0" * (8 << 20))
    d = StreamDecoder(coding, 1 << 16)
    assert sum(len(d.feed(bomb[i : i + 512])) for i in range(0, len(bomb), 512)) <= 1 << 16
    assert d.failed and d.too_large  # stopped for the size alone: the answer counts as delivered
    assert StreamDecoder("compress", 100).feed(b"x") == b""
    broken = StreamDecoder(coding, 1 << 20)
    broken.feed(b"\xff" * 64)
    assert broken.failed and not broken.too_large  # unreadable, not too large
