"""The store: catalogue, consumers and the money ledger, behind one async interface.

Adapters (SQLite embedded, MySQL production) implement it; the gateway never sees SQL.
"""

from __future__ import annotations

from typing import Protocol

from ..auth import Credential
from ..preview import Preview
from ..model import MAX_MICRO_CENTS, CallRecord, ChargeRequest, ChargeResult, Consumer, Listing, Settlement


class StoreUnavailable(Exception):
    """The database cannot be reached now: the call is refused (503), never forwarded unbilled."""


class OutcomeUnknown(StoreUnavailable):
    """The database stopped answering while the transaction's COMMIT was under way: it may or may
    not have been written. Never run again by the store (it may have landed); a caller that would
    repeat it (an operator) must look first."""


class UnknownUser(LookupError):
    """No user has this id: nothing was written (a top-up never leaves an orphan ledger row)."""

    def __init__(self, user_id: int) -> None:
        super().__init__(f"no user with id {user_id}")
        self.user_id = user_id




class CreditLimit(ValueError):
    """The top-up would take the balance past MAX_MICRO_CENTS (the column would overflow): nothing was written."""

    def __init__(self, user_id: int, amount: int) -> None:
        super().__init__(f"adding {amount} µ¢ would take user {user_id}'s balance past {MAX_MICRO_CENTS} µ¢")
        self.user_id = user_id


class Store(Protocol):
    async def find_consumer(self, credential: Credential) -> Consumer | None:
        """The consumer behind a live key or an unexpired, unrevoked OAuth token."""

    async def find_listing(self, slug: str) -> Listing | None: ...

    async def balance(self, user_id: int) -> int:
        """The consumer's balance read from the database, never from a cache."""

    async def user_exists(self, user_id: int) -> bool: ...

    async def free_calls_used(self, listing_id: int, user_id: int, period: str) -> int:
        """The consumer's free-tier calls this month on the listing (a read, for prices shown to agents)."""

    async def preview(self, request: ChargeRequest) -> Preview:
        """What `charge` would decide now, without writing anything (shadow mode, dry runs)."""

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        """Claim a free-tier slot or debit the price (with its ledger row) in one transaction.

        A request without a period counts in this month by the store's clock (the database's where
        gateways share one); the result names the month either way, for the settlement."""

    async def settle(self, settlement: Settlement) -> int | None:
        """Record the call and refund it if told to, exactly once per request id; returns the balance
        (None when the settlement says nobody needs it)."""

    async def topup(self, user_id: int, amount: int, description: str) -> int:
        """Add credit with its ledger row; returns the new balance (debugging and tests).

        Raises UnknownUser, writing nothing, when no user has this id, and CreditLimit when the
        balance would pass MAX_MICRO_CENTS."""

    async def recent_calls(self, limit: int) -> list[CallRecord]: ...

    async def sweep(self, older_than_seconds: float, fee_bps: int, limit: int = 100, held: str | None = None,
                    refund: bool = True, reason: str = "swept") -> int:
        """Refund priced calls left unsettled (their gateway died mid-call); returns how many. With
        `held`, settle the calls held open under that mark (see `hold`) older than the limit instead.
        A call's age is by the clock its journal row was dated with (the database's where gateways
        share one), so a gateway whose own clock is skewed sweeps no call another still runs."""

    async def hold(self, request_id: str, mark: str) -> bool:
        """Mark a call's unsettled journal row as held open until a later message settles it (a task,
        an input_required round): the plain sweep leaves it alone (addon/deferred.py)."""

    async def health(self) -> dict[str, object]: ...

    def close(self) -> None: ...
