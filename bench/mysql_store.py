"""The MySQL store's per-call cost alone: the Ledger's statement-by-statement transactions on a worker
thread against the one-round-trip texts (addon/store/mysql_trip.py) on the event loop
(mysql_loop.py), one connection each, in interleaved rounds.

    .venv/bin/python -m bench.mysql_store [--calls 150] [--rounds 10] [--rtt-ms 0.5]

Each round runs `calls` paid calls (charge, then settle as billed) through the store's async
interface, once the Ledger's way and once the one-trip way, and measures per call: the wall time
(p50 of the round), this process's CPU (the gateway's share: the driver, the thread hop if any,
the store), mariadbd's CPU (read from /proc: it includes any other client of the server, hence the
minimum over rounds), and the session's own counters (statements, commits), which are exact.
Needs the test MariaDB (tests/dbutil.py: a scratch database, dropped at the end). With --rtt-ms,
the store reaches the server through a relay process that delays each packet by half that each
way, like a database on another host (wall times then matter; CPU figures include no relay).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import socket
import threading
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from addon.model import Verdict
from addon.store.sql import SqlStore
from tests.dbutil import SCHEMA, scratch_database
from tests.test_store_contract import MysqlBackend, _prepare, add_consumer, add_listing, call, outcome

COUNTERS = ("Questions", "Com_commit", "Com_rollback")


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    try:
        while data := src.recv(65536):
            time.sleep(delay)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _relay(listener: socket.socket, target: tuple[str, int], delay: float) -> None:
    """Forward each connection to `target`, every chunk `delay` seconds late (a process of its own)."""
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(target)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pipe, args=(client, server, delay), daemon=True).start()
        threading.Thread(target=_pipe, args=(server, client, delay), daemon=True).start()


def mariadbd_cpu() -> float:
    """CPU seconds the database server has used, summed over its processes."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in ("mariadbd", "mysqld"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:  # the process went away
            continue
    return total


async def measure(calls: int, rounds: int, rtt_ms: float) -> dict[str, list[dict[str, float]]]:
    with scratch_database(SCHEMA) as settings:
        relay: multiprocessing.Process | None = None
        store_settings = replace(settings, pool_size=1)
        if rtt_ms > 0:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            relay = multiprocessing.Process(target=_relay, daemon=True,
                                            args=(listener, (settings.host, settings.port), rtt_ms / 2000))
            relay.start()
            store_settings = replace(store_settings, host="127.0.0.1", port=listener.getsockname()[1])
        db = MysqlBackend(settings)
        db.store.close()
        db.store = db._cls(replace(db.config, mysql=store_settings))
        db.stores = [db.store]
        try:
            _prepare(db)
            who = add_consumer(db, 1, credit=10**15)
            add_listing(db, 10, "bench", price=1000)
            store = db.store
            await store.balance(who.user_id)  # opens the worker's one connection (the Ledger's way)
            await store._hot.run(lambda conn: conn.ping())  # type: ignore[attr-defined]  # the loop's (one-trip)

            async def counters() -> dict[str, int]:
                """The session counters of both connections, summed."""
                total = dict.fromkeys(COUNTERS, 0)
                query = f"SHOW SESSION STATUS WHERE Variable_name IN {tuple(COUNTERS)}"
                rows: list[Any] = []
                for conn in store._conns:  # type: ignore[attr-defined]
                    cur = conn.cursor()
                    cur.execute(query)
                    rows += cur.fetchall()
                for conn in store._hot.open:  # type: ignore[attr-defined]
                    cur = await conn.cursor()
                    await cur.execute(query)
                    rows += await cur.fetchall()
                for k, v in rows:
                    total[str(k)] += int(v)
                return total

            ways: dict[str, tuple[Callable[[Any], Awaitable[Any]], Callable[[Any], Awaitable[Any]]]] = {
                "ledger": (lambda r: SqlStore.charge(store, r), lambda s: SqlStore.settle(store, s)),  # type: ignore[arg-type]
                "one-trip": (store.charge, store.settle),
            }
            results: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
            for _ in range(rounds):
                for way, (charge, settle) in ways.items():
                    before, cpu0, server0 = await counters(), time.process_time(), mariadbd_cpu()
                    walls = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        req = call(who, 10, 1000)
                        taken = await charge(req)
                        assert taken.verdict is Verdict.DEBITED, taken
                        await settle(dataclasses.replace(outcome(req, who), taken=taken, need_balance=False))
                        walls.append(time.perf_counter() - t0)
                    cpu, server, after = time.process_time() - cpu0, mariadbd_cpu() - server0, await counters()
                    row = {"wall_p50_ms": statistics.median(walls) * 1e3, "client_cpu_ms": cpu / calls * 1e3,
                           "mariadbd_cpu_ms": server / calls * 1e3}
                    # SHOW STATUS is itself a question: one per connection falls inside the window.
                    row.update({k: (after[k] - before[k] - 2 * (k == "Questions")) / calls for k in COUNTERS})
                    results[way].append(row)
            return results
        finally:
            db.close()
            if relay is not None:
                relay.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="simulated network round trip to the database")
    args = parser.parse_args()
    results = asyncio.run(measure(args.calls, args.rounds, args.rtt_ms))
    print(f"{args.rounds} interleaved rounds of {args.calls} paid calls (charge + settle), per call"
          + (f", {args.rtt_ms} ms simulated RTT to the database:" if args.rtt_ms else ":"))
    for way, rows in results.items():
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        timing = "  ".join(f"{k} min {min(v):.3f} median {statistics.median(v):.3f}"
                           for k, v in cols.items() if k.endswith("_ms"))
        exact = "  ".join(f"{k} {cols[k][-1]:.1f}" for k in COUNTERS)
        print(f"  {way:9s} {timing}  |  {exact}")


if __name__ == "__main__":
    main()
