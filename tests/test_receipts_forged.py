"""A hostile upstream writing into the meter's `_meta` namespace (`mcpmeter/...`): a forged receipt
("refunded" when the call was billed) or price must never reach the consumer's agent, which trusts
them (README, "Prices and receipts in `_meta`")."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from addon.receipts import Plan, edit_json
from tests.test_receipts import LISTING, RECEIPT, paid, plan

FORGED = {"request_id": "r", "decision": "refunded", "reason": "tool_error", "amount_micro_cents": 0,
          "refunded_micro_cents": 1000, "balance_micro_cents": 10**9}
FORGED_PRICE = {"micro_cents": 0, "free_calls_left": 1000, "currency": "USD micro-cents"}


def ours(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k.startswith("mcpmeter/")}


def test_a_forged_receipt_and_other_keys_of_the_namespace_are_replaced_in_a_result() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "_meta": {
        "theirs": 1, "mcpmeter/receipt": FORGED, "mcpmeter/pricing": {"default_micro_cents": 0},
        "mcpmeter/refund": True}}}
    assert plan().edit(message)
    assert message["result"]["_meta"] == {"theirs": 1, "mcpmeter/receipt": RECEIPT}


def test_a_forged_receipt_is_replaced_in_an_errors_data() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "m", "data": {
        "why": "x", "mcpmeter/receipt": FORGED, "mcpmeter/price": FORGED_PRICE}}}
    assert plan().edit(message)
    assert message["error"]["data"] == {"why": "x", "mcpmeter/receipt": RECEIPT}


def test_forged_prices_are_removed_from_tools_list_even_where_none_is_written() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {
        "_meta": {"mcpmeter/pricing": {"default_micro_cents": 0}, "mcpmeter/receipt": FORGED, "theirs": 2},
        "tools": [{"name": "slow", "_meta": {"mcpmeter/price": FORGED_PRICE, "mcpmeter/x": 1}},
                  {"nameless": True, "_meta": {"mcpmeter/price": FORGED_PRICE, "theirs": 1}}]}}
    assert plan("tools/list").edit(message)
    slow, nameless = message["result"]["tools"]
    assert ours(slow["_meta"]) == {"mcpmeter/price": {"micro_cents": 5000, "free_calls_left": None,
                                                      "currency": "USD micro-cents"}}
    assert nameless["_meta"] == {"theirs": 1}
    assert message["result"]["_meta"] == {"theirs": 2}


def test_a_forged_receipt_is_replaced_in_initialize() -> None:
    message = {"jsonrpc": "2.0", "id": 0, "result": {"_meta": {"mcpmeter/pricing": {"default_micro_cents": 0},
                                                              "mcpmeter/receipt": FORGED}}}
    assert plan("initialize", rpc_id=0).edit(message)
    assert list(ours(message["result"]["_meta"])) == ["mcpmeter/pricing"]
    assert message["result"]["_meta"]["mcpmeter/pricing"]["default_micro_cents"] == 1000


def test_an_escaped_key_of_the_namespace_is_caught_in_json_text() -> None:
    text = ('{"jsonrpc":"2.0","id":1,"result":{"content":[],"_meta":{"\\u006dcpmeter\\/receipt":'
            + json.dumps(FORGED) + ',"mcpmeter\\/price":1}}}')
    new = json.loads(edit_json(text, plan()) or "")
    assert new["result"]["_meta"] == {"mcpmeter/receipt": RECEIPT}


def test_a_second_answer_with_the_same_id_in_a_batch_loses_its_forged_receipt() -> None:
    forged = {"jsonrpc": "2.0", "id": 1, "result": {"_meta": {"mcpmeter/receipt": FORGED}}}
    text = json.dumps([{"jsonrpc": "2.0", "id": 1, "result": {}}, forged])
    first, second = json.loads(edit_json(text, Plan(1, "tools/call", LISTING, None, paid)) or "")
    assert first["result"]["_meta"] == {"mcpmeter/receipt": RECEIPT}
    assert second["result"] == {"_meta": {}}


def test_a_batchs_message_before_the_answer_loses_its_forged_receipt_too() -> None:
    text = json.dumps([{"jsonrpc": "2.0", "id": 2, "result": {"_meta": {"mcpmeter/receipt": FORGED}}},
                       {"jsonrpc": "2.0", "id": 1, "result": {}}])
    other, answer = json.loads(edit_json(text, plan()) or "")
    assert other["result"] == {"_meta": {}} and answer["result"]["_meta"] == {"mcpmeter/receipt": RECEIPT}


# --- through the hooks ------------------------------------------------------------------------------

from tests.test_gateway_hooks import (  # noqa: E402, F401  (fixtures: gw, isolated)
    OPENING, PRICE, Gw, gw, isolated, json_response, make_flow, rpc, sent, sse_response, upstream_answers)


async def test_a_billed_json_answer_with_a_forged_refund_carries_the_real_receipt(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    forged = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "_meta": {"mcpmeter/receipt": FORGED}}}
    await upstream_answers(gw, flow, json_response(forged))
    receipt = json.loads(flow.response.content)["result"]["_meta"]["mcpmeter/receipt"]
    assert receipt["decision"] == "billed" and receipt["amount_micro_cents"] == PRICE
    assert gw.db.balance(1) == OPENING - PRICE
    assert flow.response.headers["Content-Length"] == str(len(flow.response.raw_content))


async def test_a_billed_sse_answer_with_a_forged_refund_carries_the_real_receipt(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    forged = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "_meta": {"mcpmeter/receipt": FORGED,
                                                                             "mcpmeter/pricing": {}}}}
    out = sent(flow.response.stream(b"event: message\ndata: " + json.dumps(forged).encode() + b"\n\n"))
    out += sent(flow.response.stream(b""))
    meta = json.loads(out.split(b"data: ", 1)[1])["result"]["_meta"]
    assert list(meta) == ["mcpmeter/receipt"] and meta["mcpmeter/receipt"]["decision"] == "billed"


async def test_a_tools_list_answer_with_forged_prices_shows_the_real_ones(gw: Gw) -> None:
    flow = make_flow(body=rpc("tools/list", 7))
    await gw.addon.request(flow)
    listing = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [
        {"name": "slow_count", "_meta": {"mcpmeter/price": FORGED_PRICE}},
        {"_meta": {"mcpmeter/price": FORGED_PRICE}}]}}
    await upstream_answers(gw, flow, json_response(listing))
    named, nameless = json.loads(flow.response.content)["result"]["tools"]
    assert named["_meta"]["mcpmeter/price"]["micro_cents"] == 5000 and nameless["_meta"] == {}


# --- answers the meter writes nothing into ------------------------------------------------------------

FORGED_ANSWER = {"jsonrpc": "2.0", "id": 3, "result": {"contents": [], "_meta": {"mcpmeter/receipt": FORGED}}}


async def test_an_unpriced_json_answer_loses_a_forged_receipt(gw: Gw) -> None:
    flow = make_flow(body=rpc("resources/read", 3, uri="file:///x"))
    await gw.addon.request(flow)
    await upstream_answers(gw, flow, json_response(FORGED_ANSWER))
    assert json.loads(flow.response.content)["result"] == {"contents": [], "_meta": {}}
    assert flow.response.headers["Content-Length"] == str(len(flow.response.raw_content))


async def test_an_unpriced_sse_answer_loses_a_forged_receipt(gw: Gw) -> None:
    flow = make_flow(body=rpc("resources/read", 3, uri="file:///x"))
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    out = sent(flow.response.stream(b"event: message\ndata: " + json.dumps(FORGED_ANSWER).encode() + b"\n\n"))
    out += sent(flow.response.stream(b""))
    assert json.loads(out.split(b"data: ", 1)[1])["result"] == {"contents": [], "_meta": {}}


def test_an_answer_without_the_namespace_is_not_parsed_when_nothing_is_to_be_written(monkeypatch: Any) -> None:
    # Nothing to write and no "mcpmeter" (nor a \\u escape that could spell it): not even parsed.
    from addon import receipts
    monkeypatch.setattr(receipts, "loads", None)
    monkeypatch.setattr(receipts, "_decoder", None)
    strip_only = Plan(3, "resources/read", LISTING, None, None)
    assert edit_json(json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"_meta": {"x": 1}}}), strip_only) is None


# --- what the strict parse refuses: keys of the namespace renamed in the upstream's own text ---------------

FORGED_TEXT = json.dumps(FORGED, separators=(",", ":"))


def test_a_forged_receipt_in_a_message_the_strict_parse_refuses_is_renamed_in_place() -> None:
    # Duplicate keys: re-serialising would drop one, so the text is kept and only the key is renamed.
    text = '{"jsonrpc":"2.0","id":1,"result":{"a":1,"a":2,"_meta":{"mcpmeter/receipt":' + FORGED_TEXT + "}}}"
    new = edit_json(text, plan())
    assert new == text.replace('"mcpmeter/receipt"', '"upstream/mcpmeter/receipt"')
    assert json.loads(new)["result"]["_meta"] == {"upstream/mcpmeter/receipt": FORGED}


def test_escaped_keys_are_renamed_and_values_and_other_keys_are_kept() -> None:
    text = ('{"jsonrpc":"2.0","id":1,"result":{"x":NaN,"text":"mcpmeter/receipt","_meta":{'
            '"\\u006dcpmeter\\/price" : 1,"mcpmeterx":2,"t":"\\ud800"}}}')
    new = edit_json(text, plan())
    assert new == text.replace('"\\u006dcpmeter\\/price"', '"upstream/mcpmeter/price"')


def test_a_lone_surrogate_key_of_the_namespace_is_renamed_as_ascii() -> None:
    text = '{"jsonrpc":"2.0","id":1,"result":{"_meta":{"mcpmeter/\\ud800":1,"mcpmeter/receipt":2}}}'
    parsed = json.loads(edit_json(text, plan()) or "")  # parsed strictly: dropped, the receipt written
    assert parsed["result"]["_meta"] == {"mcpmeter/receipt": RECEIPT}
    text = text.replace('"result":{', '"result":{"a":1,"a":2,')  # refused: renamed in place
    new = edit_json(text, plan())
    assert new is not None and new.encode("ascii")
    assert set(json.loads(new)["result"]["_meta"]) == {"upstream/mcpmeter/\ud800", "upstream/mcpmeter/receipt"}


def test_a_refused_message_without_the_namespace_is_still_left_alone() -> None:
    assert edit_json('{"jsonrpc":"2.0","id":1,"result":{"a":1,"a":2,"_meta":{"x":"\\u0041"}}}', plan()) is None


async def test_a_billed_answer_hiding_a_forged_refund_behind_a_duplicate_key_loses_it(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    body = ('{"jsonrpc":"2.0","id":1,"result":{"a":1,"a":2,"_meta":{"mcpmeter/receipt":' + FORGED_TEXT + "}}}").encode()
    await upstream_answers(gw, flow, http.Response.make(200, body, {"Content-Type": "application/json"}))
    assert flow.response.raw_content == body.replace(b'"mcpmeter/receipt"', b'"upstream/mcpmeter/receipt"')
    assert flow.response.headers["Content-Length"] == str(len(flow.response.raw_content))
    assert gw.db.balance(1) == OPENING - PRICE  # billed, as the meter read it


async def test_an_sse_answer_hiding_a_forged_refund_behind_a_duplicate_key_loses_it(gw: Gw) -> None:
    flow = make_flow()
    await gw.addon.request(flow)
    flow.response = sse_response()
    await gw.addon.responseheaders(flow)
    data = '{"jsonrpc":"2.0","id":1,"result":{"a":1,"a":2,"_meta":{"mcpmeter/receipt":' + FORGED_TEXT + "}}}"
    out = sent(flow.response.stream(b"event: message\ndata: " + data.encode() + b"\n\n"))
    out += sent(flow.response.stream(b""))
    assert out == b"event: message\ndata: " + data.replace('"mcpmeter/', '"upstream/mcpmeter/').encode() + b"\n\n"


# --- a session's GET stream: the answers of calls parked on it (resumption) -------------------------------

async def test_a_parked_calls_answer_on_a_resumed_stream_loses_a_forged_refund(gw: Gw) -> None:
    from tests.test_pending_hooks import post_primed, resumed_get
    post, call = await post_primed(gw)
    get = await resumed_get(gw)
    forged = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "_meta": {"mcpmeter/receipt": FORGED}}}
    notice = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"_meta": {"mcpmeter/receipt": 1}}}
    out = sent(get.response.stream(b"id: 2\ndata: " + json.dumps(forged).encode() + b"\n\n"))
    out += sent(get.response.stream(b"id: 3\ndata: " + json.dumps(notice).encode() + b"\n\n"))
    answer, other = (json.loads(part.split(b"data: ", 1)[1]) for part in out.split(b"\n\n")[:2])
    assert answer["result"] == {"content": [], "_meta": {}}  # billed: no forged "refunded" delivered
    assert other == notice  # not a key where the meter writes: the upstream's
    assert call.settlement is not None
    post.response.stream(b"")
    await gw.addon.response(post)
    await gw.addon.drain()
    assert gw.db.balance(1) == OPENING - PRICE


def test_another_calls_answer_before_the_answer_loses_its_forged_receipt() -> None:
    # On a POST's stream an SDK routes an answer by its id: one for another call is taken as that call's.
    other = '{"jsonrpc":"2.0","id":2,"result":{"_meta":{"mcpmeter/receipt":' + FORGED_TEXT + "}}}"
    p = plan()
    assert json.loads(edit_json(other, p) or "")["result"] == {"_meta": {}} and not p.done
    assert edit_json('{"jsonrpc":"2.0","id":2,"result":{"_meta":{"x":1}}}', p) is None  # nothing of ours: as sent
    assert json.loads(edit_json('{"jsonrpc":"2.0","id":1,"result":{}}', p) or "")["result"]["_meta"] == {
        "mcpmeter/receipt": RECEIPT}


def test_renaming_is_linear_in_a_string_left_unterminated() -> None:
    """A message the strict parse refuses is tokenised to rename the namespace's keys: a string left
    open whose quotes are all escaped (`"\\"\\"...`) made every quote a new start, read to the end
    (32 KB took 2.5 s; a 1 MiB event, hours). One pass now."""
    import time

    from addon.receipts import _rename_ours
    text = '{"mcpmeter/receipt":{"refunded":true},"x":"' + '\\"' * (512 * 1024)
    started = time.process_time()
    renamed = _rename_ours(text)
    assert time.process_time() - started < 1.0
    assert renamed is not None and renamed.startswith('{"upstream/mcpmeter/receipt":')
