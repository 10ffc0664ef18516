"""addon/shares.py: a table bounded in all and per owner, oldest out first, with an optional ttl."""

from __future__ import annotations

import pytest

from addon import shares
from addon.shares import Shares


def test_an_owner_past_its_share_evicts_its_own_oldest() -> None:
    table: Shares[str, int] = Shares(lambda: 10, lambda: 2)
    table.put("a1", 1, 1)
    table.put("b1", 2, 1)
    table.put("a2", 1, 2)
    table.put("a3", 1, 3)  # owner 1 at its share: its oldest goes, not owner 2's
    assert list(table) == ["b1", "a2", "a3"]
    assert table.get("a1") is None and table.get("b1") == 1
    assert table.owned(1) == 2 and table.owned(2) == 1
    table.put("a2", 1, 20)  # put again: the newest, still counted once
    table.put("a4", 1, 4)
    assert list(table) == ["b1", "a2", "a4"] and table.get("a2") == 20


def test_a_full_table_evicts_the_oldest_of_all() -> None:
    table: Shares[str, int] = Shares(lambda: 3, lambda: 3)
    for n, (key, owner) in enumerate((("a", 1), ("b", 2), ("c", 3), ("d", 4))):
        table.put(key, owner, n)
    assert list(table) == ["b", "c", "d"] and table.owned(1) == 0 and table.owner("b") == 2
    assert len(table) == 3


def test_pop_forgets_the_entry_and_its_owner() -> None:
    table: Shares[str, int] = Shares(lambda: 3, lambda: 1)
    table.put("a", 1, 1)
    assert table.pop("a") == 1 and table.pop("a") is None
    assert len(table) == 0 and table.owned(1) == 0 and table._owned == {}
    assert table.owner("a") is None


def test_entries_older_than_the_ttl_are_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(shares.time, "monotonic", lambda: now[0])
    table: Shares[str, int] = Shares(lambda: 10, lambda: 10, ttl=60.0)
    table.put("a", 1, 1)
    now[0] += 30
    table.put("b", 2, 2)
    now[0] += 30
    assert table.get("a") is None and table.get("b") == 2  # not returned once expired ...
    assert table.pop("a") is None
    table.put("a", 1, 3)
    now[0] += 30
    table.put("c", 3, 3)  # ... and dropped as new ones come
    assert list(table) == ["a", "c"] and table.owned(2) == 0
