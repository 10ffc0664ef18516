"""Shadow mode and dry runs against both stores: the read-only preview agrees with the real charge,
and a shadow call is recorded without touching balances, the ledger, the free tier or the spend."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from addon.model import Verdict

from .test_store_contract import (  # noqa: F401  (db is a fixture)
    Backend, add_consumer, add_listing, call, db, outcome, reconcile, snapshot,
)


@pytest.mark.parametrize("case", [
    dict(credit=10_000, price=3000, free=0, cap=None, want=Verdict.DEBITED),
    dict(credit=10_000, price=3000, free=2, cap=None, want=Verdict.FREE),
    dict(credit=2999, price=3000, free=0, cap=None, want=Verdict.INSUFFICIENT_CREDIT),
    dict(credit=10_000_000, price=3_000_000, free=0, cap=1, want=Verdict.PROJECT_CAP_EXCEEDED),
    dict(credit=0, price=0, free=0, cap=None, want=Verdict.UNPRICED),
])
async def test_preview_agrees_with_the_charge_and_writes_nothing(db: Backend, case: dict[str, Any]) -> None:
    who = add_consumer(db, 1, credit=case["credit"], cap_cents=case["cap"])
    add_listing(db, 10, "w", price=case["price"], free=case["free"])
    req = call(who, 10, case["price"], free=case["free"])
    before = snapshot(db)
    seen = await db.store.preview(req)
    assert snapshot(db) == before  # read-only
    assert seen.verdict is case["want"] and seen.balance == case["credit"]
    assert seen.free_left == case["free"]
    charged = await db.store.charge(req)
    assert charged.verdict is case["want"] and charged.amount == seen.amount
    reconcile(db)


async def test_preview_counts_the_free_tier_used_this_month(db: Backend) -> None:
    who = add_consumer(db, 1, credit=10_000)
    add_listing(db, 10, "w", price=3000, free=2)
    await db.store.charge(call(who, 10, 3000, free=2))
    assert (await db.store.preview(call(who, 10, 3000, free=2))).free_left == 1
    reconcile(db)


async def test_a_shadow_call_is_recorded_without_moving_money(db: Backend) -> None:
    who = add_consumer(db, 1, credit=1000)
    add_listing(db, 10, "w", price=3000, free=1)
    before = snapshot(db)
    for _ in range(3):  # would be: free, then refused twice for credit
        req = call(who, 10, 3000, free=1)
        shadow_req = dataclasses.replace(req, price=0, free_allowance=0)  # what shadow.charge_request sends
        taken = await db.store.charge(shadow_req)
        assert taken.verdict is Verdict.UNPRICED and taken.amount == 0
        await db.store.settle(dataclasses.replace(outcome(shadow_req, who), taken=taken))
    after = snapshot(db)
    assert after["balances"] == before["balances"] and after["ledger"] == before["ledger"]
    assert after["free"] == before["free"] and after["spend"] == before["spend"]
    assert db.rows("SELECT COUNT(*), SUM(billed_micro_cents) FROM usage_events")[0][0] == 3
    assert int(db.rows("SELECT SUM(billed_micro_cents) FROM usage_events")[0][0]) == 0
    reconcile(db)


async def test_user_exists_check_of_the_topup_command(db: Backend) -> None:
    add_consumer(db, 1, credit=5)
    assert await db.store.user_exists(1) is True
    assert await db.store.user_exists(77) is False
    reconcile(db)
