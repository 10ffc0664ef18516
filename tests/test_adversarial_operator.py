"""Adversarial review of the operator's tools: the `mcpmeter` command, the configuration and its seed.

Each test names a defect found by review: a traceback where a message was promised, a value
accepted that the gateway cannot use (or would put on the wire), money that could overflow.
"""

from __future__ import annotations

import uuid

import pytest

from tests.backends import Backend
from tests.test_cli import Run, run  # noqa: F401  (the `run` fixture)

BIGINT_MAX = 2**63 - 1


def _email() -> str:
    return f"adv-{uuid.uuid4().hex[:10]}@example.test"


def _balance(backend: Backend, email: str) -> int:
    return int(backend.query("SELECT credit_micro_cents FROM users WHERE email = %s", (email,))[0][0])



# --- money: a balance past BIGINT -----------------------------------------------------------


def test_credit_add_that_would_overflow_the_balance_is_refused(run: Run, backend: Backend) -> None:
    """Each amount is bounded (2**62) but their sum was not: the second top-up overflowed the balance
    column: on SQLite a traceback (OverflowError), on MySQL 'the database is unavailable' (exit 3)."""
    email = _email()
    run("key", "create", "--email", email, "--credit", str(2**62))
    rows = backend.query("SELECT COUNT(*) FROM credit_transactions t JOIN users u ON u.id = t.user_id"
                         " WHERE u.email = %s", (email,))[0][0]
    _, err = run("credit", "add", email, str(2**62), code=1)
    assert "balance" in err
    assert _balance(backend, email) == 2**62  # nothing written, and still a whole number
    assert backend.query("SELECT COUNT(*) FROM credit_transactions t JOIN users u ON u.id = t.user_id"
                         " WHERE u.email = %s", (email,))[0][0] == rows
    run("reconcile")


# --- user and key arguments: a message, never a traceback ----------------------------------


@pytest.mark.parametrize("argv", [
    ["credit", "add", "²", "5"],  # str.isdigit() is true for superscripts, int() refuses them
    ["credit", "add", "99999999999999999999999", "5"],  # an id past INTEGER: OverflowError in sqlite3
    ["key", "revoke", "²"],
    ["usage", "--consumer", "²"],
])
def test_odd_user_ids_are_a_message(run: Run, backend: Backend, argv: list[str]) -> None:
    from addon.cli import main

    rc = main(argv)  # the fixture's run() asserts on the code; here any refusal will do, not a traceback
    assert rc in (1, 2)
