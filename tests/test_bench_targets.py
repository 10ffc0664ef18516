"""The benchmark's PASS/MISS table: each issue #8 target judged from the figures of one run."""

from __future__ import annotations

from typing import Any

from bench.run import targets


def run(rps: float, p50: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"rps": rps, "latency_ms": {"p50": p50}, "proxy_cpu_ms_per_req": cpu, "requests": int(rps),
            "elapsed_s": 1.0, **extra}


def scenario(lo: dict[str, Any], hi: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"status": "ok", "runs": {"1": lo, "32": hi}, **extra}


def result(prod_rps: float, prod_p50: float, prod_cpu: float, mariadb: float, redis_bytes: tuple[int, int],
           embedded_rps: float = 850, background: float = 0.0,
           wallets: tuple[float, float, float, float] = (900, 2.4, 1.6, 0.05)) -> dict[str, Any]:
    """`wallets`: gateway-wallets' req/s at c=32, p50 at c=1, CPU ms per call at c=32 and MariaDB's."""
    snaps = [{"calls": calls, "bytes_per_pair": b / 32} for calls, b in zip((100, 1000), redis_bytes, strict=True)]
    w_rps, w_p50, w_cpu, w_mariadb = wallets
    return {
        "scenarios": {
            "bare": scenario(run(500, 2.0, 1.5), run(1000, 30.0, 1.4)),
            "gateway-embedded": scenario(run(400, 2.4, 1.8), run(embedded_rps, 35.0, 1.7)),
            "gateway-production": scenario(
                run(300, prod_p50, 2.5), run(prod_rps, 60.0, prod_cpu,
                                             backend_cpu_ms_per_req={"mariadbd": mariadb, "redis-server": 0.1}),
                background_cpu_ms_per_s={"mariadbd": background}),
            "gateway-production-x2": {"status": "skipped", "reason": "no"},
            "gateway-wallets": scenario(
                run(400, w_p50, 2.0), run(w_rps, 40.0, w_cpu,
                                          backend_cpu_ms_per_req={"mariadbd": w_mariadb, "redis-server": 0.2}),
                background_cpu_ms_per_s={"mariadbd": background}),
            "gateway-wallets-x2": scenario(run(400, 2.5, 2.0), run(w_rps * 1.5, 45.0, w_cpu)),
            "gateway-wallets-x2-nginx": {"status": "skipped", "reason": "nginx not installed"},
        },
        "redis_pairs": {"status": "ok", "snapshots": snaps, "growth": redis_bytes[1] / redis_bytes[0]},
    }


def by_label(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in rows}


def test_every_target_passes_at_its_bound_and_the_stretch_is_judged_apart() -> None:
    rows = by_label(targets(result(prod_rps=700, prod_p50=2.9, prod_cpu=1.9, mariadb=0.3, redis_bytes=(7000, 7000)),
                            [1, 32]))
    assert rows["production req/s at c=32 / bare"]["value"] == 0.7
    assert (rows["production req/s at c=32 / bare"]["verdict"],
            rows["production req/s at c=32 / bare"]["stretch_verdict"]) == ("PASS", "MISS")
    assert (rows["production p50 at c=1 - bare"]["value"], rows["production p50 at c=1 - bare"]["verdict"],
            rows["production p50 at c=1 - bare"]["stretch_verdict"]) == (0.9, "PASS", "MISS")
    assert rows["embedded req/s at c=32 / bare"]["verdict"] == "PASS"
    assert (rows["production gateway CPU per paid call - bare (c=32)"]["value"],
            rows["production gateway CPU per paid call - bare (c=32)"]["verdict"]) == (0.5, "PASS")
    assert rows["MariaDB CPU per paid call (production, c=32)"]["verdict"] == "PASS"
    assert rows["Redis bytes per (listing, consumer) pair, 10N / N calls"]["verdict"] == "PASS"
    assert rows["embedded p50 at c=1 - bare"]["verdict"] == "info"
    assert rows["production-x2 req/s at c=32 / production"]["verdict"] == "gateway-production-x2 skipped"
    assert rows["nginx + production-x2 req/s at c=32 / production"]["verdict"] == "gateway-production-x2-nginx not run"


def test_the_wallet_targets_mirror_the_production_ones_on_gateway_wallets() -> None:
    rows = by_label(targets(result(prod_rps=700, prod_p50=2.9, prod_cpu=1.9, mariadb=0.3, redis_bytes=(7000, 7000),
                                   wallets=(900, 2.4, 1.6, 0.05)), [1, 32]))
    judged = {label: (r["value"], r["verdict"], r["stretch_verdict"]) for label, r in rows.items()
              if label.startswith("wallets")}
    assert judged == {
        "wallets req/s at c=32 / bare": (0.9, "PASS", "PASS"),
        "wallets p50 at c=1 - bare": (0.4, "PASS", "PASS"),
        "wallets gateway CPU per paid call - bare (c=32)": (0.2, "PASS", None),
        "wallets MariaDB CPU per paid call (c=32)": (0.05, "PASS", None),
        "wallets-x2 req/s at c=32 / wallets": (1.5, "info", None),
        "wallets nginx + x2 req/s at c=32 / wallets": (None, "gateway-wallets-x2-nginx skipped",
                                                       "gateway-wallets-x2-nginx skipped"),
    }
    # The production rows stay, judged on gateway-production alone.
    assert rows["production req/s at c=32 / bare"]["value"] == 0.7


def test_the_wallet_targets_miss_past_the_same_bounds() -> None:
    rows = by_label(targets(result(prod_rps=700, prod_p50=2.9, prod_cpu=1.9, mariadb=0.3, redis_bytes=(7000, 7000),
                                   wallets=(590, 3.1, 2.1, 0.31)), [1, 32]))
    assert {label: r["verdict"] for label, r in rows.items() if label.startswith("wallets") and r["op"]} == {
        "wallets req/s at c=32 / bare": "MISS", "wallets p50 at c=1 - bare": "MISS",
        "wallets gateway CPU per paid call - bare (c=32)": "MISS", "wallets MariaDB CPU per paid call (c=32)": "MISS"}
    # Between the bound and the stretch: PASS, stretch MISS.
    mid = by_label(targets(result(700, 2.9, 1.9, 0.3, (7000, 7000), wallets=(700, 2.7, 1.6, 0.05)), [1, 32]))
    assert [(mid[x]["verdict"], mid[x]["stretch_verdict"]) for x in
            ("wallets req/s at c=32 / bare", "wallets p50 at c=1 - bare")] == [("PASS", "MISS"), ("PASS", "MISS")]


def test_a_wallet_scenario_not_run_leaves_its_targets_unjudged() -> None:
    res = result(prod_rps=700, prod_p50=2.9, prod_cpu=1.9, mariadb=0.3, redis_bytes=(7000, 7000))
    del res["scenarios"]["gateway-wallets"]
    rows = by_label(targets(res, [1, 32]))
    assert rows["wallets req/s at c=32 / bare"]["verdict"] == "gateway-wallets not run"
    assert rows["wallets req/s at c=32 / bare"]["value"] is None
    assert rows["wallets-x2 req/s at c=32 / wallets"]["verdict"] == "gateway-wallets not run"  # its base


def test_each_target_misses_past_its_bound() -> None:
    rows = targets(result(prod_rps=590, prod_p50=3.1, prod_cpu=2.1, mariadb=0.31, redis_bytes=(7000, 9000),
                          embedded_rps=790, background=100.0), [1, 32])
    judged = {r["label"]: r["verdict"] for r in rows if r["op"] is not None and not r["label"].startswith("wallets")}
    assert judged == dict.fromkeys(judged, "MISS") and len(judged) == 6
    db = by_label(rows)["MariaDB CPU per paid call (production, c=32)"]
    assert "net of the 100 ms/s" in db["note"]  # other clients' load, shown beside the figure
