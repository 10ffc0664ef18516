"""addon/rpc_ids.py: the number an id string stands for to the SDK clients, against int() and JavaScript's
Number() themselves, and bounded whatever the string."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
import unicodedata

import pytest

from addon import rpc_ids
from addon.rpc_ids import js_number, number, python_number

# Pieces of ids: digits of two scripts, every kind of space either reader knows, signs, separators,
# exponents, radix prefixes, letters.
PIECES = ["0", "1", "7", "9", "00", "\u0661", "\uff11", " ", "\t", "\n", "\x0b", "\x1c", "\x85", "\xa0",
          "\u2028", "\u3000", "\ufeff", "+", "-", "_", ".", "e", "E", "x", "X", "o", "b", "a", "f",
          "Infinity", "0x", "0b", "1e400"]


def corpus(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    fixed = ["1", "01", " 1", "1 ", "+1", "-1", "-0", "1_0", "1__0", "_1", "1_", "\u0661", "1.0", "1.", ".1e1",
             "1e0", "0x1", "0X1f", "0o7", "0b11", "-0x1", "0x", "", " ", "Infinity", "-Infinity", "1e400",
             "NaN", "abc", "1a", "0.1", "\ufeff1", "\x851", "\x1c1", "9007199254740993", "1" * 30]
    return fixed + ["".join(rnd.choice(PIECES) for _ in range(rnd.randint(1, 6))) for _ in range(n)]


def py_reference(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def test_python_number_is_what_int_reads() -> None:
    for text in corpus(20_000, seed=1):
        assert python_number(text) == py_reference(text), repr(text)


def test_the_spaces_and_digits_int_reads_are_those_the_pattern_names() -> None:
    for code in range(0x110000):
        c = chr(code)
        if c.isspace() or code in (0x1c, 0x1d, 0x1e, 0x1f, 0xfeff):
            assert python_number(f"{c}1{c}") == py_reference(f"{c}1{c}"), hex(code)
    digit = re.compile(r"\d")
    assert all(bool(digit.fullmatch(chr(c))) == (unicodedata.decimal(chr(c), None) is not None)
               for c in range(0x110000))


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run JavaScript's Number()")
def test_js_number_is_what_javascript_reads() -> None:
    texts = corpus(20_000, seed=2) + [f"{chr(c)}1{chr(c)}" for c in range(0x10000) if chr(c).isspace()
                                      or c in (0x1c, 0xfeff, 0x180e, 0x200b)]
    script = ("const t = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "process.stdout.write(JSON.stringify(t.map(s => { const n = Number(s);"
              " return Number.isFinite(n) ? n : null; })));")
    out = subprocess.run(["node", "-e", script], input=json.dumps(texts), capture_output=True, text=True,
                         check=True, timeout=60).stdout
    for text, expected in zip(texts, json.loads(out), strict=True):
        assert js_number(text) == expected, repr(text)


def test_where_both_read_a_number_it_is_the_same_and_python_s_is_kept() -> None:
    assert number("01") == number(" 1") == number("1.0") == number("0x1") == number("\u0661") == 1
    assert number("-0") == 0 and number("") == 0  # Number("") is 0
    assert number("abc") is None and number("Infinity") is None and number("0x") is None
    assert number("\u0660" * 500 + "\u0661") == 1  # int() reads 501 digits of any script (its limit: 4300)
    assert number("9007199254740993") == 9007199254740993  # (JavaScript would round it: no client's id)


def test_a_huge_id_costs_linear_time_and_reads_as_no_clients_id() -> None:
    for text in ("0" * 2_000_000 + "1", " " * 2_000_000 + "1", "1." + "0" * 2_000_000,
                 "0x" + "0" * 2_000_000 + "1", "\u0660" * 2_000_000 + "\u0661", "0_" * 1_000_000 + "1"):
        started = time.perf_counter()
        assert number(text) == 1
        assert time.perf_counter() - started < 1.0
    for text in ("1" * 2_000_000, "9" * 4_000 + "x", "1_" * 1_000_000 + "1", "0x" + "f" * 2_000_000,
                 "1" * rpc_ids.MAX_DIGITS + "0", "\u0661" * 1_000_000):
        started = time.perf_counter()
        value = number(text)
        assert value is None or abs(value) > 2**53  # nobody's id
        assert time.perf_counter() - started < 1.0
