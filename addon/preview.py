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
