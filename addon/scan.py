"""What a JSON-RPC answer says, read without parsing it: linear time, bounded memory. Pure.

Settling a call needs three facts about the message answering it: its top-level `id`,
whether it has a top-level `error`, and whether `result.isError` is `true`. `MessageScanner`
finds them in a byte stream fed in pieces of any size, skipping everything else: a 50 MB
result or one nested ten thousand levels deep costs one pass and a few small buffers,
never a recursion or a copy of the whole message.

A top-level array (a batch, from 2025-03-26 servers) yields one summary per element.

It also notes what the MCP Python SDK client needs to read a message at all (jsonrpc.sdk_reads): the
kind of its id, whether its `params` is an object or null, and whether its `error` has an integer
`code` and a string `message`. What it cannot see is in the values it skips: a lone surrogate's escape,
an integer too long, nesting too deep (jsonrpc.answer_messages and call.clients_read check those on a
parsed event).
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import re
from dataclasses import dataclass
from typing import Any

MAX_MESSAGES = 1024  # summaries kept from one batch; a batch answering a single call needs one
_MAX_KEY = 64  # raw bytes of a key worth reading: "isError" spelled with \u escapes is 42
_MAX_SCALAR = 4096  # raw bytes of an id worth reading: 200 characters as \uXXXX surrogate pairs fit
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")  # a JSON number without fraction or exponent
# pydantic's lax integer from a string (ErrorData.code): spaces around, a sign, digits (single
# underscores between them), an optional fraction of zeros; ASCII digits only, Python's 4300 at most
_INT_TEXT = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?", re.ASCII)
_MAX_INT_DIGITS = 4300
_I64 = 2**63

_WS = frozenset(b" \t\r\n")
_SHALLOW = re.compile(rb'[{}\[\]:,"]|[^\s{}\[\]:,"]+')  # structure, strings, and runs of scalar bytes
_DEEP = re.compile(rb'[{}\[\]"]')  # deep inside a value only nesting and strings matter
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_DEEP_RUN = re.compile(rb'[^"]*(?:' + _STRING + rb'[^"]*)*', re.DOTALL)  # whole strings and everything else
_STRINGS = re.compile(_STRING, re.DOTALL)
_STRING_OR_BRACKET = re.compile(_STRING + rb'|[{}\[\]]', re.DOTALL)
_WINDOW = 1 << 16
_STEP = bytes.maketrans(b"{[}]", b"\x02\x02\x00\x00")
_IS_BRACKET = bytes(1 if c in b"{[}]" else 0 for c in range(256))
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"{[}]")
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # up to a quote or a final backslash


@dataclass(slots=True)
class Message:
    """What one top-level JSON-RPC message says, as far as settlement cares."""

    id_raw: bytes | None = None  # the raw JSON of a scalar id, if short enough to be one
    has_method: bool = False  # a `method` that is a string: a request or a notification, not an answer
    has_error: bool = False  # an `error`, whatever its value
    has_result: bool = False  # a `result`, whatever its value
    is_error: bool = False  # result is an object whose isError is the literal true
    # What the MCP SDK clients require of an answer (jsonrpc.scanned_outcome): `"jsonrpc": "2.0"` (and a
    # body they can read: see jsonrpc.answer_messages), a `result` that is an object, an `error` object.
    version_ok: bool = False
    result_obj: bool = False
    error_obj: bool = False
    # What the MCP Python SDK client requires of any message (jsonrpc.sdk_reads): an element of a batch is
    # none; a `params` that is an object or null (or absent); an id it takes for a request or an answer (a
    # string, or an integer without fraction or exponent), or null (an error's); an error object whose
    # `code` is an integer as pydantic reads one (sdk_int) and whose `message` is a string.
    batched: bool = False
    params_ok: bool = True
    id_ok: bool = False
    id_null: bool = False
    error_ok: bool = False

    def id_value(self) -> Any:
        """The id as JSON reads it, or None when absent or unreadable."""
        if self.id_raw is None:
            return None
        try:
            return json.loads(self.id_raw)
        except (ValueError, UnicodeDecodeError):
            return None


class MessageScanner:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._depth = 0
        self._kinds: list[int] = []  # b"{" or b"[" of each open container, for the levels we read
        self._want_key: list[bool] = []  # per open object: the next string is a key
        self._keys: list[bytes | None] = []  # per open container: the key of the value being read
        self._level = 0  # the depth of message objects: 1 for a message, 2 for a batch's elements
        self._msg: Message | None = None
        self._result_obj = False  # the current message's result is an object (its keys are read)
        self._error_obj = False  # the current message's error is an object (its keys are read)
        self._code_ok = self._message_ok = False  # in it, an integer code and a string message
        self._ended = False  # the top-level value is complete
        self.malformed = False
        self.dropped = 0  # messages read past MAX_MESSAGES, not kept: `messages` does not say all it holds
        # a string or scalar split across pieces
        self._in_string = False
        self._escape = False
        self._capture: bytearray | None = None
        self._capture_limit = 0
        self._scalar: bytearray | None = None
        self._string_role = ""  # "key", "id", or "" (skipped)

    # --- feeding -----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.malformed:
            if self._in_string:
                pos = self._string_part(data, pos)
                continue
            if self._scalar is not None:
                m = _SHALLOW.match(data, pos)
                if m is not None and m.group()[0] not in b'{}[]:,"' and m.group()[0] not in _WS:
                    self._grow(self._scalar, m.group(), _MAX_SCALAR)
                    pos = m.end()
                    continue
                self._end_scalar()
            if self._deep():
                pos = self._skip_deep(data, pos)
                m = _DEEP.search(data, pos)
                if m is None:
                    return
                pos = m.end()
                self._token(m.group())
                continue
            while pos < n and data[pos] in _WS:
                pos += 1
            if pos >= n:
                return
            m = _SHALLOW.match(data, pos)
            assert m is not None
            pos = m.end()
            self._token(m.group())

    def finish(self) -> list[Message] | None:
        """The messages read, or None if the input was not one complete JSON value."""
        if self._scalar is not None:
            self._end_scalar()
        if self.malformed or self._in_string or self._depth or not (self._ended or self._level == 0):
            return None
        return self.messages

    # --- tokens ------------------------------------------------------------------------------------

    def _deep(self) -> bool:
        return self._level > 0 and self._depth > self._level + 1

    def _skip_deep(self, data: bytes, pos: int) -> int:
        """Jump over a stretch that stays below the levels we read, counting in C, not in Python.

        Where the stretch climbs back up to a level we read, jump to the bracket that does it: the
        tokens before it are never looked at one by one, so the whole scan stays linear.
        """
        # Windows grow from small: a short dive costs what it skips, not a whole window.
        window, start = 1024, pos
        while True:
            end = _DEEP_RUN.match(data, pos, min(len(data), pos + window)).end()  # type: ignore[union-attr]
            if end - pos < 256:
                return pos
            brackets = _STRINGS.sub(b"", data[pos:end]).translate(_STEP, _NOT_BRACKET)  # 2 opens, 0 closes
            if not brackets:
                pos = end
            else:
                # the depth after each bracket, relative to here, is the running sum minus the count so far
                depths = list(map(operator.sub, itertools.accumulate(brackets), itertools.count(1)))
                floor = self._level + 1 - self._depth  # at or above this relative depth, tokens are read again
                if min(depths) <= floor:
                    break
                self._depth += depths[-1]
                pos = end
            if end >= len(data):
                return pos
            window = min(window * 2, _WINDOW)
            if pos - start >= _WINDOW:
                return pos
        k = next(i for i, d in enumerate(depths) if d <= floor)  # the bracket that climbs back
        if k == 0:
            return pos
        self._depth += depths[k - 1]
        piece = data[pos:end]
        if b'"' not in piece:  # no strings to step over: find the k-th bracket in C
            counts = list(itertools.accumulate(piece.translate(_IS_BRACKET)))
            return pos + bisect.bisect_left(counts, k + 1)
        seen = 0
        for m in _STRING_OR_BRACKET.finditer(data, pos, end):
            if m.group()[0] != 0x22:  # a bracket, not a string
                if seen == k:
                    return m.start()
                seen += 1
        raise AssertionError("the window holds the brackets it was counted from")  # pragma: no cover

    def _token(self, tok: bytes) -> None:
        c = tok[0]
        if self._ended and c not in _WS:
            self.malformed = True  # something after the top-level value
            return
        if c == 0x22:  # "
            self._start_string()
        elif c in b"{[":
            self._open(c)
        elif c in b"}]":
            self._close(c)
        elif self._depth == 0 or self._deep():
            if self._depth == 0:
                self._ended = True  # a top-level scalar: no message
                self._scalar = bytearray()  # swallow the rest of it
        elif c == 0x3A:  # :
            if self._kinds[-1] == 0x7B:
                self._want_key[-1] = False
        elif c == 0x2C:  # ,
            if self._kinds[-1] == 0x7B:
                self._want_key[-1] = True
                self._keys[-1] = None
        else:
            self._scalar = bytearray(tok[:_MAX_SCALAR])

    def _open(self, c: int) -> None:
        if self._depth == 0:
            self._level = 1 if c == 0x7B else 2
        self._depth += 1
        if self._depth > self._level + 1:
            return
        key = self._keys[-1] if self._keys else None
        if self._depth == self._level and c == 0x7B:
            self._msg, self._result_obj, self._error_obj = Message(batched=self._level == 2), False, False
        elif self._depth == self._level + 1 and self._msg is not None and key == b"result":
            self._result_obj = self._msg.result_obj = c == 0x7B
        elif self._depth == self._level + 1 and self._msg is not None and key == b"error":
            self._error_obj = self._msg.error_obj = c == 0x7B
            self._code_ok = self._message_ok = False
        elif self._depth == self._level + 1 and self._msg is not None and key == b"params":
            self._msg.params_ok = c == 0x7B
        self._kinds.append(c)
        self._want_key.append(c == 0x7B)
        self._keys.append(None)

    def _close(self, c: int) -> None:
        if self._depth == 0:
            self.malformed = True
            return
        self._depth -= 1
        if self._depth >= self._level + 1:
            return
        opened = self._kinds.pop()
        self._want_key.pop()
        self._keys.pop()
        if opened != (0x7B if c == 0x7D else 0x5B):
            self.malformed = True
            return
        if self._depth == self._level and self._error_obj and self._msg is not None and self._keys[-1] == b"error":
            self._msg.error_ok = self._code_ok and self._message_ok  # the error object just closed
            self._error_obj = False
        if self._depth + 1 == self._level and self._msg is not None:
            if len(self.messages) < MAX_MESSAGES:
                self.messages.append(self._msg)
            else:
                self.dropped += 1
            self._msg = None
        if self._depth == 0:
            self._ended = True

    # --- strings and scalars -----------------------------------------------------------------------

    def _start_string(self) -> None:
        self._in_string, self._escape = True, False
        self._capture, self._string_role = None, ""
        if self._depth == 0:
            self._ended = True  # a top-level string: no message
            return
        if self._deep():
            return
        if self._kinds[-1] == 0x7B and self._want_key[-1]:
            self._string_role, self._capture, self._capture_limit = "key", bytearray(b'"'), _MAX_KEY
        elif self._depth == self._level and self._keys[-1] == b"id":
            self._string_role, self._capture, self._capture_limit = "id", bytearray(b'"'), _MAX_SCALAR
            if self._msg is not None:
                self._msg.id_ok = True  # a string id, however long
        elif self._depth == self._level and self._keys[-1] == b"jsonrpc":
            self._string_role, self._capture, self._capture_limit = "jsonrpc", bytearray(b'"'), _MAX_KEY
        elif self._depth == self._level and self._keys[-1] == b"method" and self._msg is not None:
            self._msg.has_method = True  # a string method: a request or a notification
        elif self._depth == self._level + 1 and self._error_obj and self._keys[-1] == b"code":
            self._string_role, self._capture, self._capture_limit = "code", bytearray(b'"'), _MAX_SCALAR
        elif self._depth == self._level + 1 and self._error_obj and self._keys[-1] == b"message":
            self._message_ok = True

    def _string_part(self, data: bytes, pos: int) -> int:
        if self._escape:  # the byte after a backslash that ended the previous piece
            self._escape = False
            if self._capture is not None:
                self._grow(self._capture, data[pos : pos + 1], self._capture_limit)
            return pos + 1
        end = _STRING_BODY.match(data, pos).end()  # type: ignore[union-attr]  # matches at least b""
        if self._capture is not None:
            self._grow(self._capture, data[pos:end], self._capture_limit)
        if end >= len(data):
            return end
        if data[end] == 0x5C:  # a backslash ending the piece: the byte it escapes comes next
            if self._capture is not None:
                self._grow(self._capture, b"\\", self._capture_limit)
            self._escape = True
            return end + 1
        self._in_string = False
        if self._capture is not None:
            self._grow(self._capture, b'"', self._capture_limit)
            self._end_string(bytes(self._capture))
        self._capture = None
        return end + 1

    def _end_string(self, raw: bytes) -> None:
        if self._string_role in ("id", "code"):
            self._set_scalar(raw)
            return
        if self._string_role == "jsonrpc":
            if self._msg is not None and len(raw) <= _MAX_KEY:
                try:
                    self._msg.version_ok = json.loads(raw) == "2.0"
                except (ValueError, UnicodeDecodeError):
                    pass
            return
        # a key: what it names, read as JSON reads it (so "\u0069d" is "id")
        key: bytes | None = None
        if len(raw) <= _MAX_KEY:
            try:
                key = json.loads(raw).encode("utf-8", "surrogatepass")
            except (ValueError, UnicodeDecodeError):
                key = None
        self._keys[-1] = key
        if self._msg is None:
            return
        if self._depth == self._level:
            if key == b"method":  # a repeated key replaces the earlier one, as in json.loads
                self._msg.has_method = False  # until its value is a string
            elif key == b"jsonrpc":
                self._msg.version_ok = False  # until its value is "2.0"
            elif key == b"error":
                self._msg.has_error, self._msg.error_obj, self._msg.error_ok = True, False, False
                self._error_obj = False
            elif key == b"result":
                self._msg.has_result, self._msg.is_error, self._result_obj = True, False, False
                self._msg.result_obj = False
            elif key == b"id":
                self._msg.id_raw, self._msg.id_ok, self._msg.id_null = None, False, False
            elif key == b"params":
                self._msg.params_ok = False  # until its value is an object or null
        elif self._depth == self._level + 1 and self._result_obj and key == b"isError":
            self._msg.is_error = False
        elif self._depth == self._level + 1 and self._error_obj and key == b"code":
            self._code_ok = False  # until its value is an integer
        elif self._depth == self._level + 1 and self._error_obj and key == b"message":
            self._message_ok = False  # until its value is a string

    def _end_scalar(self) -> None:
        raw, self._scalar = bytes(self._scalar or b""), None
        if raw and self._depth > 0 and not self._deep():
            self._set_scalar(raw)

    def _set_scalar(self, raw: bytes) -> None:
        if self._msg is None or not self._keys:
            return
        key = self._keys[-1]
        if self._depth == self._level and key == b"id":
            self._msg.id_raw = raw if len(raw) < _MAX_SCALAR else None
            if raw[:1] != b'"':
                self._msg.id_ok, self._msg.id_null = _INTEGER.fullmatch(raw) is not None, raw == b"null"
        elif self._depth == self._level and key == b"params":
            self._msg.params_ok = raw == b"null"
        elif self._depth == self._level + 1 and self._result_obj and key == b"isError":
            self._msg.is_error = raw == b"true"
        elif self._depth == self._level + 1 and self._error_obj and key == b"code":
            self._code_ok = _scalar_int(raw)

    @staticmethod
    def _grow(buf: bytearray, piece: bytes, limit: int) -> None:
        if len(buf) <= limit:
            buf += piece[: limit + 1 - len(buf)]


def sdk_int(value: Any) -> bool:
    """Whether pydantic reads this JSON value as an integer in lax mode (the Python SDK's ErrorData.code):
    an integer or a boolean, a float that is a whole number in 64 bits, or a string that spells one."""
    if isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return value.is_integer() and -_I64 <= value < _I64
    if isinstance(value, str):
        text = value.strip()
        return _INT_TEXT.fullmatch(text) is not None and sum(c.isdigit() for c in text) <= _MAX_INT_DIGITS
    return False


def _scalar_int(raw: bytes) -> bool:
    if len(raw) > _MAX_SCALAR:
        return False  # only part of it was kept
    try:
        return sdk_int(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        return False


_VALUE_OR_BRACKET = re.compile(_STRING + rb'|[{}\[\]]|[^\s{}\[\]",:]+', re.DOTALL)


def values_deeper(data: bytes, limit: int) -> bool:
    """Whether a value of this JSON text lies more than `limit` levels deep, the top-level value at level
    1 (as jiter counts: an empty array at level `limit` is within it, a number inside it is not). The
    brackets' depth is counted in C; a Python loop runs only when the deepest brackets are exactly at
    `limit`, to see whether one of them holds anything."""
    if data.count(b"[") + data.count(b"{") < limit:
        return False
    steps = _STRINGS.sub(b"", data).translate(_STEP, _NOT_BRACKET)  # 2 for an opening bracket, 0 a closing
    deepest = max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)
    if deepest != limit:
        return deepest > limit
    depth = 0
    for m in _VALUE_OR_BRACKET.finditer(data):
        c = m.group()[0]
        if c in b"]}":
            depth -= 1
        elif depth == limit:
            return True  # a value inside a container `limit` deep
        elif c in b"[{":
            depth += 1
    return False
