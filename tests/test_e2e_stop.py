"""End to end, on both backends: SIGINT or SIGTERM to mitmdump under load settles everything it delivered.

Many clients make paid calls (quick ones, and slow ones that are in flight at the signal); after
the 200th billed answer the gateway gets the signal. Then: every 200 a client received with a
non-zero X-Mcpmeter-Billed has its usage row with that amount, no call is left unsettled for the
sweeper, and every ledger reconciles (conftest). The gateway exits by itself, cleanly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path

import httpx2
import pytest

from tests.backends import Backend
from tests.gateway_proc import ROOT, start_gateway
from tests.refusals import refusal
from tests.test_e2e_gateway import MCP_HEADERS, call, slug
from tests.test_e2e_secrets import rewrite, wait_for

pytestmark = pytest.mark.timeout(120)

CLIENTS = 40
SIGNAL_AFTER = 200  # billed answers


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_signal_under_load_settles_every_billed_answer(backend: Backend, fault_url: str, tmp_path: Path,
                                                               signum: signal.Signals) -> None:
    s = slug("stop")
    backend.add_listing(s, fault_url + "/mcp", price=1000, rpm=100_000, rpd=1_000_000)
    c = backend.add_consumer(credit=100_000_000)
    gw = start_gateway(backend.config(), tmp_path, env=backend.env())
    answers: list[httpx2.Response] = []
    billed = asyncio.Event()

    async def client(n: int) -> None:
        body = call("slow", {"seconds": 0.4}) if n % 4 == 0 else call("ok")
        async with httpx2.AsyncClient(timeout=30) as http:
            while True:
                try:
                    r = await http.post(f"{gw.url}/{s}", content=json.dumps(body).encode(),
                                        headers={**MCP_HEADERS, **c.auth})
                except httpx2.HTTPError:
                    return  # the gateway is gone
                answers.append(r)
                if r.status_code == 200 and r.headers.get("X-Mcpmeter-Billed", "0") != "0":
                    if sum(1 for a in answers if a.headers.get("X-Mcpmeter-Billed", "0") != "0") >= SIGNAL_AFTER:
                        billed.set()
                elif r.status_code != 200:
                    assert r.status_code == 503 and refusal(r)["error"] == "gateway_stopping", r.text
                    await asyncio.sleep(0.05)

    try:
        clients = [asyncio.ensure_future(client(n)) for n in range(CLIENTS)]
        await asyncio.wait_for(billed.wait(), 60)
        gw.proc.send_signal(signum)
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert await asyncio.to_thread(gw.proc.wait, 30) == 0
    finally:
        gw.stop()
    log = gw.log()
    # (mitmproxy itself logs a CancelledError for each client connection still open when its loop ends.)
    assert "settling" not in log and "could not settle" not in log and "mcpmeter: stopping" not in log, log[-3000:]

    delivered = {r.headers["X-Mcpmeter-Request-Id"]: int(r.headers["X-Mcpmeter-Billed"])
                 for r in answers if r.status_code == 200 and r.headers.get("X-Mcpmeter-Billed", "0") != "0"}
    assert len(delivered) >= SIGNAL_AFTER
    usage = {u["request_id"]: u for u in backend.usage(c)}
    missing = set(delivered) - set(usage)
    assert not missing, f"{len(missing)} of {len(delivered)} billed answers have no usage row"
    assert all(usage[rid]["billed"] == amount for rid, amount in delivered.items())
    assert backend.query("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")[0][0] == 0
    # Every debit is either a billed usage row or refunded, and the balance says the same.
    billed_total = sum(u["billed"] for u in usage.values())
    assert backend.balance(c.user_id) == 100_000_000 - billed_total
    assert billed_total >= sum(delivered.values())


async def test_a_script_reload_with_calls_in_flight_bills_their_answers(backend: Backend, fault_url: str,
                                                                        tmp_path: Path) -> None:
    """mitmproxy reloads the -s script when it changes: the calls in flight are answered after it, through
    the meter loaded then, and billed as usual (before: passed on unmetered, then refunded)."""
    s = slug("reload")
    backend.add_listing(s, fault_url + "/mcp", price=1000, rpm=100_000, rpd=1_000_000)
    c = backend.add_consumer(credit=100_000)
    script = tmp_path / "script" / "mcpmeter_addon.py"
    script.parent.mkdir()
    shutil.copy(ROOT / "mcpmeter_addon.py", script)
    gw = start_gateway(backend.config(), tmp_path, env={**backend.env(), "PYTHONPATH": str(ROOT)}, script=script)
    try:
        async with httpx2.AsyncClient(timeout=30) as http:
            calls = [asyncio.ensure_future(http.post(
                f"{gw.url}/{s}", content=json.dumps(call("slow", {"seconds": 4}, rpc_id=n)).encode(),
                headers={**MCP_HEADERS, **c.auth})) for n in range(3)]
            await asyncio.sleep(0.5)
            rewrite(script, script.read_text() + "\n# changed: mitmproxy reloads the script\n")
            await asyncio.to_thread(wait_for, lambda: gw.log().count("Loading script") >= 2, 10)
            answers = await asyncio.gather(*calls)
        assert gw.proc.poll() is None
    finally:
        gw.stop()
    assert gw.log().count("Loading script") == 2
    assert [(r.status_code, r.headers.get("X-Mcpmeter-Billed")) for r in answers] == [(200, "1000")] * 3
    usage = {u["request_id"]: u["billed"] for u in backend.usage(c)}
    assert usage == {r.headers["X-Mcpmeter-Request-Id"]: 1000 for r in answers}
    assert backend.query("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")[0][0] == 0
    assert backend.balance(c.user_id) == 100_000 - 3 * 1000
