"""The gateway's own endpoints under hostile input: /health is public, so anonymous clients must not
be able to fill the store's queue (the one charges wait in) with probes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.test_gateway_hooks import Gw, gw, isolated, make_flow  # noqa: F401  (fixtures)


async def test_concurrent_health_requests_share_one_probe_of_the_store(gw: Gw) -> None:
    store, probes = gw.addon.store, []
    real = store.health

    async def counted() -> dict[str, Any]:
        probes.append(1)
        await asyncio.sleep(0.05)
        return dict(await real())

    store.health = counted
    flows = [make_flow("/health", token=None, method="GET") for _ in range(50)]
    await asyncio.gather(*(gw.addon.request(flow) for flow in flows))
    assert len(probes) == 1
    assert {json.loads(flow.response.content)["status"] for flow in flows} == {"ok"}
    again = make_flow("/health", token=None, method="GET")  # the probe is over: the next one reads afresh
    await gw.addon.request(again)
    assert len(probes) == 2 and again.response.status_code == 200


async def test_a_hung_store_probe_is_not_started_again_by_every_health_request(gw: Gw) -> None:
    store, probes, release = gw.addon.store, [], asyncio.Event()

    async def hung() -> dict[str, Any]:
        probes.append(1)
        await release.wait()
        return {"ok": True}

    store.health = hung
    for _ in range(2):  # each waits its second, then reports the store down; one probe in all
        flow = make_flow("/health", token=None, method="GET")
        await gw.addon.request(flow)
        assert flow.response.status_code == 503
        assert json.loads(flow.response.content)["store"] == {"ok": False}
    assert len(probes) == 1
    release.set()
    await asyncio.sleep(0.01)  # the probe ends and is forgotten
    flow = make_flow("/health", token=None, method="GET")
    await gw.addon.request(flow)
    assert flow.response.status_code == 200 and len(probes) == 2


async def test_a_probe_running_too_long_is_given_up_for_a_new_one(gw: Gw, monkeypatch: Any) -> None:
    from addon import endpoints
    monkeypatch.setattr(endpoints, "HEALTH_WAIT", 0.05)
    monkeypatch.setattr(endpoints, "PROBE_ABANDONED", 0.1)
    started: list[asyncio.Task[Any] | None] = []

    async def hung() -> dict[str, Any]:
        started.append(asyncio.current_task())
        await asyncio.Event().wait()
        return {"ok": True}

    gw.addon.store.health = hung
    for _ in range(3):  # 0.05 s each: the third comes after the first probe was given up
        await gw.addon.request(make_flow("/health", token=None, method="GET"))
    await asyncio.sleep(0)
    assert len(started) == 2 and started[0] is not None and started[0].cancelled()


async def test_a_health_request_waiting_on_a_probe_given_up_still_gets_its_answer(gw: Gw, monkeypatch: Any) -> None:
    """A probe is given up (cancelled) when it runs too long or a reload replaces the store; a /health
    request waiting on it then got CancelledError out of its hook, which mitmproxy does not catch: the
    hook never completed and the request hung until its connection timed out. It reports the store
    down instead, at once."""
    from addon import endpoints
    monkeypatch.setattr(endpoints, "HEALTH_WAIT", 5.0)
    monkeypatch.setattr(endpoints, "PROBE_ABANDONED", 0.05)
    calls: list[int] = []

    async def hung_then_fine() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()
        return {"ok": True}

    gw.addon.store.health = hung_then_fine
    first = make_flow("/health", token=None, method="GET")
    waiting = asyncio.ensure_future(gw.addon.request(first))
    await asyncio.sleep(0.1)  # its probe is past PROBE_ABANDONED: the next request gives it up
    second = make_flow("/health", token=None, method="GET")
    await gw.addon.request(second)
    await asyncio.wait_for(waiting, timeout=1)
    assert second.response.status_code == 200
    assert first.response is not None and first.response.status_code == 503
    assert json.loads(first.response.content)["store"] == {"ok": False}
