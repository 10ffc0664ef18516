"""The debugging commands' results, for mitmweb's command bar and the event log.

mitmproxy 12.3 calls commands synchronously (`Command.call` neither awaits nor accepts a
coroutine, and mitmweb's command endpoint is a plain handler), and the store may not be waited
for on the event loop. So a command answers at once with what is known now, starts a fresh read
in the background, and logs the fresh result: running it again shows that result in the bar.
`mcpmeter.calls` answers from memory: the calls this gateway metered since it started.
`Commands` is a sub-addon of the meter (gateway.py): mitmproxy registers its commands with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mitmproxy import command, exceptions

from .display import NAME_CHARS, shown
from .store import Store, UnknownUser

log = logging.getLogger("mcpmeter")

MAX_RECENT = 200


TOOL_CHARS = NAME_CHARS  # of a tool name kept in the history (up to jsonrpc.MAX_TOOL_NAME), as the ledger column


@dataclass(frozen=True, slots=True)
class Recent:
    """One call this gateway metered, as the `mcpmeter.calls` command lists it."""

    at: float
    request_id: str
    user_id: int
    slug: str
    tool: str
    decision: str
    billed: int
    status: int

    def line(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.at))
        return (f"{when} user {self.user_id} {self.slug} {shown(self.tool)} {self.decision} {self.billed} µ¢ "
                f"status {self.status} {self.request_id}")


class Results:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], tuple[float, str]] = {}  # last finished result per query
        self.missing: set[int] = set()  # user ids a command found not to exist
        self.recent: dict[str, Recent] = {}  # by request id, oldest first; a re-annotation updates it
        self.tasks: set[asyncio.Future[None]] = set()

    def answer(self, key: tuple[str, int], pending: str) -> str:
        done = self.answers.get(key)
        if done is None:
            return f"{pending}; run the command again for the result (also in the event log)"
        at, text = done
        return f"{text} (read {time.time() - at:.0f}s ago; a fresh read is under way)"

    def start(self, key: tuple[str, int], work: Callable[[], Awaitable[str]]) -> None:
        async def run() -> None:
            try:
                text = await work()
            except Exception as e:
                text = f"failed: {e or type(e).__name__}"
            self.answers[key] = (time.time(), text)
            log.warning("mcpmeter: %s", text)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def note(self, call: Recent) -> None:
        self.recent.pop(call.request_id, None)
        self.recent[call.request_id] = call
        while len(self.recent) > MAX_RECENT:
            del self.recent[next(iter(self.recent))]

    def calls(self, limit: int) -> str:
        rows = list(self.recent.values())[-limit:]
        return "\n".join(r.line() for r in reversed(rows)) or "no calls metered by this gateway yet"


def user_id_arg(user_id: int) -> int:
    if user_id <= 0:
        raise exceptions.CommandError(f"user_id must be a positive user id, not {user_id}")
    return user_id


def amount_arg(micro_cents: int) -> int:
    if micro_cents <= 0:
        raise exceptions.CommandError(f"micro_cents must be positive, not {micro_cents}")
    if micro_cents > 10**15:
        raise exceptions.CommandError(f"micro_cents {micro_cents} is more than 10,000,000 dollars of credit")
    return micro_cents


def limit_arg(limit: int) -> int:
    if not 1 <= limit <= MAX_RECENT:
        raise exceptions.CommandError(f"limit must be between 1 and {MAX_RECENT}, not {limit}")
    return limit


class Commands:
    """`mcpmeter.balance`, `mcpmeter.topup` and `mcpmeter.calls`, for local billing debugging."""

    name = "mcpmeter_commands"  # mitmproxy names addons by class otherwise: keep clear of its own

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self.store = store  # the meter's current store
        self.results = Results()  # the commands' answers and this gateway's calls

    @command.command("mcpmeter.balance")
    def balance_command(self, user_id: int) -> str:
        """A consumer's balance in µ¢, read from the store (the command answers with the last read)."""
        user_id = user_id_arg(user_id)
        store = self._store()
        key = ("balance", user_id)

        async def read() -> str:
            if not await store.user_exists(user_id):
                self.results.missing.add(user_id)
                return f"user {user_id}: no such user"
            self.results.missing.discard(user_id)
            return f"user {user_id}: balance {await store.balance(user_id)} µ¢"

        self.results.start(key, read)
        return self.results.answer(key, f"user {user_id}: reading the balance")

    @command.command("mcpmeter.topup")
    def topup_command(self, user_id: int, micro_cents: int) -> str:
        """Add credit to an existing consumer, with its ledger row (unknown users: nothing written)."""
        user_id, micro_cents = user_id_arg(user_id), amount_arg(micro_cents)
        if user_id in self.results.missing:
            raise exceptions.CommandError(f"user {user_id} does not exist: nothing written")
        store = self._store()

        async def topup() -> str:
            try:  # the store checks the user in the top-up's own transaction
                balance = await store.topup(user_id, micro_cents, "top-up from mitmproxy command")
            except UnknownUser:
                self.results.missing.add(user_id)
                return f"user {user_id}: no such user, nothing written"
            self.results.answers[("balance", user_id)] = (time.time(), f"user {user_id}: balance {balance} µ¢")
            return f"user {user_id}: topped up {micro_cents} µ¢, balance {balance} µ¢"

        self.results.start(("topup", user_id), topup)
        return (f"user {user_id}: topping up {micro_cents} µ¢ (the user is checked first); "
                f"`mcpmeter.balance {user_id}` shows the new balance")

    @command.command("mcpmeter.calls")
    def calls_command(self, limit: int = 10) -> str:
        """The most recent calls this gateway metered, newest first."""
        return self.results.calls(limit_arg(limit))

    def _store(self) -> Store:
        if (store := self.store()) is None:
            raise exceptions.CommandError("mcpmeter has no store yet (is mcpmeter_config loading?)")
        return store
