"""addon/deferred.py: tasks settle on their terminal state, input_required rounds cost one call."""

from __future__ import annotations

import gc
import json
import logging
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http

from addon import deferred
from addon.billing import Decision
from addon.errors import GatewayError
from addon.jsonrpc import Outcome, PricedCall
from addon.scan import MAX_MESSAGES
from addon.sse import SseParser
from addon.store import StoreUnavailable
from addon.stream_edit import StreamEditor


def test_request_facts() -> None:
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "t", "arguments": {}, "task": {"ttl": 1000}}}
    assert deferred.request_facts(json.dumps(call).encode()) == (True, None, None)
    call["params"] = {"name": "t", "requestState": "abc", "inputResponses": {}}
    assert deferred.request_facts(json.dumps(call).encode()) == (False, "abc", None)
    get = {"jsonrpc": "2.0", "id": 2, "method": "tasks/result", "params": {"taskId": "T1"}}
    assert deferred.request_facts(json.dumps(get).encode()) == (False, None, "T1")
    for method in ("tasks/get", "tasks/cancel"):  # the other requests naming a task
        assert deferred.request_facts(json.dumps({**get, "method": method}).encode()) == (False, None, "T1")
    assert deferred.request_facts(json.dumps({**get, "method": "tasks/list"}).encode()) == (False, None, None)
    # not a tools/call: neither a task nor a state counts; a task param that is not an object neither
    other = {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"task": {}, "requestState": "x"}}
    assert deferred.request_facts(json.dumps(other).encode()) == (False, None, None)
    call["params"] = {"name": "t", "task": "yes", "requestState": 5}
    assert deferred.request_facts(json.dumps(call).encode()) == (False, None, None)
    assert deferred.request_facts(b'{"task": ') == (False, None, None)
    # Keys and methods spelled with escapes are the same JSON: read, not skipped by the quick check.
    escaped = b'{"jsonrpc":"2.0","id":2,"method":"\\u0074asks/result","params":{"\\u0074askId":"T1"}}'
    assert deferred.request_facts(escaped) == (False, None, "T1")
    escaped = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","\\u0074ask":{}}}'
    assert deferred.request_facts(escaped) == (True, None, None)


def test_created_task_and_status_readers() -> None:
    created = {"jsonrpc": "2.0", "id": 7, "result": {"task": {"taskId": "T", "status": "working"}}}
    assert deferred.created_task(created, 7) == "T"
    assert deferred.created_task(created, "7") is None  # ids compare by type and value
    assert deferred.created_task({"jsonrpc": "2.0", "id": 7, "result": {"task": {"taskId": 3}}}, 7) is None
    note = {"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": {"taskId": "T", "status": "failed"}}
    assert deferred.task_status(note) == ("T", "failed")
    got = {"jsonrpc": "2.0", "id": 9, "result": {"taskId": "T", "status": "completed"}}
    assert deferred.task_status(got) == ("T", "completed")
    other = {"jsonrpc": "2.0", "method": "x", "params": {"taskId": "T", "status": "failed"}}
    assert deferred.task_status(other) is None
    assert deferred.task_status({"jsonrpc": "2.0", "id": 9, "error": {"code": 1}}) is None


def test_tasks_result_decides_as_the_call_would_have() -> None:
    assert deferred.result_decision({"jsonrpc": "2.0", "id": 1, "error": {"code": -1}}, 1, False) == \
        Decision(True, "task_failed")
    ok = {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}
    assert deferred.result_decision(ok, 1, False) == Decision(False, "task_completed")
    tool_error = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}}
    assert deferred.result_decision(tool_error, 1, False) == Decision(True, "tool_error")
    assert deferred.result_decision(tool_error, 1, True) == Decision(False, "tool_error")
    assert deferred.result_decision(ok, 2, False) is None
    for code in (-32700, -32600, -32601, -32602):  # about the request, which the client wrote: settles nothing
        assert deferred.result_decision({"jsonrpc": "2.0", "id": 1, "error": {"code": code}}, 1, False) is None
    assert deferred.result_decision({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603}}, 1, False) == \
        Decision(True, "task_failed")


async def test_a_client_provoked_protocol_error_does_not_refund_a_held_task(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "bad _meta"}})
    assert settled == []
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}})  # then its result: billed
    assert settled == [(call, Decision(False, "task_completed"))]


def test_input_required_reader() -> None:
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required", "requestState": "S"}}
    assert deferred.input_required(answer, 1) == (True, "S")
    answer["result"] = {"resultType": "input_required", "inputRequests": {}}
    assert deferred.input_required(answer, 1) == (True, None)  # nothing to tie a retry to
    answer["result"] = {"resultType": "input_required", "requestState": "x" * (deferred.MAX_STATE_CHARS + 1)}
    assert deferred.input_required(answer, 1) == (True, None)
    answer["result"] = {"resultType": "complete", "requestState": "S"}
    assert deferred.input_required(answer, 1) == (False, None)


# --- the registry, with stand-ins for the gateway's calls -------------------------------------------


class Flow:
    """The gateway's flow, as far as deferred.py reads it (a held call's stand-in copies some of it)."""

    def __init__(self, session: str = "s1") -> None:
        self.id = f"f-{id(self)}"
        self.metadata: dict[str, Any] = {}
        self.comment = self.marked = ""
        self.request = SimpleNamespace(headers=http.Headers(mcp_session_id=session), method="POST")
        self.response: Any = None


class Call(SimpleNamespace):
    """The gateway's Call, as far as deferred.py reads it (weakly referenced, like the real one)."""

    __hash__ = object.__hash__


def make_call(principal: str = "key-1", tool: str = "t", rpc_id: Any = 1, priced: bool = True) -> Any:
    return Call(
        request_id=f"r-{id(object())}",
        consumer=SimpleNamespace(principal=principal, user_id={"key-1": 1, "token-1": 1}.get(principal, 2)),
        listing=SimpleNamespace(id=5, bill_tool_errors=False),
        priced=PricedCall("tools/call", rpc_id, tool) if priced else None, outcome=Outcome.RESULT, forwarded=None,
        charged=None, failure=None, withheld=False, refunded=False, started=time.monotonic(), editor=None,
        rewriter=None)


class Store:
    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    async def hold(self, request_id: str, mark: str) -> bool:
        self.held[request_id] = mark
        return True


@pytest.fixture
def registry() -> tuple[deferred.Deferred, list[tuple[Any, Decision]], Store]:
    settled: list[tuple[Any, Decision]] = []
    store = Store()
    config = SimpleNamespace(task_settle_seconds=3600.0, round_settle_seconds=900.0, max_body_bytes=1 << 20,
                             max_event_bytes=1 << 20, max_holding_bytes=1 << 30, platform_fee_bps=0)
    d = deferred.Deferred(lambda flow, call, decision: settled.append((call, decision)), lambda: config,
                          lambda: store)
    return d, settled, store


def body(message: Any) -> bytes:
    return json.dumps(message).encode()


def response(message: Any) -> Any:
    return SimpleNamespace(raw_content=body(message), headers={})


def task_call(d: deferred.Deferred, principal: str = "key-1", session: str = "s1") -> Any:
    call = make_call(principal)
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}
    assert d.on_request(call, body(request), "tools/call", session) is False  # a task is charged
    forward(d, call)
    d.watch_body(call, response({"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T", "status": "working"}}}))
    return call


def forward(d: deferred.Deferred, call: Any) -> None:
    """What the gateway does once the call is charged and goes to the upstream."""
    call.forwarded, call.charged = time.monotonic(), object()
    d.forwarded(call)


def poll(d: deferred.Deferred, method: str, answer: Any, principal: str = "key-1", session: str = "s1",
         params: dict[str, Any] | None = None) -> None:
    call = make_call(principal, priced=False)
    d.on_request(call, body({"jsonrpc": "2.0", "id": 2, "method": method, "params": params or {"taskId": "T"}}),
                 method, session)
    d.watch_body(call, response(answer))


async def test_a_task_is_held_then_settled_on_its_terminal_state(registry: Any) -> None:
    d, settled, store = registry
    call = task_call(d)
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert store.held == {call.request_id: "task_pending"}
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "working"}})
    assert settled == []
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "failed"}})
    assert settled == [(call, Decision(True, "task_failed"))]
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})
    assert len(settled) == 1  # settled once: later messages find nothing held


@pytest.mark.parametrize("status, decision", [("completed", Decision(False, "task_completed")),
                                              ("cancelled", Decision(True, "task_cancelled"))])
async def test_a_status_notification_settles(registry: Any, status: str, decision: Decision) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    poll(d, "tasks/list", {"jsonrpc": "2.0", "method": "notifications/tasks/status",
                           "params": {"taskId": "T", "status": status}})
    assert settled == [(call, decision)]


@pytest.mark.parametrize("withholding", [False, True])
async def test_a_tasks_result_in_a_batch_the_meter_cannot_judge_settles_only_if_it_is_delivered(
        registry: Any, withholding: bool) -> None:
    """An answer over max_event_bytes is read by the scanner, MAX_MESSAGES summaries at most. On a stream
    that may carry a refunded answer, a batch answering more cannot be judged and is cut there (never
    delivered: stream_edit.StreamEditor.unjudged), so the tasks/result answer in it settles nothing."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    d.config().max_event_bytes = 4096
    asking, flow = make_call(priced=False), Flow()
    d.on_request(asking, body({"jsonrpc": "2.0", "id": 2, "method": "tasks/result", "params": {"taskId": "T"}}),
                 "tasks/result", "s1")
    asking.editor = StreamEditor(None, lambda event: False, may_blank=lambda: withholding)
    flow.response = SimpleNamespace(headers={}, stream=lambda chunk: chunk)
    d.watch_stream(flow, asking)
    batch = [{"jsonrpc": "2.0", "id": i, "result": {"content": []}} for i in (2, *range(100, 100 + MAX_MESSAGES))]
    flow.response.stream(b"event: message\ndata: " + body(batch) + b"\n\n")
    assert settled == ([] if withholding else [(call, Decision(False, "task_completed"))])


@pytest.mark.parametrize("refunded", [False, True])
async def test_a_tasks_result_begun_before_a_refund_settles_only_if_the_editor_lets_it_end(
        registry: Any, refunded: bool) -> None:
    """The answer's start went out while nothing could be withheld; a refund comes before its end. If it
    turns out to answer a refunded call the editor cuts the stream there (StreamEditor.admit): the client
    never gets it, so the task reader, reading the chunk first, settles nothing by it."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    asking, flow = make_call(priced=False), Flow()
    d.on_request(asking, body({"jsonrpc": "2.0", "id": 2, "method": "tasks/result", "params": {"taskId": "T"}}),
                 "tasks/result", "s1")
    withholding = [False]
    asking.editor = editor = StreamEditor(None, lambda event: refunded, may_blank=lambda: withholding[0])
    parser = SseParser()

    def watcher(chunk: bytes) -> bytes:  # what stream_watch does with each chunk, after the task reader
        events = parser.feed(chunk)
        return editor.feed(chunk, editor.admit(events), parser.pending_from)

    flow.response = SimpleNamespace(headers={}, stream=watcher)
    d.watch_stream(flow, asking)
    answer = b"event: message\ndata: " + body({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}) + b"\n\n"
    assert flow.response.stream(answer[:30]) == answer[:30]  # nothing to withhold yet: out as it comes
    withholding[0] = True  # a call of the session refunded meanwhile
    out = flow.response.stream(answer[30:])
    assert (out == b"" and editor.severed) is refunded
    assert settled == ([] if refunded else [(call, Decision(False, "task_completed"))])


async def test_tasks_result_error_refunds(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32603, "message": "x"}})
    assert settled == [(call, Decision(True, "task_failed"))]


async def test_another_key_or_session_cannot_settle_a_task(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    failed = {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "failed"}}
    with pytest.raises(GatewayError):  # another user's poll: refused (task_forbidden), settles nothing
        poll(d, "tasks/get", failed, principal="key-2")
    poll(d, "tasks/get", failed, session="s2")
    assert settled == []


async def test_a_refused_or_plain_answer_is_not_held(registry: Any) -> None:
    d, _, store = registry
    call = task_call(d)
    assert not await d.hold(Flow(), call, Decision(True, "rpc_error"))
    plain = make_call()
    d.on_request(plain, body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}),
                 "tools/call", "s1")
    d.watch_body(plain, response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))  # task ignored
    assert not await d.hold(Flow(), plain, Decision(False, "result"))
    assert store.held == {}


async def test_expiry_refunds_tasks_and_bills_rounds(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    first = round_one(d)
    await d.hold(Flow(), first, Decision(False, "result"))
    for table in (d.tasks, d.rounds):
        for held in table.values():
            held.expires = time.monotonic() - 1
    d.expire()
    assert sorted((c is call, dec) for c, dec in settled) == [
        (False, Decision(False, "input_abandoned")), (True, Decision(True, "task_expired"))]


def round_one(d: deferred.Deferred, principal: str = "key-1", state: str = "S1") -> Any:
    call = make_call(principal, tool="ask")
    assert not d.on_request(call, body({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                        "params": {"name": "ask"}}), "tools/call", "s1")
    d.watch_body(call, response({"jsonrpc": "2.0", "id": 1,
                                 "result": {"resultType": "input_required", "requestState": state}}))
    return call


def retry(d: deferred.Deferred, state: str, principal: str = "key-1", tool: str = "ask",
          session: str = "s1") -> tuple[Any, bool]:
    call = make_call(principal, tool=tool, rpc_id=2)
    request = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": tool, "requestState": state, "inputResponses": {}}}
    return call, d.on_request(call, body(request), "tools/call", session)


async def test_rounds_cost_one_call(registry: Any) -> None:
    d, settled, store = registry
    first = round_one(d)
    assert await d.hold(Flow(), first, Decision(False, "result"))
    assert store.held[first.request_id] == "input_pending"
    second, continues = retry(d, "S1")
    assert continues  # not charged
    d.watch_body(second, response({"jsonrpc": "2.0", "id": 2,
                                   "result": {"resultType": "input_required", "requestState": "S2"}}))
    assert d.round_over(second, Decision(False, "result"))  # held again under S2
    assert settled == []
    third, continues = retry(d, "S2")
    assert continues
    d.watch_body(third, response({"jsonrpc": "2.0", "id": 2, "error": {"code": -1, "message": "x"}}))
    assert d.round_over(third, Decision(True, "rpc_error"))
    assert settled == [(first, Decision(True, "rpc_error"))]  # the one charge, refunded


async def test_a_state_is_used_once_and_only_by_its_key_tool_and_session(registry: Any) -> None:
    d, settled, _ = registry
    first = round_one(d)
    await d.hold(Flow(), first, Decision(False, "result"))
    assert not retry(d, "S1", principal="key-2")[1]
    assert not retry(d, "S1", tool="other")[1]
    assert not retry(d, "S1", session="s2")[1]
    assert not retry(d, "forged")[1]
    second, continues = retry(d, "S1")
    assert continues
    assert not retry(d, "S1")[1]  # used: a replay of the same state is charged
    d.watch_body(second, response({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
    assert d.round_over(second, Decision(False, "result"))
    assert settled == [(first, Decision(False, "result"))]


async def test_a_state_the_gateway_did_not_see_issued_is_charged(registry: Any) -> None:
    d, _, _ = registry
    first = round_one(d)  # answered, but its settlement (hold) never ran: nothing registered
    assert not retry(d, "S1")[1]
    assert first is not None


async def test_held_calls_are_bounded(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _, store = registry
    monkeypatch.setattr(deferred, "MAX_HELD", 1)
    first = round_one(d, state="A")
    assert d.will_hold(first)
    assert await d.hold(Flow(), first, Decision(False, "result"))
    second = round_one(d, state="B")
    assert not await d.hold(Flow(), second, Decision(False, "result"))  # full: settled as answered
    assert list(store.held) == [first.request_id]


async def test_each_user_holds_only_its_share(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer creating tasks nobody polls pays nothing for them (refunded at their limit): it may fill
    its own share, past which only its calls settle as answered; another consumer's are still held."""
    d, _, store = registry
    monkeypatch.setattr(deferred, "MAX_HELD_PER_USER", 1)
    first = task_call(d)  # user 1
    assert await d.hold(Flow(), first, Decision(False, "result"))
    second = round_one(d, principal="token-1")  # user 1 again, with another key
    assert not await d.hold(Flow(), second, Decision(False, "result"))
    other = round_one(d, principal="key-2")  # user 2
    assert await d.hold(Flow(), other, Decision(False, "result"))
    assert set(store.held) == {first.request_id, other.request_id}
    assert d.per_user == {1: 1, 2: 1}


def assert_counted(d: deferred.Deferred, expected: dict[int, int]) -> None:
    """`per_user` is what the tables hold, with no user left at zero."""
    held = [h.user for table in (d.tasks, d.rounds) for h in table.values()]
    assert d.per_user == {user: held.count(user) for user in held} == expected
    assert all(count > 0 for count in d.per_user.values())


def expire_all(d: deferred.Deferred) -> None:
    for table in (d.tasks, d.rounds):
        for held in table.values():
            held.expires = time.monotonic() - 1
    d.expire()


async def test_the_per_user_count_follows_every_way_in_and_out(registry: Any) -> None:
    d, settled, _ = registry
    # a task: held, then settled by its status
    await d.hold(Flow(), task_call(d), Decision(False, "result"))
    assert_counted(d, {1: 1})
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})
    assert_counted(d, {})
    # a task replaced by another under the same id, then expired
    await d.hold(Flow(), task_call(d), Decision(False, "result"))
    await d.hold(Flow(), task_call(d), Decision(False, "result"))
    assert_counted(d, {1: 1})
    expire_all(d)
    assert_counted(d, {})
    # a round taken by its retry, held again under a new state, taken again and ended
    await d.hold(Flow(), round_one(d), Decision(False, "result"))
    assert_counted(d, {1: 1})
    second, continues = retry(d, "S1")
    assert continues
    assert_counted(d, {})  # in flight with its retry
    d.watch_body(second, response({"jsonrpc": "2.0", "id": 2,
                                   "result": {"resultType": "input_required", "requestState": "S2"}}))
    assert d.round_over(second, Decision(False, "result"))
    assert_counted(d, {1: 1})
    third, continues = retry(d, "S2")
    assert continues and d.round_over(third, Decision(False, "result"))
    assert_counted(d, {})
    # a round taken by a retry the gateway refused: given back
    await d.hold(Flow(), round_one(d), Decision(False, "result"))
    refused, continues = retry(d, "S1")
    assert continues
    d.not_forwarded(refused)
    assert_counted(d, {1: 1})
    # ... the state issued again meanwhile: the newer round keeps it, the refused retry's is billed
    refused, continues = retry(d, "S1")
    await d.hold(Flow(), round_one(d), Decision(False, "result"))
    assert_counted(d, {1: 1})
    d.not_forwarded(refused)
    assert_counted(d, {1: 1})
    # a state issued twice (input_replaced), then a retry finding its round expired (put back), then expiry
    await d.hold(Flow(), round_one(d, principal="key-2"), Decision(False, "result"))
    await d.hold(Flow(), round_one(d, principal="key-2"), Decision(False, "result"))
    assert_counted(d, {1: 1, 2: 1})
    for held in d.rounds.values():
        held.expires = time.monotonic() - 1
    assert not retry(d, "S1")[1]
    assert_counted(d, {1: 1, 2: 1})
    d.expire()
    assert_counted(d, {})
    assert len(settled) == 8  # each held call settled once


async def test_a_refused_retry_gives_its_state_back(registry: Any) -> None:
    d, settled, _ = registry
    first = round_one(d)
    await d.hold(Flow(), first, Decision(False, "result"))
    refused, continues = retry(d, "S1")
    assert continues and not retry(d, "S1")[1]  # taken while the first retry is admitted
    d.not_forwarded(refused)  # e.g. refused by the breaker
    second, continues = retry(d, "S1")
    assert continues
    d.not_forwarded(make_call())  # a call that continued nothing: nothing happens
    assert d.round_over(second, Decision(False, "result"))
    assert settled == [(first, Decision(False, "result"))]


async def test_an_expired_task_result_is_refused(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    next(iter(d.tasks.values())).expires = time.monotonic() - 1
    d.expire()
    assert settled == [(call, Decision(True, "task_expired"))]
    with pytest.raises(GatewayError) as e:
        poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}})
    assert e.value.spec.code == "task_expired"
    with pytest.raises(GatewayError) as e:  # nor to another key (a careless upstream answers anyone)
        poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}, principal="key-2")
    assert e.value.spec.code == "task_expired"
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})  # status only
    assert len(settled) == 1


async def test_only_scopes_with_held_tasks_are_watched(registry: Any) -> None:
    d, _, _ = registry
    call = task_call(d)
    assert not d._watched((5, "key-1", "s1"))
    await d.hold(Flow(), call, Decision(False, "result"))
    assert d._watched((5, "key-1", "s1")) and not d._watched((5, "key-2", "s1"))
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})
    assert not d._watched((5, "key-1", "s1")) and d.watched == {}


# --- a task that ends before its answer is held -----------------------------------------------------

FAILED = {"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": {"taskId": "T", "status": "failed"}}


def get_stream(d: deferred.Deferred, events: list[Any], principal: str = "key-1", session: str = "s1") -> None:
    """The session's GET stream carries these messages (the stream is read as the gateway reads it)."""
    call, flow = make_call(principal, priced=False), Flow(session)
    flow.request.method = "GET"
    flow.response = SimpleNamespace(headers={}, stream=lambda chunk: chunk)
    d.watch_stream(flow, call)
    for event in events:
        assert flow.response.stream(b"event: message\ndata: " + body(event) + b"\n\n")


async def test_a_task_that_ended_before_its_answer_was_held_settles_when_held(registry: Any) -> None:
    d, settled, store = registry
    call = task_call(d)  # its CreateTaskResult is read; the settlement (hold) has not run yet
    get_stream(d, [FAILED])
    assert settled == []
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert store.held == {call.request_id: "task_pending"}  # marked first: the settlement then finds it held
    assert settled == [(call, Decision(True, "task_failed"))]
    assert d.tasks == {} and d.watched == {} and len(d.ended) == 0
    get_stream(d, [FAILED])  # said again: nothing is held, nothing settles twice
    assert len(settled) == 1
    assert len(d.ended) == 0  # and nothing is remembered: no task call of this scope is on its way


async def test_a_poll_answered_before_the_hold_counts_too(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})
    await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [(call, Decision(False, "task_completed"))]


async def test_a_status_ahead_of_the_create_task_result_in_its_own_stream(registry: Any) -> None:
    d, settled, _ = registry
    call, flow = make_call(), Flow()
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}
    d.on_request(call, body(request), "tools/call", "s1")
    forward(d, call)
    flow.response = SimpleNamespace(headers={}, stream=lambda chunk: chunk)
    d.watch_stream(flow, call)
    created = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T", "status": "working"}}}
    flow.response.stream(b"data: " + body(FAILED) + b"\n\ndata: " + body(created) + b"\n\n")
    await d.hold(flow, call, Decision(False, "result"))
    assert settled == [(call, Decision(True, "task_failed"))]


async def test_an_early_end_in_another_scope_settles_nothing(registry: Any) -> None:
    d, settled, _ = registry
    call = task_call(d)
    get_stream(d, [FAILED], principal="key-2")
    get_stream(d, [FAILED], session="s2")
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [] and ((5, "key-1", "s1"), "T") in d.tasks


async def test_early_ends_are_bounded_and_forgotten(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d, settled, _ = registry
    now = [1000.0]
    monkeypatch.setattr(deferred.time, "monotonic", lambda: now[0])
    d = deferred.Deferred(d.settle, d.config, d.store)  # its TTL cache on the patched clock
    call = task_call(d)  # on its way: statuses of unknown tasks of its scope are remembered
    get_stream(d, [{**FAILED, "params": {"taskId": f"T{i}", "status": "failed"}} for i in range(3 * deferred.MAX_HELD)])
    # an upstream naming endless tasks keeps only the newest, its consumer's share of them
    assert len(d.ended) == deferred.MAX_HELD_PER_USER
    get_stream(d, [{**FAILED, "params": {"taskId": "x" * (deferred.MAX_TASK_ID_CHARS + 1), "status": "failed"}}])
    assert all(len(task_id) <= deferred.MAX_TASK_ID_CHARS for _, task_id in d.ended)  # a long id is not kept
    now[0] += deferred.ENDED_EARLY_SECONDS + 1
    get_stream(d, [{**FAILED, "params": {"taskId": "other", "status": "failed"}}])
    assert len(d.ended) == 1  # the old ones expired
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == []


async def test_a_tasks_result_error_for_a_task_not_held_is_not_remembered(registry: Any) -> None:
    """The client picks a tasks/result's taskId: an error answering it (no such task, yet) must not
    settle the task that id will name, or a client could have its next task refunded in advance."""
    d, settled, _ = registry
    call = make_call()
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}
    d.on_request(call, body(request), "tools/call", "s1")
    forward(d, call)  # a task call on its way
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32602, "message": "no task"}})
    d.watch_body(call, response({"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T", "status": "working"}}}))
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [] and len(d.ended) == 0


async def test_a_status_with_no_task_call_on_its_way_is_not_remembered(registry: Any) -> None:
    """A status of a task settled already (a poll after its end), or held by another gateway, could
    otherwise settle a later task that reuses the id (counter ids, a restarted upstream)."""
    d, settled, _ = registry
    get_stream(d, [FAILED])
    assert len(d.ended) == 0 and len(d.awaiting) == 0
    call = task_call(d)
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == []


async def test_a_status_that_passed_before_the_call_was_forwarded_is_not_its_tasks(registry: Any) -> None:
    """While one task call is on its way, a poll of a task settled earlier says "failed"; a task the
    upstream later creates under the same id (counter ids, a restart) is not settled by it."""
    d, settled, _ = registry
    first = task_call(d)
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "failed"}})
    assert len(d.ended) == 1  # remembered: it might have been the first call's
    time.sleep(0.001)
    second = task_call(d)  # forwarded after that status passed
    assert first.forwarded < second.forwarded
    assert await d.hold(Flow(), second, Decision(False, "result"))
    assert settled == []


async def test_a_task_refunded_by_its_tasks_result_error_does_not_deliver_its_result(registry: Any) -> None:
    """A client can provoke an error answering tasks/result (a busy or careless upstream): the task is
    refunded, and its result then refused, in any session of the same key."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32000, "message": "busy"}})
    assert settled == [(call, Decision(True, "task_failed"))]
    request = body({"jsonrpc": "2.0", "id": 3, "method": "tasks/result", "params": {"taskId": "T"}})
    for principal, session in (("key-1", "s1"), ("key-1", "s2"), ("key-2", "s1")):
        with pytest.raises(GatewayError) as refused:
            d.on_request(make_call(principal, priced=False), request, "tasks/result", session)
        assert refused.value.spec.code == "task_expired"


def test_an_error_code_of_any_type_is_read_safely() -> None:
    for code in ([1], {"a": 1}, None, True, "x", 1.5):
        assert deferred.result_decision({"jsonrpc": "2.0", "id": 1, "error": {"code": code}}, 1, False) == \
            Decision(True, "task_failed")


@pytest.mark.parametrize("method", ["tasks/get", "tasks/cancel"])
async def test_another_users_poll_or_cancel_of_a_held_task_is_refused(registry: Any, method: str) -> None:
    """The upstream cannot tell consumers apart (they share the publisher's credentials): another user
    naming a held task could read its status or cancel it, the owner's paid call then failing. Refused
    as its result is; the owner's other sessions and keys still poll and cancel it."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    with pytest.raises(GatewayError) as refused:
        poll(d, method, {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "cancelled"}},
             principal="key-2")
    assert refused.value.spec.code == "task_forbidden" and refused.value.spec.status == 403
    # The owner from another session: passes, and (a poll from another session) settles nothing.
    poll(d, method, {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "working"}}, session="s2")
    poll(d, method, {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "working"}},
         params={"taskId": "unknown"}, principal="key-2")  # a task nobody holds here: passes
    assert settled == []
    poll(d, method, {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "cancelled"}})
    assert settled == [(call, Decision(True, "task_cancelled"))]


async def test_a_held_tasks_result_is_refused_to_another_key_and_settles_from_another_session(registry: Any) -> None:
    """The result of a held task is what its key paid for: another key asking for it (an upstream
    that answers anyone would deliver it) is refused; the same key in another session is its owner,
    and the answer settles the task as one in its own session would."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    with pytest.raises(GatewayError) as refused:
        poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}, principal="key-2")
    assert refused.value.spec.code == "task_forbidden" and refused.value.spec.status == 403
    assert settled == []
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}, session="s2")
    assert settled == [(call, Decision(False, "task_completed"))]
    assert d.by_task == {} and d.tasks == {}


async def test_the_same_user_with_another_key_fetches_its_result_and_colliding_ids_block_nobody(
        registry: Any) -> None:
    """An OAuth token refreshed while its task runs is another principal of the same user: its
    tasks/result settles the task. Two keys whose careless upstream gave their tasks one id each
    fetch their own result."""
    d, settled, _ = registry
    mine = task_call(d)
    await d.hold(Flow(), mine, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}}, principal="token-1")
    assert settled == [(mine, Decision(False, "task_completed"))]
    first, second = task_call(d), task_call(d, principal="key-2")  # both named "T" by the upstream
    await d.hold(Flow(), first, Decision(False, "result"))
    await d.hold(Flow(), second, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32603, "message": "x"}}, principal="key-2")
    assert settled[1:] == [(second, Decision(True, "task_failed"))]
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}})  # key-1's own, not refused
    assert settled[2:] == [(first, Decision(False, "task_completed"))]
    third = task_call(d)  # the id again, a new paid task: the old refusal does not apply to it
    await d.hold(Flow(), third, Decision(False, "result"))
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}})
    assert settled[3:] == [(third, Decision(False, "task_completed"))]


# --- a task id or a requestState held already: the earlier call is settled, never overwritten ------------


async def test_a_task_id_held_already_refunds_the_earlier_task_before_holding_the_new_one(registry: Any) -> None:
    """An upstream names two paid tasks of one scope alike: the first one's end can no longer be told
    from the second's, so it is refunded at once (task_replaced), not dropped from memory to wait an
    hour for the journal's sweep; the id then settles the second one, once."""
    d, settled, store = registry
    first = task_call(d)
    assert await d.hold(Flow(), first, Decision(False, "result"))
    second = task_call(d)  # the upstream answers it with the same taskId "T"
    assert await d.hold(Flow(), second, Decision(False, "result"))
    assert settled == [(first, Decision(True, "task_replaced"))]
    assert store.held == {first.request_id: "task_pending", second.request_id: "task_pending"}
    scope = (5, "key-1", "s1")
    assert d.tasks[(scope, "T")].call is second and d.watched == {scope: 1} and d.by_task == {(5, "T"): {scope: 1}}
    assert d.expired == {}  # the id's result is the second task's, paid for: not refused
    poll(d, "tasks/get", {"jsonrpc": "2.0", "id": 2, "result": {"taskId": "T", "status": "completed"}})
    assert settled[1:] == [(second, Decision(False, "task_completed"))]
    assert d.tasks == {} and d.watched == {} and d.by_task == {}


async def test_an_upstream_naming_every_task_alike_keeps_one_held(registry: Any) -> None:
    d, settled, _ = registry
    calls = [task_call(d) for _ in range(50)]
    for call in calls:
        assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [(call, Decision(True, "task_replaced")) for call in calls[:-1]]
    assert len(d.tasks) == 1 and sum(d.watched.values()) == 1 and len(d.by_task) == 1
    assert len(d.awaiting) == 0 and len(d.ended) == 0
    next(iter(d.tasks.values())).expires = time.monotonic() - 1
    d.expire()
    assert settled[-1] == (calls[-1], Decision(True, "task_expired"))
    assert d.tasks == {} and d.watched == {} and d.by_task == {} and list(d.expired) == [(5, "T")]


async def test_a_request_state_held_already_bills_the_earlier_round_before_holding_the_new_one(
        registry: Any) -> None:
    """An upstream issues one requestState to two rounds of the same key and tool: a retry carrying it
    continues one of them only, so the earlier is billed at once as a round nothing can continue
    (input_replaced, as a round without a state is), and the retry settles the later one."""
    d, settled, _ = registry
    first = round_one(d)
    assert await d.hold(Flow(), first, Decision(False, "result"))
    second = round_one(d)  # the same state "S1"
    assert await d.hold(Flow(), second, Decision(False, "result"))
    assert settled == [(first, Decision(False, "input_replaced"))]
    assert len(d.rounds) == 1
    retried, continues = retry(d, "S1")
    assert continues
    assert d.round_over(retried, Decision(True, "rpc_error"))
    assert settled[1:] == [(second, Decision(True, "rpc_error"))] and d.rounds == {}


async def test_a_next_round_under_a_state_held_already_bills_the_other_round(registry: Any) -> None:
    """A chain's next round takes a key another round holds: that round is billed, never dropped. A
    refused retry giving its state back finds the state issued again meanwhile: the newer round keeps
    it (as a state issued twice holds the newer round) and the returned one is billed."""
    d, settled, _ = registry
    chain, other = round_one(d, state="S1"), round_one(d, state="S2")
    await d.hold(Flow(), chain, Decision(False, "result"))
    await d.hold(Flow(), other, Decision(False, "result"))
    retried, continues = retry(d, "S1")
    assert continues
    d.watch_body(retried, response({"jsonrpc": "2.0", "id": 2,
                                    "result": {"resultType": "input_required", "requestState": "S2"}}))
    assert d.round_over(retried, Decision(False, "result"))  # the chain is held again, under S2
    assert settled == [(other, Decision(False, "input_replaced"))]
    refused, continues = retry(d, "S2")
    assert continues
    late = round_one(d, state="S2")  # issued S2 again while the retry was being admitted
    await d.hold(Flow(), late, Decision(False, "result"))
    d.not_forwarded(refused)  # the chain's round comes back to a state the late one holds: the chain is billed
    assert settled[1:] == [(chain, Decision(False, "input_replaced"))]
    final, continues = retry(d, "S2")
    assert continues and d.round_over(final, Decision(False, "result"))
    assert settled[2:] == [(late, Decision(False, "result"))] and d.rounds == {}


async def test_a_held_call_keeps_nothing_of_its_stream(registry: Any) -> None:
    """What a stream cut off mid-event left in the meter's parser goes with the flow, not with the
    held call (its Facts are kept as long as it is held)."""
    d, _, _ = registry
    call, flow = make_call(), Flow()
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}
    d.on_request(call, body(request), "tools/call", "s1")
    forward(d, call)
    flow.response = SimpleNamespace(headers={}, stream=lambda chunk: chunk)
    d.watch_stream(flow, call)
    created = {"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": "T", "status": "working"}}}
    tracemalloc.start()
    try:
        flow.response.stream(b"event: message\ndata: " + body(created) + b"\n\n")
        flow.response.stream(b"event: message\ndata: " + b"x" * 500_000)  # and no more: the client went
        assert await d.hold(flow, call, Decision(False, "result"))
        before = tracemalloc.get_traced_memory()[0]
        del flow
        gc.collect()
        assert before - tracemalloc.get_traced_memory()[0] > 400_000  # the half event, freed
    finally:
        tracemalloc.stop()
    assert list(d.tasks) == [((5, "key-1", "s1"), "T")]  # still held


# --- one consumer's share of the tables that remember statuses, awaited calls and asked results ------


def task_on_its_way(d: deferred.Deferred, principal: str = "key-1", session: str = "s1") -> Any:
    """A task-augmented call charged and forwarded, its CreateTaskResult not read yet."""
    call = make_call(principal)
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "task": {}}}
    d.on_request(call, body(request), "tools/call", session)
    forward(d, call)
    return call


def created(d: deferred.Deferred, call: Any, task_id: str = "T") -> None:
    d.watch_body(call, response({"jsonrpc": "2.0", "id": 1, "result": {"task": {"taskId": task_id,
                                                                                 "status": "working"}}}))


@pytest.fixture
def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred, "MAX_HELD", 4)
    monkeypatch.setattr(deferred, "MAX_HELD_PER_USER", 2)


@pytest.mark.usefixtures("small_tables")
async def test_one_consumers_calls_on_their_way_do_not_crowd_out_anothers(registry: Any) -> None:
    """Another consumer keeps task calls on their way in as many sessions as the table has room for. A
    user's task then completes before its CreateTaskResult is held (the status on its GET stream, the
    result fetched at once): not remembered, the task waited for its limit and was refunded as
    task_expired, its result delivered free."""
    d, settled, _ = registry
    hostile = [task_on_its_way(d, principal="key-2", session=f"h{i}") for i in range(deferred.MAX_HELD)]
    call = task_on_its_way(d)
    created(d, call)
    get_stream(d, [{**FAILED, "params": {"taskId": "T", "status": "completed"}}])
    poll(d, "tasks/result", {"jsonrpc": "2.0", "id": 2, "result": {"content": []}})  # not held yet: settles nothing
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [(call, Decision(False, "task_completed"))]
    assert len(d.awaiting) == deferred.MAX_HELD_PER_USER and len(hostile) == deferred.MAX_HELD


@pytest.mark.usefixtures("small_tables")
async def test_one_consumers_early_ends_do_not_evict_anothers(registry: Any) -> None:
    """Another consumer, with a task call of its own on its way, has statuses of many tasks pass (its
    own tasks, cancelled and so refunded, polled with tasks/get): they evicted the status of a user's
    task that completed before its answer was held, which then waited for its limit and was refunded."""
    d, settled, _ = registry
    call = task_on_its_way(d)
    created(d, call)
    get_stream(d, [{**FAILED, "params": {"taskId": "T", "status": "completed"}}])
    other = task_on_its_way(d, principal="key-2")
    get_stream(d, [{**FAILED, "params": {"taskId": f"X{i}", "status": "cancelled"}}
                   for i in range(deferred.MAX_HELD)], principal="key-2")
    assert len(d.ended) == 1 + deferred.MAX_HELD_PER_USER and other  # the other consumer's newest only
    assert await d.hold(Flow(), call, Decision(False, "result"))
    assert settled == [(call, Decision(False, "task_completed"))]


@pytest.mark.usefixtures("small_tables")
async def test_one_consumers_asked_results_do_not_evict_anothers(registry: Any) -> None:
    """Another consumer holds a task and sends tasks/result requests for it, which its upstream leaves
    unanswered: they evicted a user's tasks/result request, whose answer, resumed on the session's GET
    stream, then settled nothing (its task refunded at its limit, its result delivered free)."""
    d, settled, _ = registry
    call = task_call(d)
    await d.hold(Flow(), call, Decision(False, "result"))
    asking = make_call(priced=False)
    d.on_request(asking, body({"jsonrpc": "2.0", "id": 7, "method": "tasks/result", "params": {"taskId": "T"}}),
                 "tasks/result", "s1")
    await d.hold(Flow(), task_call(d, principal="key-2", session="s9"), Decision(False, "result"))
    for rpc_id in range(100, 100 + deferred.MAX_HELD):
        d.on_request(make_call("key-2", priced=False),
                     body({"jsonrpc": "2.0", "id": rpc_id, "method": "tasks/result", "params": {"taskId": "T"}}),
                     "tasks/result", "s9")
    get_stream(d, [{"jsonrpc": "2.0", "id": 7, "result": {"content": []}}])  # the user's answer, resumed
    assert settled == [(call, Decision(False, "task_completed"))]


async def test_a_round_held_again_keeps_to_the_consumers_share(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round taken by its retry frees its consumer's slot, which the consumer's next call takes; the
    retry's answer asking for input again held the round again past the share (and past MAX_HELD):
    repeated, one consumer held any number of calls. Held again only where a first hold would be;
    else it settles now, as a first hold past the limits does."""
    d, settled, _ = registry
    monkeypatch.setattr(deferred, "MAX_HELD_PER_USER", 1)
    first = round_one(d)
    assert await d.hold(Flow(), first, Decision(False, "result"))
    second, continues = retry(d, "S1")
    assert continues
    other = round_one(d, state="B")
    assert await d.hold(Flow(), other, Decision(False, "result"))  # the slot the retry freed
    d.watch_body(second, response({"jsonrpc": "2.0", "id": 2,
                                   "result": {"resultType": "input_required", "requestState": "S2"}}))
    assert d.round_over(second, Decision(False, "result"))
    assert settled == [(first, Decision(False, "result"))]
    assert_counted(d, {1: 1})
    monkeypatch.setattr(deferred, "MAX_HELD", 1)  # the same for the table's own bound
    third, continues = retry(d, "B", principal="key-1")
    assert continues
    held = round_one(d, principal="key-2", state="C")
    assert await d.hold(Flow(), held, Decision(False, "result"))
    d.watch_body(third, response({"jsonrpc": "2.0", "id": 2,
                                  "result": {"resultType": "input_required", "requestState": "S3"}}))
    assert d.round_over(third, Decision(False, "result"))
    assert settled[1:] == [(other, Decision(False, "result"))]
    assert len(d.rounds) == 1


async def test_marks_that_cannot_land_at_a_sweep_are_logged_once(
        registry: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The database down at a sweep: each held call whose mark is retried logged its own line (up to
    MAX_HELD a sweep). One line says how many, and the first error; each is retried at the next."""
    d, _, store = registry

    async def down(request_id: str, mark: str) -> bool:
        raise StoreUnavailable("sqlite: disk I/O error")

    store.hold = down
    calls = [round_one(d, state=f"S{i}") for i in range(5)]
    for n, call in enumerate(calls):
        call.request_id, call.decided = f"r-{n}", None
        assert await d.hold(Flow(), call, Decision(False, "result"))
    assert len(d.unmarked) == 5
    d.config().stale_call_seconds = 3600.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcpmeter"):
        await d.mark_unmarked()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "5 held call(s)" in lines[0] and "disk I/O error" in lines[0]
    assert len(d.unmarked) == 5  # not let go: the plain sweep cannot take them before the next
