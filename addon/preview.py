"""What the meter would decide for a priced call now, read without writing anything.

Used by shadow mode (record what would have been billed or refused) and by dry-run replays in
mitmweb (show what a pricing change does). The order is the store's own: unpriced, free tier,
credit, then the project's monthly cap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .model import MICRO_CENTS_PER_CENT, ChargeRequest, Verdict


@dataclass(frozen=True, slots=True)
class Preview:
    verdict: Verdict
    price: int
    free_allowance: int
    free_left: int
    balance: int
    cap_cents: int | None
    spent: int  # µ¢ the project spent this month

    @property
    def amount(self) -> int:
        return self.price if self.verdict is Verdict.DEBITED else 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict.value, "amount": self.amount}


def decide(req: ChargeRequest, free_used: int, balance: int, cap_cents: int | None, spent: int) -> Preview:
    """Pure: the verdict the store's charge would reach with these numbers."""
    free_left = max(req.free_allowance - free_used, 0)
    if req.price <= 0:
        verdict = Verdict.UNPRICED
    elif free_left > 0:
        verdict = Verdict.FREE
    elif balance < req.price:
        verdict = Verdict.INSUFFICIENT_CREDIT
    elif cap_cents is not None and spent + req.price > cap_cents * MICRO_CENTS_PER_CENT:
        verdict = Verdict.PROJECT_CAP_EXCEEDED
    else:
        verdict = Verdict.DEBITED
    return Preview(verdict, req.price, req.free_allowance, free_left, balance, cap_cents, spent)


def _read(ledger: Any, req: ChargeRequest) -> Preview:
    row = ledger._one("SELECT free_calls_used FROM mcp_consumer_usage"
                      " WHERE mcp_id = %s AND user_id = %s AND period_year_month = %s",
                      (req.listing_id, req.user_id, req.period))
    cap = ledger._one("SELECT spending_cap_cents_per_month FROM projects WHERE id = %s", (req.project_id,))
    spent = ledger._one("SELECT spent_micro_cents FROM mcpmeter_project_spend"
                        " WHERE project_id = %s AND period_year_month = %s", (req.project_id, req.period))
    return decide(req, int(row[0]) if row else 0, ledger.balance(req.user_id),
                  None if cap is None or cap[0] is None else int(cap[0]), int(spent[0]) if spent else 0)


async def preview(store: Any, req: ChargeRequest) -> Preview:
    """Read-only: a transaction that only selects (it commits nothing)."""
    return await store._submit(lambda ledger: _read(ledger, req))
