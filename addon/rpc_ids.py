"""The number a JSON-RPC id string stands for to the MCP SDK clients, which match an answer to a request by it.

- The Python SDK (`mcp`, shared/dispatcher.py `coerce_request_id`) keys a request, and reads an answer's
  id, as the integer `int()` reads from a string, if it reads one: `"1"`, `"01"`, `" 1 "`, `"+1"`, `"1_0"`,
  `"١"` (any script's digits); else as the string.
- The TypeScript SDK (shared/protocol.js `_onresponse`) sends numeric ids and reads an answer's id with
  JavaScript's `Number()`: `"1.0"`, `"1e0"`, `"0x1"`, `".1e1"`, `"1."`, and `""` (0) too.

Both are read here without ever converting more than a few hundred digits (an answer's id is the
upstream's, as long as an event): the SDK clients' own ids are small numbers (a request's id is at most
2**53 - 1 or 200 characters, jsonrpc.py), so a longer number is nobody's.
"""

from __future__ import annotations

import math
import re
import unicodedata

# What int() strips around its digits: str.isspace() but for U+001C..U+001F (checked in tests).
_PY_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# JavaScript's StrWhiteSpaceChar: WhiteSpace and LineTerminator (ECMA-262, StringToNumber).
_JS_SPACE = "\t\n\v\f\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
# Possessive: linear on any string. `\d` is Unicode's Nd, the digits int() reads (checked in tests).
_PY_INT = re.compile(rf"[{_PY_SPACE}]*+([+-]?+)(\d(?:_?\d)*+)[{_PY_SPACE}]*+")
_JS_NUMBER = re.compile(
    rf"[{_JS_SPACE}]*+(?:0([xX][0-9a-fA-F]++|[oO][0-7]++|[bB][01]++)"
    rf"|([+-]?+(?:Infinity|(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][+-]?+[0-9]++)?+)))?+[{_JS_SPACE}]*+")
_BASES = {"x": 16, "o": 8, "b": 2}
MAX_DIGITS = 400  # significant digits read: more than any id a request may carry, far less than int()'s limit


def python_number(text: str) -> int | None:
    """The integer the Python SDK reads this id as (int(text)), or None: it stays a string."""
    m = _PY_INT.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2).replace("_", "")
    if not digits.isascii():  # other scripts' digits as ASCII ones, so their leading zeros go too
        digits = digits.translate({ord(c): str(unicodedata.decimal(c)) for c in set(digits) if not c.isascii()})
    digits = digits.lstrip("0")
    if len(digits) > MAX_DIGITS:  # (under int()'s smallest limit, 640 digits: never refused, whatever the config)
        return None
    return int(m.group(1) + (digits or "0"))


def js_number(text: str) -> float | None:
    """What JavaScript's Number(text) reads, when it is a finite number (no request's id is NaN or infinite)."""
    m = _JS_NUMBER.fullmatch(text)
    if m is None:
        return None
    other, decimal = m.group(1), m.group(2)
    if other is not None:
        digits = other[1:].lstrip("0")
        if len(digits) > MAX_DIGITS // 4:
            return None  # at least 2**100: over 2**53, no SDK client's id
        value = float(int(digits or "0", _BASES[other[0].lower()]))
    else:
        value = float(decimal) if decimal is not None else 0.0  # all space, or empty: 0; float() is linear
    return value if math.isfinite(value) else None


def number(text: str) -> int | float | None:
    """The number an SDK client takes this id string for (the Python SDK's, else the TypeScript SDK's), or
    None. Where both read one, it is the same number (a decimal integer; JavaScript rounds one over 2**53,
    which no client's id is)."""
    py = python_number(text)
    return py if py is not None else js_number(text)
