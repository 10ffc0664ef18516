"""Adversarial review of the store layer (money): settlements applied twice or not at all."""

from __future__ import annotations

import dataclasses

from addon.model import Verdict

from .test_store_contract import (  # noqa: F401  (fixtures)
    FEE_BPS,
    Backend,
    add_consumer,
    add_listing,
    call,
    db,
    mysql_db,
    outcome,
    reconcile,
)

PRICE = 5000


async def test_a_billed_call_whose_user_agent_is_not_utf8_is_still_billed(db: Backend) -> None:  # noqa: F811
    """mitmproxy decodes header values with surrogateescape: a User-Agent holding the byte 0xff
    reaches the settlement as '\\udcff'. The call was delivered: it must be billed, not left to the
    sweeper's refund (a free call for anyone who sends such a header)."""
    who = add_consumer(db, 1, credit=10 * PRICE)
    add_listing(db, 10, "a", price=PRICE)
    req = call(who, 10, PRICE)
    taken = await db.store.charge(req)
    assert taken.verdict is Verdict.DEBITED
    agent = b"curl/8 \xff\xfe".decode("utf-8", "surrogateescape")
    for need_balance in (False, True):
        s = dataclasses.replace(outcome(req, who), taken=taken, user_agent=agent, need_balance=need_balance)
        await db.store.settle(s)
    assert db.rows("SELECT settled_at IS NOT NULL, refunded FROM mcpmeter_calls WHERE request_id = %s",
                   (req.request_id,)) == [(1, 0)]
    assert await db.store.sweep(-2, FEE_BPS) == 0
    assert await db.store.balance(1) == 9 * PRICE
    assert db.rows("SELECT billed_micro_cents FROM usage_events WHERE request_id = %s", (req.request_id,)) == [
        (PRICE,)]
    reconcile(db)


async def test_a_project_cap_too_large_for_micro_cents_in_bigint_still_lets_calls_through(
        db: Backend) -> None:  # noqa: F811
    """spending_cap_cents_per_month is BIGINT UNSIGNED (cents): a cap past 1.8e13 cents (an
    'unlimited' sentinel, say) times 1,000,000 overflows the column type in SQL. The cap is then
    simply not reached: the charge is debited, not failed with 'BIGINT value is out of range'."""
    for n, cap in enumerate((10**14, 2**63 - 1), start=1):
        who = add_consumer(db, n, credit=10 * PRICE, cap_cents=cap)
        add_listing(db, 10 + n, f"l{n}", price=PRICE)
        assert (await db.store.charge(call(who, 10 + n, PRICE))).verdict is Verdict.DEBITED
    reconcile(db)
