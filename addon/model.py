"""Value objects shared by the core and the adapters. No I/O here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

MICRO_CENTS_PER_CENT = 1_000_000
# The largest amount a command, the configuration or a top-up may name or bring a balance to (ids and
# counts in the configuration too): BIGINT (2**63 - 1) with room for sums and refunds.
MAX_MICRO_CENTS = 2**62


class ConsumerStatus(StrEnum):
    """users.status (a varchar): any value but these two is refused as suspended (fail closed)."""

    ACTIVE = "active"
    SUSPENDED = "suspended"

    @classmethod
    def _missing_(cls, value: object) -> ConsumerStatus:
        return cls.SUSPENDED


class ListingStatus(StrEnum):
    """mcps.status, a MySQL enum."""

    DRAFT = "draft"
    REVIEW = "review"
    LIVE = "live"
    PAUSED = "paused"
    ARCHIVED = "archived"


class Transport(StrEnum):
    """mcps.transport, a MySQL enum."""

    HTTP = "http"
    SSE = "sse"
    STREAMABLE = "streamable"


@dataclass(frozen=True, slots=True)
class Consumer:
    """Who is calling: resolved from an API key or an OAuth access token."""

    user_id: int
    project_id: int
    status: ConsumerStatus  # a str from the database is converted
    key_id: int | None = None  # api_keys.id; None for OAuth tokens
    token_id: int | None = None  # oauth_access_tokens.id
    env: str = "live"  # 'live' | 'test' | 'oauth'
    expires_at: float | None = None  # OAuth tokens expire; a cached one must not outlive that

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ConsumerStatus(self.status))

    @property
    def principal(self) -> str:
        """Stable identity for rate limits and MCP session ownership."""
        return f"k{self.key_id}" if self.key_id is not None else f"t{self.token_id}"


@dataclass(frozen=True, slots=True)
class Listing:
    """A publisher's MCP server as sold through the gateway (an `mcps` row + its prices)."""

    id: int
    slug: str
    status: ListingStatus  # strs from the database are converted (an unknown one raises ValueError)
    upstream_url: str | None
    transport: Transport = Transport.STREAMABLE
    upstream_headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # the publisher's secrets
    free_calls_per_consumer: int = 0
    rate_limit_per_minute: int | None = None
    rate_limit_per_day: int | None = None
    upstream_timeout_seconds: int | None = None
    default_price: int | None = None  # µ¢ per call; None/0 = free
    tool_prices: Mapping[str, int] = field(default_factory=dict)
    bill_tool_errors: bool = False  # bill results with isError: true

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ListingStatus(self.status))
        object.__setattr__(self, "transport", Transport(self.transport))


class Verdict(StrEnum):
    FREE = "free"  # a free-tier slot was claimed
    DEBITED = "debited"
    UNPRICED = "unpriced"  # a billable method whose price is 0: recorded, never charged
    INSUFFICIENT_CREDIT = "insufficient_credit"
    PROJECT_CAP_EXCEEDED = "project_cap_exceeded"


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """Ask the store to pay for one priced call, atomically, before it is forwarded."""

    request_id: str
    user_id: int
    project_id: int
    listing_id: int
    tool_name: str
    price: int  # µ¢; 0 records the call without charging it
    free_allowance: int  # the listing's monthly free calls per consumer
    # 'YYYY-MM' (UTC) the free tier and the cap count in. None: the store's clock decides (the
    # database's on MySQL, shared by every gateway), and the charge's result says which month.
    period: str | None

    @property
    def month(self) -> str:
        """The period the charge counted in, which its settlement counts in too."""
        if self.period is None:
            raise ValueError(f"call {self.request_id}: no period (settled before its charge decided one)")
        return self.period

    def in_period(self, period: str) -> ChargeRequest:
        """This request counted in `period`. Built field by field: dataclasses.replace, on every paid
        call, costs twice as much (it walks the fields by reflection)."""
        return ChargeRequest(self.request_id, self.user_id, self.project_id, self.listing_id, self.tool_name,
                             self.price, self.free_allowance, period)


@dataclass(frozen=True, slots=True)
class ChargeResult:
    verdict: Verdict
    amount: int  # µ¢ actually debited (0 when free or refused)
    balance: int  # the consumer's balance after the transaction
    # The month the charge counted in ('YYYY-MM'): the request's, or the one the store's clock decided.
    period: str | None = field(default=None, compare=False)
    # The hold (wallets.py) a wallet charge spent from; None when the MySQL or SQLite ledger charged it.
    hold: int | None = field(default=None, compare=False)

    @property
    def accepted(self) -> bool:
        return self.verdict in (Verdict.FREE, Verdict.DEBITED, Verdict.UNPRICED)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What happened to a forwarded priced call; the store records it and refunds if told to."""

    charge: ChargeRequest
    refund: bool
    status: int  # HTTP status the client saw (499: client went away)
    duration_ms: int
    called_at: float  # unix seconds
    key_id: int | None
    token_id: int | None
    client: str | None
    user_agent: str | None
    fee_bps: int  # the platform's share of what is billed, in basis points
    taken: ChargeResult | None = None  # what the charge reported taking; saves reading it back
    need_balance: bool = True  # False when nobody will show the balance (headers already sent)
    # Why it was billed or refunded (billing.Decision.reason, or the sweeper's SWEPT): kept in the
    # call journal and in a refund's ledger row, so every settlement can be audited afterwards.
    reason: str | None = None
    # Nobody awaits it (a buffered answer that left already, a held call settled later): a store may
    # hold it for one flush interval to share a transaction with other calls' (mysql.py BilledBatches).
    background: bool = False


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One recorded call, for the debugging commands."""

    request_id: str
    slug: str
    tool_name: str
    status: int
    billed: int
    called_at: str
