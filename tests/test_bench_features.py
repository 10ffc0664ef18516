"""bench/features.py measures the gateway's real code paths: it must keep running as the code moves."""

from __future__ import annotations

from bench import features


async def test_every_feature_is_timed_on_a_real_paid_call() -> None:
    figures = await features.measure(n=20)
    assert set(figures) >= {"metrics", "circuit", "idempotency", "receipt-json", "receipt-sse"}
    assert all(us > 0 for us in figures.values()), figures
    report = features.report(figures)
    assert "JSON answer" in report and "SSE answer" in report and ("PASS" in report or "MISS" in report)
