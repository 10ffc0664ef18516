"""Calls whose outcome comes after their answer: tasks (2025-11-25) and input_required rounds (2026-07-28).

A task-augmented `tools/call` (params.task) is answered at once with a CreateTaskResult naming a
`taskId`; the tool's real outcome comes later, in `tasks/get` / `tasks/cancel` answers (a Task with
its `status`), the answer to `tasks/result` (what the call itself would have returned), or a
`notifications/tasks/status` (a Task). Such a call is held: its money stays claimed and its journal
row unsettled (marked `task_pending`) until a terminal status passes through the gateway on a flow of
the same listing, key and session: `completed` billed, `failed` / `cancelled` refunded. An id names
one held call per scope: a new task under it refunds the one held before (`task_replaced`).

A 2026-07-28 call answered with `resultType: "input_required"` and a `requestState` is held the same
way (`input_pending`); the client's retry of the same tool carrying exactly that `requestState`, on
the same listing, key and session, is a continuation: forwarded without a second charge, and its
answer settles the held first round (another input_required keeps it held under the new state).
A state is usable once, and only if the gateway saw the upstream issue it to that key and tool; it
holds one round: a round held under it already when it is issued again is billed (`input_replaced`).

What the gateway needs is in `Deferred`; the readers below are pure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http

from . import budget
from .billing import Decision, Failure
from .config import sweep_interval
from .decoding import TooLarge, decode_bounded
from .errors import GatewayError
from .jsonrpc import NAMING_TASKS, JsonId, Outcome, answer_messages
from .scan import Message
from .shares import Shares
from .sse import Event, SseParser

log = logging.getLogger("mcpmeter")

TASK_PENDING = "task_pending"  # the journal marks (store.HELD)
INPUT_PENDING = "input_pending"
TASK_EXPIRED = "task_expired"  # refunded: nobody saw the task end
SWEPT = "swept"  # refunded as the journal's ordinary sweep refunds an unmarked row (store.sql.SWEPT)
INPUT_ABANDONED = "input_abandoned"  # billed: the input_required answer was delivered, no retry came
# A task id or a requestState that another held call of the same scope holds names the newer call from
# then on: the earlier one is settled at once, as one whose outcome nobody can see any more (refunded,
# like task_expired) or whose round nothing can continue (billed, like a round with no requestState).
TASK_REPLACED = "task_replaced"
INPUT_REPLACED = "input_replaced"
TERMINAL = {
    "completed": Decision(False, "task_completed"),
    "failed": Decision(True, "task_failed"),
    "cancelled": Decision(True, "task_cancelled"),
}
# JSON-RPC's own errors (parse error, invalid request, method not found, invalid params): answering a
# tasks/result, they say the request was wrong, not that the task failed. A client can provoke them
# at will, so they settle nothing (else a completed task could be refunded and its result then fetched).
PROTOCOL_ERRORS = frozenset({-32700, -32600, -32601, -32602})
MAX_STATE_CHARS = 64 * 1024  # a requestState longer than this is not remembered (the retry is charged)
# Calls held at once; past it, a call settles as it is answered. Each keeps its Call, its Facts and a
# bodiless stand-in of its flow, not the flow (see Held): about 8 KB measured, whatever its request
# and answer weighed (1 MB bodies: 1,012 KB each before).
MAX_HELD = 10_000
# One consumer's (user id's) share of them: a consumer creating tasks nobody polls pays nothing (they are
# refunded at their limit), so without a share it could fill the table and have every other consumer's
# tasks billed at creation, even those that fail. Past it, only that consumer's calls settle as answered.
MAX_HELD_PER_USER = MAX_HELD // 10
# A task's end can pass (on the session's GET stream, or before the CreateTaskResult in its own stream)
# before the answer that names it is held: remembered this long for the hold to pick up, only while a
# task-augmented call of the same scope is on its way, and only for ids of at most MAX_TASK_ID_CHARS.
ENDED_EARLY_SECONDS = 60.0
MAX_TASK_ID_CHARS = 256

Scope = tuple[int, str, str]  # listing id, the key's principal, the session id ("" when none)
IdKey = tuple[bool, str | int]  # (is a string, value): 1 and "1" are different ids


# --- pure readers ------------------------------------------------------------------------


def _params(message: Any) -> Mapping[str, Any]:
    params = message.get("params") if isinstance(message, Mapping) else None
    return params if isinstance(params, Mapping) else {}


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def request_facts(body: bytes) -> tuple[bool, str | None, str | None]:
    """(a task is asked for, the requestState carried, the taskId a tasks/result, tasks/get or
    tasks/cancel names) of a request body."""
    if b'"task' not in body and b'"requestState"' not in body and b"\\u" not in body:
        return False, None, None  # the common case: not parsed a second time (an escape can spell any key)
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return False, None, None
    params = _params(message)
    method = message.get("method") if isinstance(message, Mapping) else None
    task = method == "tools/call" and isinstance(params.get("task"), Mapping)
    state = params.get("requestState") if method == "tools/call" else None
    task_id = params.get("taskId") if method in NAMING_TASKS else None
    return (task, state if isinstance(state, str) else None, task_id if isinstance(task_id, str) else None)


def created_task(message: Any, rpc_id: JsonId) -> str | None:
    """The taskId of a CreateTaskResult answering `rpc_id`."""
    if not isinstance(message, Mapping) or not _same_id(message.get("id"), rpc_id):
        return None
    result = message.get("result")
    task = result.get("task") if isinstance(result, Mapping) else None
    task_id = task.get("taskId") if isinstance(task, Mapping) else None
    return task_id if isinstance(task_id, str) and task_id else None


def input_required(message: Any, rpc_id: JsonId) -> tuple[bool, str | None]:
    """(the answer to `rpc_id` is an InputRequiredResult, its requestState)."""
    if not isinstance(message, Mapping) or not _same_id(message.get("id"), rpc_id):
        return False, None
    result = message.get("result")
    if not isinstance(result, Mapping) or result.get("resultType") != "input_required":
        return False, None
    state = result.get("requestState")
    return True, state if isinstance(state, str) and 0 < len(state) <= MAX_STATE_CHARS else None


def task_status(message: Any) -> tuple[str, str] | None:
    """(taskId, status) said by a `notifications/tasks/status` or a Task answer (tasks/get, tasks/cancel)."""
    if not isinstance(message, Mapping):
        return None
    if message.get("method") == "notifications/tasks/status":
        task: Any = message.get("params")
    elif "method" not in message and "id" in message:
        task = message.get("result")
    else:
        return None
    if not isinstance(task, Mapping):
        return None
    task_id, status = task.get("taskId"), task.get("status")
    if isinstance(task_id, str) and isinstance(status, str):
        return task_id, status
    return None


def result_decision(message: Any, rpc_id: JsonId, bill_tool_errors: bool) -> Decision | None:
    """How the answer to a `tasks/result` request settles its task: what the call itself returned."""
    if not isinstance(message, Mapping) or "method" in message or not _same_id(message.get("id"), rpc_id):
        return None
    error = message.get("error")
    if isinstance(error, Mapping):  # an error that is not an object (`"error": null`) the SDK clients ignore
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and code in PROTOCOL_ERRORS:
            return None  # about the tasks/result request itself (a bad or unknown taskId, ...), not the task
        return TERMINAL["failed"]
    result = message.get("result")
    if not isinstance(result, Mapping):
        return None
    if result.get("isError") is True:
        return Decision(not bill_tool_errors, "tool_error")
    return TERMINAL["completed"]


def scanned_result_decision(messages: list[Message] | None, rpc_id: JsonId, bill_tool_errors: bool) -> Decision | None:
    """`result_decision` from the scanner's summaries of an answer not parsed whole. The scanner does not
    read an error's code, so an error settles nothing here (it may be about the request: PROTOCOL_ERRORS);
    the task then waits for its status or its limit, and its result, if any, is refused after a refund."""
    for m in messages or ():
        if m.has_method or not _same_id(m.id_value(), rpc_id):
            continue
        if m.error_obj:
            return None
        if m.result_obj:
            return Decision(not bill_tool_errors, "tool_error") if m.is_error else TERMINAL["completed"]
    return None


def state_key(scope: Scope, tool: str, state: str) -> tuple[Scope, str, str]:
    return scope, tool, hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()


# --- what the gateway holds ----------------------------------------------------------------


class Held:
    """A call held until a later message settles it, kept without its flow's bodies.

    The flow itself is kept weakly: a strong reference kept its request body (up to max_body_bytes)
    and its buffered answer for as long as the call was held, MAX_HELD of them (100 GB at the default
    limit), and under mitmdump nothing else keeps a finished flow. Where something does (mitmweb's
    view keeps every flow), the settlement lands on the flow, and mitmweb shows it; once the flow is
    gone, on the stand-in made at hold time: no body, only what the settlement reads of a flow."""

    __slots__ = ("_flow", "stand_in", "call", "user", "expires", "mark")

    def __init__(self, flow: Any, call: Any, expires: float, mark: str) -> None:
        self._flow: weakref.ReferenceType[Any] = weakref.ref(flow)
        self.stand_in = stand_in(flow)
        self.call = call
        self.user: int = call.consumer.user_id  # whose share of MAX_HELD it takes
        self.expires = expires  # monotonic
        self.mark = mark

    @property
    def flow(self) -> Any:
        """What its settlement is written on: the flow while it lives, else its stand-in."""
        flow = self._flow()
        return flow if flow is not None else self.stand_in


# The stand-ins' connections: never shown, saved or used (one pair for all, not two per held call).
_NO_CLIENT = connection.Client(peername=("", 0), sockname=("", 0), timestamp_start=0.0)
_NO_SERVER = connection.Server(address=None)


def stand_in(flow: Any) -> http.HTTPFlow:
    """A bodiless flow with what the settlement of a held call reads (settlement.Settlements.now,
    answers.annotate, display.consumer_label, shadow.settled_reason): the flow's id, its metadata
    (the same dict: what is noted on the flow until it goes is on the stand-in too), comment and mark,
    and its request headers (the User-Agent is recorded). No body, no request line, no answer.

    The headers are those forwarded, as the flow shows them (admission rebuilt them, credentials
    redacted), in a new Headers over the same field tuples. About 1.4 KB in all, made in some 35 µs
    (tracemalloc, perf_counter; held calls are rare)."""
    made = http.HTTPFlow(_NO_CLIENT, _NO_SERVER)
    made.id, made.metadata, made.comment, made.marked = flow.id, flow.metadata, flow.comment, flow.marked
    made.request = http.Request("", 0, b"", b"", b"", b"", b"HTTP/1.1", http.Headers(flow.request.headers.fields),
                                b"", None, 0.0, None)
    return made


@dataclass(eq=False)
class Facts:
    """What the meter learnt about one forwarded request and its answer."""

    scope: Scope
    rpc_id: JsonId | None = None
    tool: str = ""
    task: bool = False  # params.task: the answer should be a CreateTaskResult
    task_id: str | None = None  # ... naming this task
    result_for: str | None = None  # a tasks/result request: its taskId
    input_required: bool = False
    state: str | None = None  # the requestState of an input_required answer
    continues: Held | None = None  # a retry carrying a state this key was issued: the first round
    continued: tuple[Scope, str, str] | None = None  # ... under this key (to give it back if not forwarded)
    asked: tuple[Scope, IdKey] | None = None  # a tasks/result: its key in Deferred.asked, if it is there


Settle = Callable[[Any, Any, Decision], None]


@dataclass(eq=False)
class Deferred:
    settle: Settle  # the gateway's: settle a held call with this decision
    config: Callable[[], Any]  # the gateway's current Config (task_settle_seconds, round_settle_seconds, ...)
    store: Callable[[], Any]
    # The held calls. Written only through _put and _take, which keep `per_user` (held calls by user id,
    # for MAX_HELD_PER_USER; users holding none are not in it) in step.
    tasks: dict[tuple[Scope, str], Held] = field(default_factory=dict)
    rounds: dict[tuple[Scope, str, str], Held] = field(default_factory=dict)
    per_user: Counter[int] = field(default_factory=Counter)
    facts: weakref.WeakKeyDictionary[Any, Facts] = field(default_factory=weakref.WeakKeyDictionary)
    # Tasks refunded as task_expired or by an error answering their tasks/result, until when their result
    # is refused (a refunded result is never delivered), by listing and task id: to any session or key,
    # since a careless upstream answers anyone (task ids are the upstream's, unique per server).
    expired: dict[tuple[int, str], float] = field(default_factory=dict)
    # Held tasks by listing and task id: who holds them (scope -> user id; several if a careless
    # upstream reuses ids). A tasks/result from another session or key (a refreshed OAuth token) of
    # the holding user settles the task like one from its own; another user's is refused (it would
    # fetch a result it did not pay for).
    by_task: dict[tuple[int, str], dict[Scope, int]] = field(default_factory=dict)
    watched: Counter[Scope] = field(default_factory=Counter)  # held tasks per scope: whose answers are read
    # The next three tables are bounded in all (MAX_HELD) and per consumer (MAX_HELD_PER_USER, by user
    # id: shares.py): at its share a consumer's new entry evicts its own oldest, not another's (only a
    # table full of ten consumers' shares or more evicts its oldest of all).
    # Task-augmented calls charged, forwarded and not yet held, per scope: while there are some, a
    # terminal status of a task not held here may be theirs, and is remembered in `ended`. Removed at
    # settlement (every charged call reaches `holds`), or with the call. Evicted, a scope's calls are
    # held without the statuses that passed early: they wait for a later one, or their limit.
    awaiting: Shares[Scope, weakref.WeakSet[Facts]] = field(
        default_factory=lambda: Shares(lambda: MAX_HELD, lambda: MAX_HELD_PER_USER))
    # Those statuses (the upstream's, read from notifications and Task answers: a tasks/result error,
    # which a client can provoke for an id of its choosing, is not one), with when they passed: a
    # hold takes one only if it passed after its own call was forwarded (a task cannot end before
    # the request that creates it). Owned by the scope's consumer; bounded also in id length; an
    # upstream flooding it evicts the oldest, which then wait for their own limit.
    ended: Shares[tuple[Scope, str], tuple[Decision, float]] = field(
        default_factory=lambda: Shares(lambda: MAX_HELD, lambda: MAX_HELD_PER_USER, ENDED_EARLY_SECONDS))
    # tasks/result requests of a session for a held task, by the asking session's scope and the request's
    # id: the answer may come on a GET stream of that session resuming the request's own (Last-Event-ID),
    # after the client closed the POST stream or the server ended it. Taken by the answer, wherever it
    # passes; the least recently asked go first (their answers then settle only on their POST).
    asked: Shares[tuple[Scope, IdKey], Facts] = field(
        default_factory=lambda: Shares(lambda: MAX_HELD, lambda: MAX_HELD_PER_USER))
    # Held calls whose journal mark did not land (the database unavailable then), by request id, with
    # their mark: retried at each sweep (`mark_unmarked`). Only held calls: at most MAX_HELD.
    unmarked: dict[str, tuple[Any, str]] = field(default_factory=dict)

    def _watched(self, scope: Scope) -> bool:
        return self.watched[scope] > 0

    def _put(self, table: dict[Any, Held], key: Any, held: Held) -> Held | None:
        """Hold `held` under `key`; return what was held there before (no longer held)."""
        replaced = table.get(key)
        table[key] = held
        self.per_user[held.user] += 1
        if replaced is not None:
            self._uncount(replaced)
        return replaced

    def _take(self, table: dict[Any, Held], key: Any) -> Held | None:
        held = table.pop(key, None)
        if held is not None:
            self._uncount(held)
        return held

    def _uncount(self, held: Held) -> None:
        self.per_user[held.user] -= 1
        if self.per_user[held.user] <= 0:
            del self.per_user[held.user]

    def _pop_task(self, key: tuple[Scope, str]) -> Held | None:
        held = self._take(self.tasks, key)
        holders = self.by_task.get((key[0][0], key[1]))
        if holders is not None:
            holders.pop(key[0], None)
            if not holders:
                del self.by_task[(key[0][0], key[1])]
        if held is not None:
            self.watched[key[0]] -= 1
            if self.watched[key[0]] <= 0:
                del self.watched[key[0]]
        return held

    # request hook ------------------------------------------------------------------------

    def on_request(self, call: Any, body: bytes, method: str | None, session: str | None) -> bool:
        """Note what the request asks for; True when it continues a held round (charge nothing).

        Admission calls it after the rate limit: its refusals count against it like any request."""
        if call.consumer is None or call.listing is None:
            return False
        scope = (call.listing.id, call.consumer.principal, session or "")
        task, state, named = request_facts(body)
        result_for = named if method == "tasks/result" else None
        priced = call.priced
        if named is not None and (scope, named) not in self.tasks and (holders := self.by_task.get((scope[0], named))):
            mine = [holder for holder, user in holders.items() if user == call.consumer.user_id]
            if not mine:  # another user's task: not theirs to read, poll or cancel (the upstream cannot tell)
                raise GatewayError("task_forbidden", task_id=named)
            if len(mine) == 1 and result_for is not None:
                scope = mine[0]  # the same user in another session or with another key: settles it too
        if (result_for is not None and (scope, result_for) not in self.tasks
                and self.expired.get(_undeliverable(scope, result_for), 0.0) > time.monotonic()):
            raise GatewayError("task_expired", task_id=result_for)  # (a task it holds under that id is its own)
        if not (task or state or result_for or method in ("tasks/get", "tasks/cancel")
                or (priced is not None and priced.method == "tools/call") or self._watched(scope)):
            return False
        facts = Facts(scope, priced.rpc_id if priced else _rpc_id(body), priced.tool_name if priced else "",
                      task=task and priced is not None, result_for=result_for)
        self.facts[call] = facts
        if result_for is not None and session and (scope, result_for) in self.tasks and (
                rpc_id := _id_key(facts.rpc_id)) is not None:
            facts.asked = (call.listing.id, call.consumer.principal, session), rpc_id  # the asking session's
            self.asked.put(facts.asked, call.consumer.user_id, facts)
        if state is not None and priced is not None:
            key = state_key(scope, priced.tool_name, state)
            held = self._take(self.rounds, key)  # taken now: two retries with one state cannot both continue
            if held is not None and held.expires > time.monotonic():
                facts.continues, facts.continued = held, key
                return True
            if held is not None:  # expired, not swept yet
                self._put(self.rounds, key, held)
        return False

    def forwarded(self, call: Any) -> None:
        """The call was charged and goes to the upstream now: a task it asked for may end before its
        answer is held."""
        facts = self.facts.get(call)
        if call.charged is None:  # a continuation, uncharged: settled with its first round, never held
            return
        if facts is not None and facts.task:
            calls = self.awaiting.get(facts.scope)
            if calls is None:
                calls = weakref.WeakSet()
                self.awaiting.put(facts.scope, call.consumer.user_id, calls)
            calls.add(facts)

    def _arrived(self, facts: Facts) -> None:
        calls = self.awaiting.get(facts.scope)
        if calls is not None:
            calls.discard(facts)
            if not calls:
                self.awaiting.pop(facts.scope)

    def not_forwarded(self, call: Any) -> None:
        """The gateway answered the request itself (a refusal, an Idempotency-Key replay): a round
        it took never ran, so its state stays usable. An expired one goes back for `expire` to bill."""
        facts = self.facts.get(call)
        if facts is not None and facts.continues is not None and facts.continued is not None:
            held, key = facts.continues, facts.continued
            facts.continues = facts.continued = None
            newer = self.rounds.get(key)
            if newer is None:
                self._put(self.rounds, key, held)
            elif newer.call is not held.call:  # the state was issued again meanwhile: the newer round keeps it
                self.settle(held.flow, held.call, Decision(False, INPUT_REPLACED))

    # answers -------------------------------------------------------------------------------

    def watch_stream(self, flow: Any, call: Any) -> None:
        """Wrap an SSE answer's stream: its upstream bytes are read (before anything rewrites them)."""
        facts = self.facts.get(call)
        scope = facts.scope if facts else _scope(call, flow)
        response = flow.response
        if scope is None or response is None or not callable(response.stream):
            return
        coding = response.headers.get("content-encoding", "").strip().lower()
        if coding not in ("", "identity") or (facts is None and not self._watched(scope)
                                               and flow.request.method != "GET"):
            return
        if call.rewriter is not None and flow.request.method == "GET":
            return  # a legacy session's stream: read by legacy_sessions, in the session its endpoint names
        if facts is None:
            facts = self.facts[call] = Facts(scope)
        # The parser lives with the stream, not on Facts, which a held call keeps: what a stream cut off
        # mid-event left in it (up to max_event_bytes) goes with the flow.
        config = self.config()
        parser = SseParser(config.max_event_bytes, budget.holding(config))
        inner = response.stream

        def read(chunk: bytes) -> Any:
            try:
                events = parser.feed(chunk)
                # Read before the stream's editor: what it will let out of them, as it decides it for this chunk
                # (a legacy stream's editor reads it rewritten, at other offsets: not asked)
                editor = call.editor if call.rewriter is None else None
                admitted = len(editor.admit(events)) if editor is not None else len(events)  # (a first few)
                for i, event in enumerate(events):
                    self._event(call, facts, event, delivered=i < admitted)  # else cut there: no result settles by it
            except Exception:
                log.exception("mcpmeter: reading task and round messages of %s failed", call.request_id)
            return inner(chunk)

        response.stream = read

    def watch_legacy(self, stream: Any, answered: Any, event: Event, scope: Scope) -> None:
        """A message event delivered on a legacy session's stream (legacy_sessions.py), which carries the
        answers to the session's POSTs: read as the answer of the POSTed call `answered` (its
        CreateTaskResult or input_required), else as the stream's own messages, in the session's `scope`
        (task statuses, the answers to the session's tasks/result requests), as a session's GET stream."""
        facts = self.facts.get(answered) if answered is not None else None
        call = answered
        if facts is None:
            call, facts = stream, self.facts.get(stream)
            if facts is None:
                facts = self.facts[stream] = Facts(scope)
        try:
            self._event(call, facts, event, delivered=True)
        except Exception:
            log.exception("mcpmeter: reading task and round messages of %s failed", call.request_id)

    def _event(self, call: Any, facts: Facts, event: Event, delivered: bool) -> None:
        """What one event of a stream says of tasks and rounds."""
        if event.oversized:  # not held whole: what the scanner read of it
            if delivered:
                self._scanned_result(call, facts, event.messages)
        elif (facts.result_for is not None or _worth_reading(event.data)
              or (facts.rpc_id is None and self.asked)):  # perhaps a resumed tasks/result answer
            self._messages(call, facts, _loads(event.data), delivered)

    def watch_body(self, call: Any, response: Any) -> None:
        """A buffered JSON answer, decoded with the meter's ceiling."""
        facts = self.facts.get(call)
        if facts is None or response is None:
            return
        try:
            body = decode_bounded(response.raw_content or b"", response.headers.get("content-encoding"),
                                  self.config().max_body_bytes)
            if body is not None and (facts.result_for is not None or _worth_reading(body)):
                parsed = _loads(body)
                if parsed is None and facts.result_for is not None:  # too deep for json: scanned
                    self._scanned_result(call, facts, answer_messages(body))
                else:
                    self._messages(call, facts, parsed)
        except TooLarge:
            pass
        except Exception:
            log.exception("mcpmeter: reading task and round messages of %s failed", call.request_id)

    def _messages(self, call: Any, facts: Facts, parsed: Any, delivered: bool = True) -> None:
        """What these messages say of tasks and rounds. A `tasks/result` answer settles its task only if it
        is `delivered` (an event the stream's editor cuts never reaches the client); a task's id and status
        are the upstream's word either way."""
        for message in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(message, Mapping):
                continue
            if facts.rpc_id is not None:
                if facts.task and facts.task_id is None:
                    facts.task_id = created_task(message, facts.rpc_id)
                    if facts.task_id is not None and (call.refunded or call.withheld
                                                      or call.failure is Failure.CANCELLED):
                        # Refunded before its answer passed (cancelled, say): the upstream made the task
                        # all the same, and the client can learn its id (tasks/list): its result is not
                        # delivered afterwards.
                        self._forget_later(_undeliverable(facts.scope, facts.task_id), time.monotonic())
                required, state = input_required(message, facts.rpc_id)
                if required:
                    facts.input_required, facts.state = True, state
                if facts.result_for is not None and call.listing is not None and delivered:
                    self._result(facts, result_decision(message, facts.rpc_id, call.listing.bill_tool_errors))
            elif delivered and (asked := self._asked(facts.scope, message)) is not None and call.listing is not None:
                assert asked.rpc_id is not None
                self._result(asked, result_decision(message, asked.rpc_id, call.listing.bill_tool_errors))
            said = task_status(message)
            if said is not None and said[1] in TERMINAL:
                self._end_task(facts.scope, said[0], TERMINAL[said[1]], upstreams=True)

    def _scanned_result(self, call: Any, facts: Facts, messages: list[Message] | None) -> None:
        """The answer to a tasks/result too big or too deep to be parsed again (a result bigger than
        max_event_bytes, say, which the consumer can ask for): it was delivered all the same, so it
        settles the task as the scanner reads it (SPEC I5: never refunded for its size or shape)."""
        if call.listing is None:
            return
        if facts.result_for is not None and facts.rpc_id is not None:
            self._result(facts, scanned_result_decision(messages, facts.rpc_id, call.listing.bill_tool_errors))
        elif facts.rpc_id is None and self.asked:  # a GET stream: perhaps a resumed tasks/result answer
            for m in messages or ():
                if not m.has_method and (asked := self._asked(facts.scope, {"id": m.id_value()})) is not None:
                    assert asked.rpc_id is not None
                    self._result(asked, scanned_result_decision([m], asked.rpc_id, call.listing.bill_tool_errors))

    def _asked(self, scope: Scope, message: Mapping[str, Any]) -> Facts | None:
        """The tasks/result request of the session `scope` that this answer (on a GET stream) answers."""
        if not self.asked or "method" in message or (rpc_id := _id_key(message.get("id"))) is None:
            return None
        return self.asked.get((scope, rpc_id))

    def _result(self, asked: Facts, decision: Decision | None) -> None:
        """The answer to the tasks/result request `asked` passed: it settles the task, once."""
        if decision is None or asked.result_for is None:
            return
        if asked.asked is not None and self.asked.get(asked.asked) is asked:
            self.asked.pop(asked.asked)
        self._end_task(asked.scope, asked.result_for, decision, upstreams=False)

    def _end_task(self, scope: Scope, task_id: str, decision: Decision, upstreams: bool) -> None:
        """`upstreams`: the task id is the upstream's (a status), not taken from the client's request."""
        held = self._pop_task((scope, task_id))
        if held is not None:
            self.settle(held.flow, held.call, decision)
            if decision == TERMINAL["failed"] and not upstreams:
                # Refunded by an error answering its tasks/result, which the client may have provoked:
                # its result, if the upstream has one, is not delivered afterwards.
                self._forget_later(_undeliverable(scope, task_id), time.monotonic())
        elif upstreams and len(task_id) <= MAX_TASK_ID_CHARS and (owner := self._awaits(scope)) is not None:
            self.ended.put((scope, task_id), owner, (decision, time.monotonic()))  # perhaps a call's on its way

    def _awaits(self, scope: Scope) -> int | None:
        """The consumer (user id) whose task calls of `scope` are on their way, if any are."""
        calls = self.awaiting.get(scope)
        if calls is not None and not calls:
            self.awaiting.pop(scope)
        return self.awaiting.owner(scope) if calls else None

    # settlement ------------------------------------------------------------------------------

    def will_hold(self, call: Any) -> bool:
        """Its answer asks to hold it (the response hook then settles it before the answer leaves,
        so a retry that follows the answer at once finds its state held)."""
        facts = self.facts.get(call)
        return facts is not None and (facts.task_id is not None or facts.state is not None)

    def holds(self, flow: Any, call: Any, decision: Decision) -> str | None:
        """At a charged call's settlement: the mark it is held under instead (None: settle it now)."""
        facts = self.facts.get(call)
        if facts is not None and facts.task:
            self._arrived(facts)  # held or settled now: not on its way
        if facts is None or decision.refund or call.outcome is not Outcome.RESULT:
            if facts is not None and facts.task and facts.task_id is not None and decision.refund:
                # A task named by an answer that is refunded (a 5xx, an answer withheld): never paid
                # for, so its result is not delivered afterwards.
                self._forget_later(_undeliverable(facts.scope, facts.task_id), time.monotonic())
            return None
        if not self._room(call):
            return None
        # Limits count from the call's start, before its charge, as the journal's sweep counts them from
        # the charge: counted from the hold (its answer, up to the upstream timeout later), another
        # gateway's sweep (or this one's) settled a call still held here, whose result then passed.
        start, config = call.started, self.config()
        if facts.task and facts.task_id is not None:
            if (replaced := self._pop_task((facts.scope, facts.task_id))) is not None and replaced.call is not call:
                self.settle(replaced.flow, replaced.call, Decision(True, TASK_REPLACED))
            self.watched[facts.scope] += 1
            self._put(self.tasks, (facts.scope, facts.task_id),
                      Held(flow, call, start + config.task_settle_seconds, TASK_PENDING))
            self.by_task.setdefault((facts.scope[0], facts.task_id), {})[facts.scope] = call.consumer.user_id
            self.expired.pop(_undeliverable(facts.scope, facts.task_id), None)  # the id names a new, paid task
            return TASK_PENDING
        if facts.input_required and facts.state is not None:
            self._hold_round(state_key(facts.scope, facts.tool, facts.state),
                             Held(flow, call, start + config.round_settle_seconds, INPUT_PENDING))
            return INPUT_PENDING
        return None

    def _room(self, call: Any) -> bool:
        """Whether one more call of `call`'s consumer may be held (MAX_HELD, MAX_HELD_PER_USER)."""
        if len(self.tasks) + len(self.rounds) >= MAX_HELD:
            log.warning("mcpmeter: %d calls held already; %s settles now", MAX_HELD, call.request_id)
            return False
        if self.per_user[call.consumer.user_id] >= MAX_HELD_PER_USER:
            log.warning("mcpmeter: user %s holds %d calls already; %s settles now", call.consumer.user_id,
                        MAX_HELD_PER_USER, call.request_id)
            return False
        return True

    def _hold_round(self, key: tuple[Scope, str, str], held: Held) -> None:
        """A retry carrying that state continues one round only: a round held under it already is billed."""
        replaced = self._put(self.rounds, key, held)
        if replaced is not None and replaced.call is not held.call:
            self.settle(replaced.flow, replaced.call, Decision(False, INPUT_REPLACED))

    async def hold(self, flow: Any, call: Any, decision: Decision) -> bool:
        """Hold the call if its answer says its outcome comes later: the money stays claimed and the
        journal row unsettled, marked so that only its own limit sweeps it."""
        mark = self.holds(flow, call, decision)
        if mark is None:
            return False
        flow.metadata.setdefault("mcpmeter", {}).update(decision="held", reason=mark)
        try:
            await self.store().hold(call.request_id, mark)
        except Exception:  # unmarked, the ordinary sweep would refund it at stale_call_seconds: retried
            log.exception("mcpmeter: could not mark %s as %s; retried at each sweep", call.request_id, mark)
            self.unmarked[call.request_id] = call, mark
        facts = self.facts.get(call)
        if mark == TASK_PENDING and facts is not None and facts.task_id is not None:
            key = (facts.scope, facts.task_id)
            ended = self.ended.pop(key)
            if (ended is not None and ended[1] >= (call.forwarded or float("inf"))
                    and self.tasks.get(key) is not None and self.tasks[key].call is call):
                self._end_task(*key, ended[0], upstreams=True)  # it ended before it was held: as if it ended now
        return True

    def continues(self, call: Any) -> bool:
        """The call is a retry continuing a held round (uncharged: its answer settles that round)."""
        facts = self.facts.get(call)
        return facts is not None and facts.continues is not None

    def round_over(self, call: Any, decision: Decision) -> bool:
        """At an uncharged continuation's settlement: settle (or hold again) its first round."""
        facts = self.facts.get(call)
        if facts is None or facts.continues is None:
            return False
        held, facts.continues = facts.continues, None
        if facts.input_required and facts.state is not None and not decision.refund:
            # Another round: held under the new state, within the first round's limit (the journal's
            # sweep counts from the charge, so every round of one call must come within it). Its slot
            # was freed when its retry took it, and may be taken since: held again only where a first
            # hold would be, else settled now as such a hold is (billed, its answer delivered).
            if self._room(held.call):
                self._hold_round(state_key(facts.scope, facts.tool, facts.state), held)
                return True
        elif facts.input_required and not decision.refund:
            decision = Decision(False, "input_required")  # asks again with no state to tie a retry to
        self.settle(held.flow, held.call, decision)
        return True

    def expire(self) -> None:
        """Held calls past their limit: tasks refunded, rounds billed (see the module's rules)."""
        now = time.monotonic()
        for scope in [scope for scope, calls in self.awaiting.items() if not calls]:
            self.awaiting.pop(scope)  # their calls went away unheld (refused, failed, ...)
        tables: tuple[tuple[dict[Any, Held], Decision], ...] = (  # keyed by (scope, task) and by state_key
            (self.tasks, Decision(True, TASK_EXPIRED)), (self.rounds, Decision(False, INPUT_ABANDONED)))
        for table, decision in tables:
            for key, held in list(table.items()):
                if held.expires <= now:
                    if held.mark == TASK_PENDING:
                        self._pop_task(key)
                    else:
                        self._take(table, key)
                    self.settle(held.flow, held.call, decision)
                    if held.mark == TASK_PENDING:
                        self._forget_later(_undeliverable(*key), now)  # type: ignore[misc]

    def _forget_later(self, key: tuple[int, str], now: float) -> None:
        for old, until in list(self.expired.items()):
            if until <= now:
                del self.expired[old]
        if len(self.expired) >= MAX_HELD:
            del self.expired[next(iter(self.expired))]  # the oldest
        self.expired[key] = now + self.config().task_settle_seconds

    async def mark_unmarked(self) -> None:
        """Before the journal's ordinary sweep: mark the held calls whose mark did not land. Unmarked, a
        row is refunded by that sweep stale_call_seconds after its charge while its call stays held here
        (up to task_settle_seconds), and a result could then pass for a refunded call. A call whose mark
        still cannot land when that sweep (this gateway's next, or another's) could take its row first,
        or whose row is settled already, is let go now, refunded as that sweep refunds it: no later
        message settles it any more, and a task's result is refused as an expired task's."""
        config, store = self.config(), self.store()
        if not self.unmarked or config is None or store is None:
            return
        failed, first = 0, ""  # logged once a sweep: the database down, every mark fails alike
        for request_id, (call, mark) in list(self.unmarked.items()):
            if call.decided is not None:  # settled meanwhile by a later message
                del self.unmarked[request_id]
                continue
            try:
                marked: bool | None = await store.hold(request_id, mark)
            except Exception as e:
                failed, first = failed + 1, first or f"{request_id} as {mark}: {e}"
                marked = None
            if marked or (marked is None and time.monotonic() + sweep_interval(config)
                          < call.started + config.stale_call_seconds):
                if marked:
                    del self.unmarked[request_id]
                continue
            del self.unmarked[request_id]
            self._let_go(call)
        if failed:
            log.warning("mcpmeter: could not mark %d held call(s) again, retried at the next sweep unless let go"
                        " (first error, %s)", failed, first)

    def _let_go(self, call: Any) -> None:
        """Settle a held call now, refunded, as the journal's ordinary sweep would (see mark_unmarked)."""
        now = time.monotonic()
        for key, held in list(self.tasks.items()):
            if held.call is call:
                self._pop_task(key)
                self._forget_later(_undeliverable(*key), now)
                self.settle(held.flow, call, Decision(True, SWEPT))
                return
        for state, held in list(self.rounds.items()):
            if held.call is call:
                self._take(self.rounds, state)
                self.settle(held.flow, call, Decision(True, SWEPT))
                return
        # Not held now: a round taken by its continuation, in flight; that continuation settles it.

    async def sweep(self) -> None:
        """The sweeper's turn: held calls past their limit, here and (after a restart, or held by
        another gateway) in the journal, by the same rules."""
        self.expire()
        config, store = self.config(), self.store()
        if config is None or store is None:
            return
        margin = 60.0  # one sweep: a gateway that holds the call in memory settles it first
        for mark, seconds, refund, reason in ((TASK_PENDING, config.task_settle_seconds, True, TASK_EXPIRED),
                                              (INPUT_PENDING, config.round_settle_seconds, False, INPUT_ABANDONED)):
            if done := await store.sweep(seconds + margin, config.platform_fee_bps, held=mark, refund=refund,
                                         reason=reason):
                log.warning("mcpmeter: settled %d held call(s) past their limit (%s)", done, reason)


def _undeliverable(scope: Scope, task_id: str) -> tuple[int, str]:
    """A refused result's key: the listing and the task, whoever asks (a careless upstream answers
    any session's and any key's tasks/result)."""
    return scope[0], task_id


def _worth_reading(data: str | bytes) -> bool:
    """Only messages that can name a task or an input_required result are parsed again."""
    if isinstance(data, str):
        return "taskId" in data or "input_required" in data
    return b"taskId" in data or b"input_required" in data


def _loads(data: str | bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _id_key(rpc_id: Any) -> IdKey | None:
    if isinstance(rpc_id, bool) or not isinstance(rpc_id, (str, int)):
        return None
    return isinstance(rpc_id, str), rpc_id


def _rpc_id(body: bytes) -> JsonId | None:
    message = _loads(body)
    rpc_id = message.get("id") if isinstance(message, Mapping) else None
    return rpc_id if isinstance(rpc_id, (str, int)) and not isinstance(rpc_id, bool) else None


def _scope(call: Any, flow: Any) -> Scope | None:
    if call.consumer is None or call.listing is None:
        return None
    return call.listing.id, call.consumer.principal, flow.request.headers.get("mcp-session-id", "")
