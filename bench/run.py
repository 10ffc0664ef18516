"""Benchmark the meter against bare mitmproxy, on one machine, in one run.

    .venv/bin/python -m bench.run [--quick] [--duration S] [--out FILE] [--compare OLD.json] [--answer sse]
    .venv/bin/python -m bench.run --memory [N]
    .venv/bin/python -m bench.run --compare OLD.json NEW.json     # compare two runs, run nothing

Starts a trivial JSON-RPC upstream (bench/upstream.py; it answers with a JSON body, or with
--answer sse an event stream of one message, as MCP SDK servers answer by default), then for each scenario the process
under test on a free loopback port, warms it up, and drives it with the load generator
(bench/loadgen.py, a separate process) at concurrency 1 and 32 for a fixed time each:

  direct              the load generator talks to the upstream itself (the floor)
  bare                `mitmdump --mode reverse:<upstream>`, no addon
  gateway-embedded    `mitmdump -s mcpmeter_addon.py`, SQLite store + in-process cache
  gateway-production  the same on MySQL + Redis (a scratch database and Redis key prefix,
                      both removed at the end); skipped, saying why, when unavailable
  gateway-production-x2
                      two such gateway processes sharing one database and one Redis prefix
                      (scaling past one core: N processes behind a load balancer); the load
                      generator spreads its connections over both, round-robin (so at c=1 only
                      the first carries traffic). Its CPU ms/req sums both processes.
  gateway-production-x2-nginx
                      the README's scale-out recipe as written: nginx (deploy/nginx.conf, Debian's
                      nginx) in front of two such gateways, the load generator talking to nginx
                      only; skipped, saying why, without nginx. nginx's CPU is reported beside the
                      database servers'.
  gateway-wallets, gateway-wallets-x2, gateway-wallets-x2-nginx
                      the three above with the wallet store on (MCPMETER_WALLETS=1): credit held in
                      bulk from MySQL into Redis wallets, each paid call spent by one Redis script,
                      settled calls written to MySQL in batches (addon/store/wallets.py).

Every request is a paid JSON-RPC tools/call (1000 µ¢) by a consumer with ample credit, and
rate limits far above what one core can send. After each gateway scenario the ledger is
checked: every debit has its usage ledger row, every refund its refund row, every call is
settled, and every balance equals the sum of its ledger. With wallets (checked once the gateways
stopped, having drained their queues) a call has no debit row of its own: its hold's row is the
debit. There usage_events must bill exactly the billed answers the load generator saw, every billed
call be a journal row with its hold and not refunded, each hold's spent be what its calls cost and
spent + returned stay within what it granted, and balances still equal their ledgers. The table
(requests/s, latency percentiles, CPU ms per request of the proxy process from /proc) is printed,
then one more measurement and the targets of issue #8 with PASS/MISS for each (the production
ones again for gateway-wallets), and everything is written as JSON.

Redis memory per (listing, consumer) pair: one production gateway, 4 listings x 8 consumers
(32 pairs, one connection each), N calls (--redis-calls, default 500, --quick 200) and then 9N
more; after each, the bytes of every key under the run's Redis prefix (MEMORY USAGE). Rate
limiting keeps one GCRA TAT per window per pair, so bytes per pair must not grow with calls.
The listings' day window (10,000 calls) keeps its TAT key alive for >= 8.6 s after a pair's last
call; the minute window's (1,000,000 calls) lapses within 60 µs, so both snapshots hold the same
kinds of keys.

With two or more CPUs the proxy under test is pinned to one CPU and the load generator,
upstream and the local MariaDB and Redis servers (their threads, for the run; then put back) to
the others (--no-pin to disable), so that "one core" means one core. A run in which
other processes (or the hypervisor) took more than 5 % of the proxy's CPU is flagged as noisy.
gateway-production-x2 pins its first gateway to the first CPU and its second to the second
(--no-pin: neither); the load generator, upstream and database servers share those CPUs, so on
a 2-CPU machine its figure understates what two dedicated cores would give. Its runs also say
where the CPUs' time went (gateways, load generator, upstream, database servers, the rest).

--memory [N] instead sends N calls (default 100,000) through gateway-embedded at c=32 and
reports the proxy's RSS after a warm-up and at the end (target: growth <= 20 MB).

MySQL and Redis for gateway-production: MCPMETER_BENCH_MYSQL_HOST/_PORT/_USER/_PASSWORD (else
the tests' MCPMETER_TEST_MYSQL_*, else root@127.0.0.1:3306) and MCPMETER_BENCH_REDIS_HOST/_PORT/_DB
(else 127.0.0.1:6379 db 2). The gateway's own DB_* / REDIS_* variables are never read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import features

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = BIN / "mitmdump"
PYTHON = sys.executable
ADDON = ROOT / "mcpmeter_addon.py"
SCHEMA = ROOT / "schema.sql"

SLUG = "bench"
TOOL = "echo"
PRICE = 1000  # µ¢ per tools/call
KEY = "mcpm_test_bench0123456789abcdef"
CREDIT = 10**15  # µ¢: enough for any run
LIMIT = 1_000_000_000  # rpm / rpd: far above what one core can send (fits MySQL's int unsigned)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
STARTUP_TIMEOUT = 30.0
WALLETS = ("gateway-wallets", "gateway-wallets-x2", "gateway-wallets-x2-nginx")  # the production ones + wallets
SCENARIOS = ("direct", "bare", "gateway-embedded", "gateway-production", "gateway-production-x2",
             "gateway-production-x2-nginx", *WALLETS)


@dataclass(frozen=True)
class Target:
    """One line of the PASS/MISS table. metric: rps_ratio (req/s at the top concurrency / bare's),
    p50_delta (p50 at the lowest concurrency - bare's, ms), cpu_delta (the gateway's CPU ms per
    call at the top concurrency - bare's), db_cpu (MariaDB's CPU ms per call there), redis_growth
    (Redis bytes per pair after 10N calls / after N), scaling (req/s / `base`'s: information)."""

    label: str
    scenario: str
    metric: str
    op: str | None = None  # ">=" | "<=" | None (information only)
    bound: float | None = None
    stretch: float | None = None
    base: str = "bare"


# The targets of issue #8, all as figures of one run.
TARGETS = (
    Target("production req/s at c=32 / bare", "gateway-production", "rps_ratio", ">=", 0.6, 0.85),
    Target("production p50 at c=1 - bare", "gateway-production", "p50_delta", "<=", 1.0, 0.5),
    Target("embedded req/s at c=32 / bare", "gateway-embedded", "rps_ratio", ">=", 0.8),
    Target("production gateway CPU per paid call - bare (c=32)", "gateway-production", "cpu_delta", "<=", 0.6),
    Target("MariaDB CPU per paid call (production, c=32)", "gateway-production", "db_cpu", "<=", 0.3),
    Target("Redis bytes per (listing, consumer) pair, 10N / N calls", "redis-pairs", "redis_growth", "<=", 1.05),
    Target("embedded p50 at c=1 - bare", "gateway-embedded", "p50_delta"),
    Target("production-x2 req/s at c=32 / production", "gateway-production-x2", "scaling",
           base="gateway-production"),
    Target("nginx + production-x2 req/s at c=32 / production", "gateway-production-x2-nginx", "scaling",
           base="gateway-production"),
    # The same on the wallet store (MCPMETER_WALLETS=1): MySQL off the per-call path.
    Target("wallets req/s at c=32 / bare", "gateway-wallets", "rps_ratio", ">=", 0.6, 0.85),
    Target("wallets p50 at c=1 - bare", "gateway-wallets", "p50_delta", "<=", 1.0, 0.5),
    Target("wallets gateway CPU per paid call - bare (c=32)", "gateway-wallets", "cpu_delta", "<=", 0.6),
    Target("wallets MariaDB CPU per paid call (c=32)", "gateway-wallets", "db_cpu", "<=", 0.3),
    Target("wallets-x2 req/s at c=32 / wallets", "gateway-wallets-x2", "scaling", base="gateway-wallets"),
    Target("wallets nginx + x2 req/s at c=32 / wallets", "gateway-wallets-x2-nginx", "scaling",
           base="gateway-wallets"),
)
MEMORY_GROWTH_TARGET_MB = 20.0
DB_SERVERS = ("mariadbd", "mysqld")
REDIS_LISTINGS, REDIS_CONSUMERS = 4, 8  # 32 (listing, consumer) pairs, one connection each at c=32
REDIS_RPM, REDIS_RPD = 1_000_000, 10_000  # see the module docstring: the day window's key outlives a run


class Skip(Exception):
    """A scenario that cannot run here; its row says why."""


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    port: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """Every child the benchmark starts; all of them are stopped on exit, whatever happens."""

    def __init__(self, proxy_cpus: set[int] | None) -> None:
        self.procs: list[Proc] = []
        self.proxy_cpus = proxy_cpus

    def start(self, name: str, cmd: list[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None, pin_proxy: bool = False, stdout_pipe: bool = False,
              cpus: set[int] | None = None) -> Proc:
        """`cpus` pins the process there; else `pin_proxy` pins it to the proxy's CPU (if pinning)."""
        cpus = cpus or (self.proxy_cpus if pin_proxy else None)
        out: Any = subprocess.PIPE if stdout_pipe else (log_path.open("wb") if log_path else subprocess.DEVNULL)
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT if log_path or stdout_pipe else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        if log_path and not stdout_pipe:
            out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10.0) -> None:
        if proc.popen.poll() is None:
            proc.popen.terminate()
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_times(cpus: set[int]) -> tuple[float, float]:
    """(busy, steal) seconds summed over `cpus` since boot, from /proc/stat."""
    busy = steal = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                if int(parts[0][3:]) in cpus:
                    user, nice, system, _idle, _iowait, irq, softirq, st = (int(x) for x in parts[1:9])
                    busy += user + nice + system + irq + softirq
                    steal += st
    return busy / CLK_TCK, steal / CLK_TCK


BACKEND_SERVERS = ("mariadbd", "mysqld", "redis-server")


def backend_pids() -> dict[str, list[int]]:
    """The local database and cache servers' processes, by name (their CPU is the production row's too)."""
    found: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
            if comm in BACKEND_SERVERS:
                found.setdefault(comm, []).append(int(entry))
    return found


@contextlib.contextmanager
def backends_pinned(cpus: set[int] | None) -> Iterator[int]:
    """MariaDB's and Redis's threads kept off the proxy's CPU for the run (then put back as they were):
    they are system services the benchmark does not start, and left free they ran on the proxy's CPU,
    taking it from the proxy under test (bare mitmproxy has no database to share its core with). Their
    threads started meanwhile (one per MariaDB connection) inherit it from the thread that makes them."""
    saved: dict[int, set[int]] = {}
    if cpus:
        for ids in backend_pids().values():
            for pid in ids:
                with contextlib.suppress(OSError):
                    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                        with contextlib.suppress(OSError):
                            before = os.sched_getaffinity(tid)
                            os.sched_setaffinity(tid, cpus)  # EPERM without the right to: not counted
                            saved[tid] = before
    try:
        yield len(saved)  # threads pinned (0: none, e.g. without the right to)
    finally:
        restore = next(iter(saved.values()), None)
        for ids in backend_pids().values():
            for pid in ids:
                with contextlib.suppress(OSError):
                    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                        with contextlib.suppress(OSError):
                            if tid in saved or restore is not None:
                                os.sched_setaffinity(tid, saved.get(tid, restore or set()))


def backend_cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ids in pids.items():
        total = 0.0
        for pid in ids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        out[name] = total
    return out


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the gateway's own variables (they would override the YAML), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "MCPMETER_"))}
    env.update(extra or {})
    return env


def wait_http(url_host: str, port: int, method: str, path: str, ok: Callable[[int], bool], proc: Proc,
              body: bytes | None = None, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            conn = http.client.HTTPConnection(url_host, port, timeout=2)
            conn.request(method, path, body=body, headers=headers or {})
            status = conn.getresponse().status
            conn.close()
            if ok(status):
                return
            last = f"status {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not become ready ({last}):\n{proc.log_tail()}")


# --- the pieces of a scenario -------------------------------------------------------------------


def upstream_stats(port: int) -> dict[str, int]:
    """The upstream's counters: connections accepted and POSTs answered since it started."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/__stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_upstream(procs: Processes, answer: str = "json") -> tuple[Proc, int]:
    sse = ["--sse"] if answer == "sse" else []
    proc = procs.start("upstream", [PYTHON, "-m", "bench.upstream", "--port", "0", *sse], cwd=ROOT, stdout_pipe=True)
    assert proc.popen.stdout is not None
    ready, _, _ = select.select([proc.popen.stdout], [], [], STARTUP_TIMEOUT)
    line = proc.popen.stdout.readline().decode() if ready else ""
    if not line.startswith("READY "):
        raise RuntimeError(f"the bench upstream did not start: {line!r}")
    proc.port = int(line.split()[1])
    return proc, proc.port


def bare_command(upstream_port: int, port: int) -> list[str]:
    return [str(MITMDUMP), "-q", "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port)]


def gateway_command(upstream_port: int, port: int, config_path: Path) -> list[str]:
    return [str(MITMDUMP), "-q", "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:{upstream_port}",
            "--listen-host", "127.0.0.1", "--listen-port", str(port), "--set", f"mcpmeter_config={config_path}"]


def gateway_config(upstream_port: int, **extra: Any) -> dict[str, Any]:
    return {"default_rpm": LIMIT, "default_rpd": LIMIT, "log_level": "warn", **extra}


def embedded_config(upstream_port: int, sqlite_path: Path) -> dict[str, Any]:
    return gateway_config(upstream_port, store="sqlite", cache="memory", sqlite_path=str(sqlite_path), seed={
        "listings": [{
            "slug": SLUG, "upstream_url": f"http://127.0.0.1:{upstream_port}/mcp", "status": "live",
            "transport": "streamable", "price_micro_cents": PRICE, "free_calls_per_consumer": 0,
            "rate_limit_per_minute": LIMIT, "rate_limit_per_day": LIMIT, "upstream_timeout_seconds": 30,
        }],
        "consumers": [{"key": KEY, "user_id": 1, "project_id": 1, "credit_micro_cents": CREDIT}],
    })


def start_gateway(procs: Processes, workdir: Path, name: str, upstream_port: int, config: dict[str, Any],
                  env: dict[str, str] | None = None, cpus: set[int] | None = None) -> tuple[Proc, int]:
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = procs.start(name, gateway_command(upstream_port, port, config_path), log_path=workdir / f"{name}.log",
                       env=clean_env(env), cwd=workdir, pin_proxy=True, cpus=cpus)
    wait_http("127.0.0.1", port, "GET", "/health", lambda s: s == 200, proc)
    return proc, port


def start_bare(procs: Processes, workdir: Path, upstream_port: int) -> tuple[Proc, int]:
    port = free_port()
    proc = procs.start("bare", bare_command(upstream_port, port), log_path=workdir / "bare.log",
                       env=clean_env(), cwd=workdir, pin_proxy=True)
    wait_http("127.0.0.1", port, "POST", "/mcp", lambda s: s == 200, proc, body=b'{"id":0}',
              headers={"Content-Type": "application/json"})
    return proc, port


def loadgen(url: str | Sequence[str], concurrency: int, duration: float, max_requests: int, *,
            key: str | Sequence[str] = KEY, sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the load generator to completion (bounded by its own duration and count) and parse its JSON.

    Several URLs: its connections are spread over them round-robin; several keys: over those too
    (see bench/loadgen.py)."""
    urls = [url] if isinstance(url, str) else list(url)
    keys = [key] if isinstance(key, str) else list(key)
    cmd = [PYTHON, "-m", "bench.loadgen", *(a for u in urls for a in ("--url", u)), "-c", str(concurrency),
           "-d", str(duration), "-n", str(max_requests), *(a for k in keys for a in ("--key", k)), "--tool", TOOL]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as p:
        hard_deadline = time.monotonic() + duration + 60
        try:
            while p.poll() is None:
                if time.monotonic() > hard_deadline:
                    p.kill()
                    raise RuntimeError("the load generator overran its time bound")
                if sample is not None:
                    sample()
                try:
                    p.wait(1.0 if sample is not None else 0.5)
                except subprocess.TimeoutExpired:
                    pass
            out, err = p.communicate()
        finally:
            if p.poll() is None:
                p.kill()
    if p.returncode not in (0, 1) or not out.strip():
        raise RuntimeError(f"the load generator failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    result = json.loads(out)
    if "fatal" in result:
        raise RuntimeError(f"the load generator failed: {result['fatal']}")
    return result


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (the load generator, once it has finished)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(url: str | Sequence[str], concurrency: int, duration: float, max_requests: int,
            pid: int | Sequence[int], upstream: tuple[int, int], key: str, proxy_cpus: set[int] | None,
            backends: dict[str, list[int]] | None = None, whole_machine: set[int] | None = None) -> dict[str, Any]:
    """One measured run: the load generator's numbers plus the CPU the process(es) under test spent on them.

    With the proxy pinned, also how busy others kept its CPU meanwhile (other processes, and the
    hypervisor's steal): a noisy neighbour there makes the run's numbers unreliable.
    Several proxy processes: their CPU is summed. `whole_machine` (the CPUs everything runs on):
    also where those CPUs' time went, and the noise is what none of the benchmark's own processes
    account for there.
    """
    pids = [pid] if isinstance(pid, int) else list(pid)
    upstream_pid, upstream_port = upstream
    watch = whole_machine or proxy_cpus
    stats0 = upstream_stats(upstream_port)
    t0, up0 = time.monotonic(), cpu_seconds(upstream_pid)
    cpu0 = [cpu_seconds(p) for p in pids]
    busy0, steal0 = cpu_times(watch) if watch else (0.0, 0.0)
    back0 = backend_cpu(backends or {})
    kids0, self0 = _children_cpu(), _self_cpu()
    result = loadgen(url, concurrency, duration, max_requests, key=key)
    each = [cpu_seconds(p) - c0 for p, c0 in zip(pids, cpu0, strict=True)]
    cpu, up1 = sum(each), cpu_seconds(upstream_pid)
    busy1, steal1 = cpu_times(watch) if watch else (0.0, 0.0)
    back = {name: spent - back0.get(name, 0.0) for name, spent in backend_cpu(backends or {}).items()}
    load_cpu, self_cpu = _children_cpu() - kids0, _self_cpu() - self0
    wall = time.monotonic() - t0
    stats1 = upstream_stats(upstream_port)
    # A proxy that reuses its upstream connections opens at most one per client connection.
    result["upstream_connections_opened"] = stats1["connections"] - stats0["connections"] - 1
    result["upstream_requests"] = stats1["requests"] - stats0["requests"]
    done = max(int(result["requests"]), 1)
    result["proxy_cpu_s"] = round(cpu, 3)
    result["proxy_cpu_ms_per_req"] = round(cpu * 1000 / done, 4)
    result["proxy_cpu_utilisation"] = round(cpu / result["elapsed_s"], 3)
    rss = [rss_mb(p) for p in pids]
    result["proxy_rss_mb"] = _round(sum(r or 0 for r in rss), 1) if all(r is not None for r in rss) else None
    if len(pids) > 1:
        result["proxy_processes"] = len(pids)
        result["proxy_cpu_s_each"] = [round(c, 3) for c in each]
        result["proxy_rss_mb_each"] = [_round(r, 1) for r in rss]
    result["upstream_cpu_ms_per_req"] = round((up1 - up0) * 1000 / done, 4)
    result["loadgen_cpu_ms_per_req"] = round(load_cpu * 1000 / done, 4)
    if back:
        result["backend_cpu_ms_per_req"] = {name: round(spent * 1000 / done, 4) for name, spent in back.items()}
    if whole_machine:
        # Everything the benchmark runs shares these CPUs: account for their time, in cores (1.0 = one CPU busy).
        own = {"gateways": cpu, "load generator": load_cpu, "upstream": up1 - up0, **back, "bench driver": self_cpu}
        others = busy1 - busy0 - sum(own.values())
        result["cpu_accounting"] = {
            "cpus": len(whole_machine), "wall_s": round(wall, 3), "busy_cores": round((busy1 - busy0) / wall, 3),
            **{name: round(spent / wall, 3) for name, spent in own.items()},
            "others": round(max(0.0, others) / wall, 3), "steal": round((steal1 - steal0) / wall, 3),
        }
        result["others_on_proxy_cpu"] = result["cpu_accounting"]["others"]
        result["steal_on_proxy_cpu"] = result["cpu_accounting"]["steal"]
    elif proxy_cpus and pids != [upstream_pid]:
        # The database servers may run on the proxy's CPU too; that is the scenario's own cost, not noise.
        others = busy1 - busy0 - cpu - sum(back.values())
        result["others_on_proxy_cpu"] = round(max(0.0, others) / wall, 3)
        result["steal_on_proxy_cpu"] = round((steal1 - steal0) / wall, 3)
    return result


# --- the ledger check ------------------------------------------------------------------------------


def check_ledger(query: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]],
                 billed_responses: int) -> dict[str, Any]:
    """Every debit has its ledger row, every refund too, every call is settled, balances reconcile (I1, I4)."""

    def one(sql: str) -> int:
        return int(query(sql, ())[0][0] or 0)

    debited = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE verdict = 'debited'")
    usage_rows = one("SELECT COUNT(*) FROM credit_transactions WHERE type = 'usage'")
    usage_with_call = one("SELECT COUNT(*) FROM credit_transactions t JOIN mcpmeter_calls c"
                          " ON c.request_id = t.request_id WHERE t.type = 'usage' AND c.verdict = 'debited'")
    refunded_calls = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE verdict = 'debited' AND refunded = 1")
    refund_rows = one("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'")
    unsettled = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")
    settled = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NOT NULL")
    usage_events = one("SELECT COUNT(*) FROM usage_events")
    unreconciled = [
        (int(u), int(b), int(s)) for u, b, s in query(
            "SELECT u.id, u.credit_micro_cents, COALESCE(SUM(t.amount_micro_cents), 0) FROM users u"
            " LEFT JOIN credit_transactions t ON t.user_id = u.id GROUP BY u.id, u.credit_micro_cents", ())
        if int(b) != int(s)
    ]
    problems = []
    if debited != usage_rows or usage_with_call != debited:
        problems.append(f"{debited} debits but {usage_rows} usage ledger rows ({usage_with_call} matching)")
    if refunded_calls != refund_rows:
        problems.append(f"{refunded_calls} refunded calls but {refund_rows} refund ledger rows")
    if unsettled:
        problems.append(f"{unsettled} calls unsettled")
    if usage_events != settled:
        problems.append(f"{settled} settled calls but {usage_events} usage_events rows")
    if unreconciled:
        problems.append(f"balance != sum of ledger for (user, balance, ledger): {unreconciled[:5]}")
    if billed_responses > debited - refunded_calls:
        problems.append(f"{billed_responses} responses said billed but only {debited - refunded_calls} debits stand")
    return {"ok": not problems, "problems": problems, "debited": debited, "usage_ledger_rows": usage_rows,
            "refunded": refunded_calls, "refund_ledger_rows": refund_rows, "unsettled": unsettled,
            "usage_events": usage_events, "billed_responses": billed_responses}


Query = Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]


def ledger_check(query: Query, billed_responses: int, wallets: bool = False) -> dict[str, Any]:
    """The journal's check, or with `wallets` the wallet store's."""
    return check_wallet_ledger(query, billed_responses) if wallets else check_ledger(query, billed_responses)


def check_wallet_ledger(query: Query, billed_responses: int, price: int = PRICE) -> dict[str, Any]:
    """The ledger after a wallet run (the gateways stopped, so their queued settlements are written).

    A call spent from a wallet has no debit row of its own: its hold's ledger row (type 'adjustment',
    reference_type 'mcpmeter_hold', -granted) is the debit, and the call is a mcpmeter_calls row with
    hold_id plus its usage_events row. Checked: I1 (every balance == the sum of its ledger, the opening
    top-up being a ledger row); usage_events bill exactly the answers the load generator saw billed;
    every billed call is a non-refunded wallet call and vice versa; each hold has its one debit row,
    spent == what its non-refunded calls cost, and spent + returned (+ rest once settled) within granted
    (== once settled); no call went the per-call way (the bench's listing has no free tier, a price > 0)."""

    def one(sql: str) -> int:
        return int(query(sql, ())[0][0] or 0)

    holds = one("SELECT COUNT(*) FROM mcpmeter_holds")
    wallet_calls = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE hold_id IS NOT NULL")
    per_call = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE hold_id IS NULL AND verdict = 'debited'")
    refunded = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE hold_id IS NOT NULL AND refunded = 1")
    # A call recorded after its hold settled (or beyond it: a stale wallet) is refunded by the hold's rest,
    # without a refund row of its own.
    refund_due = one("SELECT COUNT(*) FROM mcpmeter_calls"
                     " WHERE refunded = 1 AND COALESCE(reason, '') NOT IN ('hold_settled', 'hold_overdrawn')")
    refund_rows = one("SELECT COUNT(*) FROM credit_transactions WHERE type = 'refund'")
    unsettled = one("SELECT COUNT(*) FROM mcpmeter_calls WHERE settled_at IS NULL")
    usage_events = one("SELECT COUNT(*) FROM usage_events")
    billed_micro_cents = one("SELECT SUM(billed_micro_cents) FROM usage_events")
    without_event = one("SELECT COUNT(*) FROM mcpmeter_calls c WHERE NOT EXISTS"
                        " (SELECT 1 FROM usage_events u WHERE u.request_id = c.request_id)")
    billed_not_wallet = one(
        "SELECT COUNT(*) FROM usage_events u WHERE u.billed_micro_cents > 0 AND NOT EXISTS (SELECT 1 FROM"
        " mcpmeter_calls c WHERE c.request_id = u.request_id AND c.hold_id IS NOT NULL AND c.refunded = 0)")
    kept_unbilled = one(
        "SELECT COUNT(*) FROM mcpmeter_calls c JOIN usage_events u ON u.request_id = c.request_id"
        " WHERE c.hold_id IS NOT NULL AND c.refunded = 0 AND u.billed_micro_cents <> c.amount_micro_cents")
    unreconciled = [
        (int(u), int(b), int(s)) for u, b, s in query(
            "SELECT u.id, u.credit_micro_cents, COALESCE(SUM(t.amount_micro_cents), 0) FROM users u"
            " LEFT JOIN credit_transactions t ON t.user_id = u.id GROUP BY u.id, u.credit_micro_cents", ())
        if int(b) != int(s)
    ]
    # Per hold: (id, granted, spent, returned, rest, settled, cost of its non-refunded calls, debit rows, debited).
    bad_holds = [
        tuple(int(x) if x is not None else None for x in row) for row in query(
            "SELECT h.id, h.granted_micro_cents, h.spent_micro_cents, h.returned_micro_cents, h.rest_micro_cents,"
            " h.settled_at IS NOT NULL,"
            " (SELECT COALESCE(SUM(c.amount_micro_cents), 0) FROM mcpmeter_calls c"
            "   WHERE c.hold_id = h.id AND c.refunded = 0),"
            " (SELECT COUNT(*) FROM credit_transactions t WHERE t.reference_type = 'mcpmeter_hold'"
            "   AND t.reference_id = h.id AND t.amount_micro_cents < 0),"
            " (SELECT COALESCE(SUM(t.amount_micro_cents), 0) FROM credit_transactions t"
            "   WHERE t.reference_type = 'mcpmeter_hold' AND t.reference_id = h.id AND t.amount_micro_cents < 0)"
            " FROM mcpmeter_holds h ORDER BY h.id", ())
        if not _hold_ok(*row)
    ]
    problems = []
    if unreconciled:
        problems.append(f"balance != sum of ledger for (user, balance, ledger): {unreconciled[:5]}")
    if billed_micro_cents != billed_responses * price:
        problems.append(f"usage_events billed {billed_micro_cents} µ¢ but the load generator saw {billed_responses}"
                        f" billed answers x {price} µ¢ = {billed_responses * price} µ¢")
    if billed_not_wallet:
        problems.append(f"{billed_not_wallet} billed usage_events without a non-refunded wallet call (hold_id)")
    if kept_unbilled:
        problems.append(f"{kept_unbilled} non-refunded wallet calls whose usage_events row bills another amount")
    if refund_due != refund_rows:
        problems.append(f"{refund_due} refunded calls but {refund_rows} refund ledger rows")
    if unsettled:
        problems.append(f"{unsettled} calls unsettled")
    if without_event or usage_events != wallet_calls + per_call:
        problems.append(f"{wallet_calls + per_call} calls but {usage_events} usage_events rows"
                        f" ({without_event} calls without theirs)")
    if per_call:
        problems.append(f"{per_call} calls charged one by one, not from a wallet (is wallets on? a free tier?)")
    if billed_responses and not holds:
        problems.append(f"{billed_responses} billed answers but no hold")
    if bad_holds:
        problems.append("holds not adding up (id, granted, spent, returned, rest, settled, cost of its calls,"
                        f" debit rows, debited): {bad_holds[:5]}")
    return {"ok": not problems, "problems": problems, "kind": "wallets", "holds": holds,
            "wallet_calls": wallet_calls, "per_call_debits": per_call, "refunded": refunded,
            "refund_ledger_rows": refund_rows, "unsettled": unsettled, "usage_events": usage_events,
            "billed_micro_cents": billed_micro_cents, "billed_responses": billed_responses}


def _hold_ok(hold: int, granted: int, spent: int, returned: int, rest: int | None, settled: int, cost: int,
             debit_rows: int, debited: int) -> bool:
    """One hold: its one debit row of -granted, spent == its calls' cost, nothing back beyond granted."""
    back = spent + returned + (rest or 0)
    return (debit_rows == 1 and debited == -granted and spent == cost and spent >= 0 and returned >= 0
            and (back == granted if settled else back <= granted))


def ledger_detail(lg: dict[str, Any]) -> str:
    """The counts a ledger check's line shows."""
    if lg.get("kind") == "wallets":
        return (f"{lg['holds']} holds, {lg['wallet_calls']} wallet calls ({lg['refunded']} refunded),"
                f" {lg['per_call_debits']} per-call debits, {lg['unsettled']} unsettled,"
                f" {lg['billed_micro_cents']} µ¢ billed, {lg['billed_responses']} billed responses")
    return (f"{lg['debited']} debits, {lg['usage_ledger_rows']} usage ledger rows, {lg['refunded']} refunds,"
            f" {lg['unsettled']} unsettled, {lg['billed_responses']} billed responses")


def sqlite_query(path: Path) -> Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]]:
    def query(sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(path, timeout=10)
        try:
            return conn.execute(sql.replace("%s", "?"), args).fetchall()
        finally:
            conn.close()

    return query


# --- production backends: MySQL + Redis ----------------------------------------------------------------


def _env(*names: str, default: str) -> str:
    for name in names:
        if os.environ.get(name) is not None:
            return os.environ[name]
    return default


@contextlib.contextmanager
def production_backend() -> Iterator[dict[str, Any]]:
    """A scratch MySQL database loaded from schema.sql and a unique Redis prefix; both removed on exit.

    The servers are those the tests use: MCPMETER_BENCH_MYSQL_HOST/_PORT/_USER/_PASSWORD, else
    MCPMETER_TEST_MYSQL_*, else 127.0.0.1:3306 as root; MCPMETER_BENCH_REDIS_HOST/_PORT/_DB, else
    127.0.0.1:6379 db 2. The gateway's own DB_* and REDIS_* are deliberately not read.
    """
    for module, what in (("addon.store.mysql", "the MySQL store"), ("addon.cache.redis", "the Redis cache")):
        try:
            __import__(module)
        except ImportError as e:
            raise Skip(f"{what} is not available ({module}: {e})") from None
    try:
        import pymysql
        import redis
    except ImportError as e:
        raise Skip(f"client library missing: {e}") from None
    my = {
        "host": _env("MCPMETER_BENCH_MYSQL_HOST", "MCPMETER_TEST_MYSQL_HOST", default="127.0.0.1"),
        "port": int(_env("MCPMETER_BENCH_MYSQL_PORT", "MCPMETER_TEST_MYSQL_PORT", default="3306")),
        "user": _env("MCPMETER_BENCH_MYSQL_USER", "MCPMETER_TEST_MYSQL_USER", default="root"),
        "password": _env("MCPMETER_BENCH_MYSQL_PASSWORD", "MCPMETER_TEST_MYSQL_PASSWORD", default=""),
    }
    rd = {
        "host": _env("MCPMETER_BENCH_REDIS_HOST", default="127.0.0.1"),
        "port": int(_env("MCPMETER_BENCH_REDIS_PORT", default="6379")),
        "db": int(_env("MCPMETER_BENCH_REDIS_DB", default="2")),
    }
    try:
        r = redis.Redis(socket_connect_timeout=2, socket_timeout=5, **rd)
        r.ping()
    except redis.RedisError as e:
        raise Skip(f"Redis not reachable at {rd['host']}:{rd['port']} ({e})") from None

    def connect(database: str | None = None) -> Any:
        return pymysql.connect(host=my["host"], port=my["port"], user=my["user"], password=my["password"],
                               database=database, charset="utf8mb4", autocommit=True, connect_timeout=2,
                               init_command="SET time_zone = '+00:00'")

    try:
        admin = connect()
    except pymysql.Error as e:
        r.close()
        raise Skip(f"MySQL not reachable at {my['host']}:{my['port']} as {my['user']!r} ({e})") from None
    token = f"{os.getpid()}_{secrets.token_hex(4)}"
    database = f"mcpmeter_bench_{token}"
    prefix = f"mcpmeter-bench:{token}:"
    conn = None
    try:
        admin.cursor().execute(f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
        conn = connect(database)
        cur = conn.cursor()
        for statement in split_sql(SCHEMA.read_text()):
            cur.execute(statement)

        def query(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            c = conn.cursor()
            c.execute(sql, args)
            return list(c.fetchall())

        def execute(sql: str, args: tuple[Any, ...] = ()) -> int:
            c = conn.cursor()
            c.execute(sql, args)
            return int(c.lastrowid or 0)

        yield {"mysql": my, "redis": rd, "database": database, "prefix": prefix, "query": query,
               "execute": execute, "redis_client": r}
    finally:
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.close()
        with contextlib.suppress(Exception):
            admin.close()
            admin = connect()
            admin.cursor().execute(f"DROP DATABASE IF EXISTS `{database}`")
            admin.close()
        with contextlib.suppress(Exception):
            keys = list(r.scan_iter(match=prefix.replace("*", r"\*") + "*", count=1000))
            for i in range(0, len(keys), 500):
                r.delete(*keys[i:i + 500])
            r.close()


def split_sql(text: str) -> list[str]:
    """The statements of a schema dump: `--` comment lines dropped, split at `;` ending a line."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE) if s.strip()]


def seed_production(db: dict[str, Any], upstream_port: int) -> str:
    """The listing and the consumer, inserted by plain SQL as the reference's web app writes them.

    No free tier and a price above 0: with wallets on, every call is then spent from a wallet (a free
    tier or a zero price would send it through the per-call procedure instead)."""
    assert PRICE > 0
    rows = _rows(db)
    rows.add_listing(SLUG, f"http://127.0.0.1:{upstream_port}/mcp", price=PRICE, free=0, rpm=LIMIT, rpd=LIMIT,
                     timeout=30)
    return rows.add_consumer(credit=CREDIT).key


def _rows(db: dict[str, Any]) -> Any:
    """tests.backends' plain-SQL writer on the scratch database of `db`."""
    from tests.backends import Backend

    class Rows(Backend):
        kind = "mysql"

        def execute(self, sql: str, args: tuple[Any, ...] = ()) -> int:
            return int(db["execute"](sql, args))

        def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            return db["query"](sql, args)

    return Rows()


# --- scenarios ------------------------------------------------------------------------------------


@dataclass
class Settings:
    duration: float
    warmup: float
    concurrencies: tuple[int, ...]
    max_requests: int
    scenarios: tuple[str, ...]
    proxy_cpus: set[int] | None
    load_cpus: set[int] | None
    backends_pinned: bool = False  # MariaDB's and Redis's threads run on load_cpus (backends_pinned)


@dataclass
class Scenario:
    name: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    warmup: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    rss_mb: dict[str, float | None] = field(default_factory=dict)
    placement: str | None = None  # where its processes ran, when that differs from the others
    # CPU ms per second the database servers spent just before the runs: other clients' load (noise).
    background_cpu_ms_per_s: dict[str, float] | None = None
    per_gateway_calls: list[int] | None = None  # paid calls each gateway settled, from its /metrics

    def to_json(self) -> dict[str, Any]:
        out = {"status": self.status, "reason": self.reason, "runs": self.runs, "warmup": self.warmup,
               "ledger": self.ledger, "rss_mb": self.rss_mb}
        if self.placement:
            out["placement"] = self.placement
        if self.background_cpu_ms_per_s is not None:
            out["background_cpu_ms_per_s"] = self.background_cpu_ms_per_s
        if self.per_gateway_calls is not None:
            out["per_gateway_calls"] = self.per_gateway_calls
        return out


def drive(sc: Scenario, s: Settings, url: str | Sequence[str], proxy: Proc | Sequence[Proc] | None, upstream: Proc,
          key: str = KEY, backends: dict[str, list[int]] | None = None,
          whole_machine: set[int] | None = None) -> None:
    """Warm up, then one measured run per concurrency (several proxies: URLs round-robin, CPU and RSS summed)."""
    proxies = [] if proxy is None else [proxy] if isinstance(proxy, Proc) else list(proxy)

    def rss_total() -> float | None:
        sizes = [rss_mb(p.pid) for p in proxies]
        return None if any(x is None for x in sizes) else _round(sum(sizes), 1)  # type: ignore[arg-type]

    sc.warmup = loadgen(url, max(s.concurrencies), s.warmup, s.max_requests, key=key)
    if proxies:
        sc.rss_mb["after_warmup"] = rss_total()
    pids = [p.pid for p in proxies] or [upstream.pid]
    for c in s.concurrencies:
        sc.runs[str(c)] = measure(url, c, s.duration, s.max_requests, pids[0] if len(pids) == 1 else pids,
                                  (upstream.pid, upstream.port or 0), key, s.proxy_cpus, backends, whole_machine)
        if sc.runs[str(c)]["ok"] == 0:
            raise RuntimeError(f"no successful request at c={c}: {sc.runs[str(c)]['error_kinds']}")
    if proxies:
        sc.rss_mb["end"] = rss_total()


def billed_responses(sc: Scenario) -> int:
    results = [sc.warmup, *sc.runs.values()]
    return sum(int((r or {}).get("billed", {}).get(str(PRICE), 0)) for r in results)


def run_scenario(name: str, s: Settings, procs: Processes, workdir: Path, upstream: Proc,
                 upstream_port: int) -> Scenario:
    sc = Scenario(name)
    proxy: Proc | None = None
    try:
        if name == "direct":
            drive(sc, s, f"http://127.0.0.1:{upstream_port}/mcp", None, upstream)
        elif name == "bare":
            proxy, port = start_bare(procs, workdir, upstream_port)
            drive(sc, s, f"http://127.0.0.1:{port}/mcp", proxy, upstream)
        elif name == "gateway-embedded":
            db_path = workdir / "embedded.db"
            proxy, port = start_gateway(procs, workdir, name, upstream_port, embedded_config(upstream_port, db_path))
            drive(sc, s, f"http://127.0.0.1:{port}/{SLUG}", proxy, upstream)
            procs.stop(proxy)
            sc.ledger = check_ledger(sqlite_query(db_path), billed_responses(sc))
        elif name in ("gateway-production", "gateway-wallets"):
            run_production(sc, s, procs, workdir, upstream, upstream_port, wallets=name in WALLETS)
        elif name in ("gateway-production-x2", "gateway-wallets-x2"):
            run_production_x2(sc, s, procs, workdir, upstream, upstream_port, wallets=name in WALLETS)
        elif name in ("gateway-production-x2-nginx", "gateway-wallets-x2-nginx"):
            run_production_x2(sc, s, procs, workdir, upstream, upstream_port, via_nginx=True, wallets=name in WALLETS)
        else:
            raise ValueError(name)
    except Skip as e:
        sc.status, sc.reason = "skipped", str(e)
    except Exception as e:
        sc.status, sc.reason = "failed", f"{type(e).__name__}: {e}"
    finally:
        if proxy is not None:
            procs.stop(proxy)
    return sc


def run_production(sc: Scenario, s: Settings, procs: Processes, workdir: Path, upstream: Proc,
                   upstream_port: int, wallets: bool = False) -> None:
    """One gateway on MySQL + Redis (`wallets`: with the wallet store), then the ledger checked."""
    proxy: Proc | None = None
    with production_backend() as db:
        key = seed_production(db, upstream_port)
        try:
            proxy, port = start_gateway(procs, workdir, sc.name, upstream_port,
                                        gateway_config(upstream_port), production_env(db, wallets))
            servers = backend_pids()
            sc.background_cpu_ms_per_s = background_cpu(servers)
            drive(sc, s, f"http://127.0.0.1:{port}/{SLUG}", proxy, upstream, key, servers)
        finally:
            if proxy is not None:
                procs.stop(proxy)  # before its database is dropped; it drains its settlements first
        sc.ledger = ledger_check(db["query"], billed_responses(sc), wallets)


def production_env(db: dict[str, Any], wallets: bool = False) -> dict[str, str]:
    """The environment that points a gateway at the scratch database and Redis prefix of `db`
    (`wallets`: with the wallet store on, addon/store/wallets.py)."""
    return {
        "MCPMETER_STORE": "mysql", "MCPMETER_CACHE": "redis",
        "DB_HOST": db["mysql"]["host"], "DB_PORT": str(db["mysql"]["port"]),
        "DB_USER": db["mysql"]["user"], "DB_PASSWORD": db["mysql"]["password"],
        "DB_NAME": db["database"], "REDIS_HOST": db["redis"]["host"],
        "REDIS_PORT": str(db["redis"]["port"]), "REDIS_DB": str(db["redis"]["db"]),
        "MCPMETER_REDIS_PREFIX": db["prefix"],
        **({"MCPMETER_WALLETS": "1"} if wallets else {}),
    }


def x2_placement(s: Settings) -> tuple[set[int] | None, set[int] | None, str]:
    """The CPUs of gateways A and B in gateway-production-x2, and a sentence saying where everything ran."""
    databases = f"on CPU {sorted(s.load_cpus or [])}" if s.backends_pinned else "on any CPU"
    where = (f"the load generator and upstream run on CPU {sorted(s.load_cpus)}, MariaDB and Redis {databases}"
             if s.load_cpus else "the load generator, upstream, MariaDB and Redis run on any CPU")
    sharing = "gateway B's core" if s.backends_pinned else "the gateways' cores"
    shared = f"{where}: they share {sharing}, so this figure understates what two dedicated cores give"
    if s.proxy_cpus and s.load_cpus:
        a, b = min(s.proxy_cpus), min(s.load_cpus)
        return {a}, {b}, f"gateway A pinned to CPU {a}, gateway B to CPU {b}; {shared}"
    return None, None, f"gateways A and B not pinned; {shared}"


def run_production_x2(sc: Scenario, s: Settings, procs: Processes, workdir: Path, upstream: Proc,
                      upstream_port: int, via_nginx: bool = False, wallets: bool = False) -> None:
    """Two gateway processes on one database and one Redis prefix, the load spread over both:
    by the load generator itself, or (`via_nginx`) by nginx running deploy/nginx.conf
    (`wallets`: both with the wallet store on)."""
    from bench import nginx

    cpus_a, cpus_b, sc.placement = x2_placement(s)
    if via_nginx:
        try:
            nginx.binary()
        except nginx.NginxMissing as e:
            raise Skip(str(e)) from None
        sc.placement += "; nginx (deploy/nginx.conf, worker_processes auto) on any CPU"
    machine = set(os.sched_getaffinity(0)) | (s.proxy_cpus or set())
    gateways: list[Proc] = []
    ports: list[int] = []
    lb: nginx.Nginx | None = None
    with production_backend() as db:
        key = seed_production(db, upstream_port)
        env = production_env(db, wallets)
        # /metrics open on loopback, to count each gateway's calls behind nginx.
        config = gateway_config(upstream_port, metrics_public=True) if via_nginx else gateway_config(upstream_port)
        try:
            for label, cpus in (("a", cpus_a), ("b", cpus_b)):
                proc, port = start_gateway(procs, workdir, f"{sc.name}-{label}", upstream_port, config, env, cpus=cpus)
                gateways.append(proc)
                ports.append(port)
            urls: str | list[str] = [f"http://127.0.0.1:{p}/{SLUG}" for p in ports]
            servers = backend_pids()
            if via_nginx:
                lb = nginx.start([f"127.0.0.1:{p}" for p in ports], workdir / "nginx")
                urls, servers = f"{lb.url}/{SLUG}", {**servers, "nginx": lb.pids()}
            drive(sc, s, urls, gateways, upstream, key, servers, whole_machine=machine)
            if via_nginx:
                sc.per_gateway_calls = [billed_calls(p) for p in ports]
        finally:
            if lb is not None:
                lb.stop()
            for proc in gateways:
                procs.stop(proc)  # before their database is dropped
        sc.ledger = ledger_check(db["query"], billed_responses(sc), wallets)


def billed_calls(port: int) -> int:
    """Paid calls the gateway on `port` settled as billed, from its /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("mcpmeter_calls_total{") and 'decision="billed"' in line))


def background_cpu(servers: dict[str, list[int]], seconds: float = 1.0) -> dict[str, float]:
    """CPU ms per second the servers spend while the benchmark sends nothing: other clients' load."""
    before = backend_cpu(servers)
    time.sleep(seconds)
    after = backend_cpu(servers)
    return {name: round((after[name] - before.get(name, 0.0)) * 1000 / seconds, 1) for name in after}


# --- Redis memory per (listing, consumer) pair -----------------------------------------------------


def redis_footprint(client: Any, prefix: str) -> dict[str, Any]:
    """Every key under `prefix`: how many, by kind (`rl`, `key`, `mcp`, ...), and their bytes (MEMORY USAGE)."""
    keys = list(client.scan_iter(match=prefix.replace("*", r"\*") + "*", count=1000))
    kinds: dict[str, int] = {}
    total = 0
    for k in keys:
        name = k.decode() if isinstance(k, bytes) else k
        kind = name[len(prefix):].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
        total += int(client.memory_usage(k, samples=0) or 0)  # a key that lapsed meanwhile counts 0
    return {"keys": len(keys), "by_kind": kinds, "bytes": total}


def run_redis_pairs(calls: int, s: Settings, procs: Processes, workdir: Path, upstream_port: int) -> dict[str, Any]:
    """N calls over 32 (listing, consumer) pairs, then 9N more: Redis bytes per pair after each."""
    pairs = REDIS_LISTINGS * REDIS_CONSUMERS
    if (calls * 10) // pairs >= REDIS_RPD:
        raise ValueError(f"--redis-calls {calls}: more than the day window of {REDIS_RPD} calls per pair")
    proxy: Proc | None = None
    with production_backend() as db:
        rows = _rows(db)
        slugs = [f"{SLUG}-{i}" for i in range(REDIS_LISTINGS)]
        for slug in slugs:
            rows.add_listing(slug, f"http://127.0.0.1:{upstream_port}/mcp", price=PRICE, rpm=REDIS_RPM,
                             rpd=REDIS_RPD, timeout=30)
        keys = [rows.add_consumer(credit=CREDIT).key for _ in range(REDIS_CONSUMERS)]
        try:
            proxy, port = start_gateway(procs, workdir, "gateway-redis-pairs", upstream_port,
                                        gateway_config(upstream_port), production_env(db))
            urls = [f"http://127.0.0.1:{port}/{slug}" for slug in slugs]
            snapshots, billed, done = [], 0, 0
            for target in (calls, calls * 10):
                # Bounded in count, and in time by a floor of 50 calls/s.
                r = loadgen(urls, pairs, max(30.0, (target - done) / 50), target - done, key=keys)
                if r["ok"] != target - done:
                    raise RuntimeError(f"{target - done - r['ok']} of {target - done} calls failed: {r['error_kinds']}")
                done = target
                billed += int(r["billed"].get(str(PRICE), 0))
                snapshots.append({"calls": done, **redis_footprint(db["redis_client"], db["prefix"])})
        finally:
            if proxy is not None:
                procs.stop(proxy)  # before its database is dropped
        ledger = check_ledger(db["query"], billed)
    for snap in snapshots:
        snap["bytes_per_pair"] = round(snap["bytes"] / pairs, 1)
    first, last = snapshots
    growth = last["bytes"] / first["bytes"] if first["bytes"] else None
    return {"pairs": pairs, "listings": REDIS_LISTINGS, "consumers": REDIS_CONSUMERS, "snapshots": snapshots,
            "growth": _round(growth, 3), "ledger": ledger}


def redis_pairs_step(calls: int, s: Settings, procs: Processes, workdir: Path, upstream_port: int) -> dict[str, Any]:
    """run_redis_pairs with its status: ok, skipped (no MySQL/Redis, or --redis-calls 0) or failed."""
    if calls <= 0:
        return {"status": "skipped", "reason": "--redis-calls 0"}
    print(f"  redis-pairs: {calls} then {calls * 10} calls in all ...", flush=True)
    try:
        return {"status": "ok", "reason": None, **run_redis_pairs(calls, s, procs, workdir, upstream_port)}
    except Skip as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {e}"}


# --- the targets --------------------------------------------------------------------------------------


def targets(result: dict[str, Any], concurrencies: tuple[int, ...] | list[int]) -> list[dict[str, Any]]:
    """The PASS/MISS table of issue #8 (and the informational lines), from one run's figures."""
    lo, hi = str(min(concurrencies)), str(max(concurrencies))
    scenarios = result.get("scenarios", {})
    out = []
    for t in TARGETS:
        label = t.label.replace("c=32", f"c={hi}").replace("c=1 ", f"c={lo} ")
        value: float | None = None
        note = ""
        noisy = False
        if t.metric == "redis_growth":
            rp = result.get("redis_pairs") or {}
            ok = rp.get("status") == "ok"
            missing = None if ok else f"redis-pairs {rp.get('status', 'not run')}"
            if ok:
                value = rp["growth"]
                a, b = rp["snapshots"]
                note = (f"{a['bytes_per_pair']:.0f} -> {b['bytes_per_pair']:.0f} B/pair"
                        f" ({a['calls']} -> {b['calls']} calls)")
        else:
            sc, base = scenarios.get(t.scenario, {}), scenarios.get(t.base, {})
            needs_base = t.metric in ("rps_ratio", "p50_delta", "cpu_delta", "scaling")
            missing = (f"{t.scenario} {sc.get('status', 'not run')}" if sc.get("status") != "ok" else
                       f"{t.base} {base.get('status', 'not run')}" if needs_base and base.get("status") != "ok"
                       else None)
            if missing is None:
                used = [sc] + ([base] if needs_base else [])
                noisy = any(_noisy(x["runs"].get(c)) for x in used for c in (lo, hi))
                if t.metric in ("rps_ratio", "scaling"):
                    value = sc["runs"][hi]["rps"] / base["runs"][hi]["rps"]
                elif t.metric == "p50_delta":
                    value = sc["runs"][lo]["latency_ms"]["p50"] - base["runs"][lo]["latency_ms"]["p50"]
                elif t.metric == "cpu_delta":
                    value = sc["runs"][hi]["proxy_cpu_ms_per_req"] - base["runs"][hi]["proxy_cpu_ms_per_req"]
                    note = (f"{sc['runs'][hi]['proxy_cpu_ms_per_req']:.3f} vs bare"
                            f" {base['runs'][hi]['proxy_cpu_ms_per_req']:.3f} ms")
                elif t.metric == "db_cpu":
                    spent = sc["runs"][hi].get("backend_cpu_ms_per_req", {})
                    found = [v for k, v in spent.items() if k in DB_SERVERS]
                    if not found:
                        missing = "no MariaDB/MySQL process found on this machine"
                    else:
                        value = sum(found)
                        bg = sum(v for k, v in (sc.get("background_cpu_ms_per_s") or {}).items() if k in DB_SERVERS)
                        net = value - bg / (sc["runs"][hi]["requests"] / sc["runs"][hi]["elapsed_s"])
                        noisy = noisy or bg > 50  # others kept MariaDB > 5 % of a core busy just before
                        note = ("MariaDB idle before the run" if not bg else
                                f"{net:.3f} net of the {bg:.0f} ms/s MariaDB spent before the run" if net > 0 else
                                f"other clients kept MariaDB busy before the run ({bg:.0f} ms/s): the figure"
                                f" counts their work too")
        if missing is not None:
            verdict = stretch_verdict = missing
        elif t.op is None:
            verdict, stretch_verdict = "info", None
        else:
            verdict = "PASS" if _meets(value, t.op, t.bound) else "MISS"
            stretch_verdict = None if t.stretch is None else "PASS" if _meets(value, t.op, t.stretch) else "MISS"
        out.append({"label": label, "scenario": t.scenario, "metric": t.metric, "value": _round(value, 3),
                    "op": t.op, "bound": t.bound, "stretch": t.stretch, "verdict": verdict,
                    "stretch_verdict": stretch_verdict, "note": note, "noisy": noisy})
    return out


def _noisy(run: dict[str, Any] | None) -> bool:
    """Other processes (or steal) took more than 5 % of the measured CPU during the run."""
    return bool(run) and run.get("others_on_proxy_cpu", 0) + run.get("steal_on_proxy_cpu", 0) > 0.05


def _meets(value: float | None, op: str | None, bound: float | None) -> bool:
    if value is None or bound is None:
        return False
    return value >= bound if op == ">=" else value <= bound


# --- memory mode -----------------------------------------------------------------------------------


def run_memory(n: int, warmup_calls: int, procs: Processes, workdir: Path, upstream: Proc,
               upstream_port: int) -> dict[str, Any]:
    """N calls through the embedded gateway at c=32; RSS after warm-up and at the end."""
    db_path = workdir / "memory.db"
    proxy, port = start_gateway(procs, workdir, "gateway-memory", upstream_port,
                                embedded_config(upstream_port, db_path))
    url = f"http://127.0.0.1:{port}/{SLUG}"
    try:
        started = rss_mb(proxy.pid)
        warm = loadgen(url, 32, 600, warmup_calls)
        after_warmup = rss_mb(proxy.pid)
        samples: list[tuple[float, float | None]] = []
        t0 = time.monotonic()

        def sample() -> None:
            samples.append((round(time.monotonic() - t0, 1), _round(rss_mb(proxy.pid), 1)))

        # Bounded in count by N and in time by a generous floor of 100 calls/s.
        main = loadgen(url, 32, max(60.0, n / 100), n, sample=sample)
        end = rss_mb(proxy.pid)
        procs.stop(proxy)
        ledger = check_ledger(sqlite_query(db_path), int(warm["billed"].get(str(PRICE), 0))
                              + int(main["billed"].get(str(PRICE), 0)))
    finally:
        procs.stop(proxy)
    peak = max([s[1] for s in samples if s[1] is not None] + [end or 0])
    growth = (end or 0) - (after_warmup or 0)
    # MB per second over the second half of the run, when warm-up effects are over.
    slope = _slope([(t, m) for t, m in samples[len(samples) // 2:] if m is not None])
    per_100k = None if slope is None or not main["rps"] else slope / main["rps"] * 100_000
    return {
        "calls": n, "warmup_calls": warmup_calls, "concurrency": 32,
        "ok": main["ok"], "errors": main["errors"], "error_kinds": main["error_kinds"], "rps": main["rps"],
        "elapsed_s": main["elapsed_s"], "latency_ms": main["latency_ms"],
        "rss_mb": {"start": _round(started, 1), "after_warmup": _round(after_warmup, 1), "end": _round(end, 1),
                   "peak": _round(peak, 1)},
        "growth_mb": _round(growth, 1), "target_mb": MEMORY_GROWTH_TARGET_MB,
        "trend_mb_per_100k_calls": _round(per_100k, 2),
        "verdict": "PASS" if growth <= MEMORY_GROWTH_TARGET_MB and main["ok"] == n else "MISS",
        "samples": samples, "ledger": ledger,
    }


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    return None if var == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / var


# --- output -------------------------------------------------------------------------------------------


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _pct(x: float | None) -> float | None:
    return None if x is None else x * 100


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(result: dict[str, Any]) -> None:
    print()
    header = f"{'scenario':<29}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}" \
             f"{'CPU ms/req':>12}{'CPU %':>7}{'errors':>8}"
    print(header)
    print("-" * len(header))
    for name, sc in result["scenarios"].items():
        if sc["status"] != "ok":
            print(f"{name:<29}  {sc['status']}: {sc['reason']}")
            continue
        for c, r in sc["runs"].items():
            lat = r["latency_ms"]
            cpu = r.get("proxy_cpu_ms_per_req")
            cpu_s = _f(cpu, ".3f") + ("*" if name == "direct" else " ")
            print(f"{name:<29}{c:>5}{r['rps']:>10.0f}{_f(lat['p50'], '.3f'):>9}{_f(lat['p90'], '.3f'):>9}"
                  f"{_f(lat['p99'], '.3f'):>9}{cpu_s:>12}{_f(_pct(r.get('proxy_cpu_utilisation')), '.0f'):>7}"
                  f"{r['errors']:>8}")
    print("  * direct: CPU of the upstream itself (there is no proxy).  CPU %: of one core, 100 = CPU-bound")
    for name, sc in result["scenarios"].items():
        if sc["status"] == "ok" and any(r.get("proxy_processes") for r in sc["runs"].values()):
            spread = ("nginx spreads the requests over both, round-robin" if name.endswith("-nginx")
                      else "at c=1 the one connection goes to gateway A only")
            print(f"  {name}: CPU ms/req and CPU % sum both gateway processes (200 % = both CPU-bound); {spread}")
            if sc.get("placement"):
                print(f"    {sc['placement']}")
            for c, r in sc["runs"].items():
                acct = r.get("cpu_accounting")
                if acct:
                    parts = ", ".join(f"{k} {v * 100:.0f}" for k, v in acct.items()
                                      if k not in ("cpus", "wall_s", "busy_cores"))
                    print(f"    c={c}: the {acct['cpus']} CPUs were {acct['busy_cores'] * 100:.0f} % busy"
                          f" (of one core): {parts}")
                if r.get("per_target"):
                    split = " / ".join(f"{t['rps']:.0f}" for t in r["per_target"])
                    print(f"    c={c}: req/s per gateway (A / B): {split}")
            if sc.get("per_gateway_calls"):
                split = " / ".join(str(n) for n in sc["per_gateway_calls"])
                print(f"    paid calls each gateway settled, warm-up and runs (A / B, from /metrics): {split}")
    for name, sc in result["scenarios"].items():
        for c, r in sc.get("runs", {}).items():
            if r.get("backend_cpu_ms_per_req"):
                spent = ", ".join(f"{k} {v:.3f}" for k, v in r["backend_cpu_ms_per_req"].items())
                print(f"  {name} c={c}: servers' CPU ms/req (not in the CPU column): {spent}")
        if sc.get("background_cpu_ms_per_s"):
            idle = ", ".join(f"{k} {v:.0f}" for k, v in sc["background_cpu_ms_per_s"].items())
            print(f"  {name}: the same servers' CPU ms per second in the second before (other clients): {idle}")
    noisy = [f"{name} c={c}: {r['others_on_proxy_cpu']:.0%} others, {r['steal_on_proxy_cpu']:.0%} steal"
             for name, sc in result["scenarios"].items() if sc["status"] == "ok"
             for c, r in sc["runs"].items() if r.get("others_on_proxy_cpu", 0) + r.get("steal_on_proxy_cpu", 0) > 0.05]
    if noisy:
        print("  ! the proxy's CPU was not quiet (numbers unreliable; rerun on an idle machine):")
        for line in noisy:
            print(f"      {line}")
    print()
    for name, sc in result["scenarios"].items():
        if sc.get("ledger"):
            lg = sc["ledger"]
            print(f"ledger {name}: {'OK' if lg['ok'] else 'FAIL'} ({ledger_detail(lg)})")
            for p in lg["problems"]:
                print(f"    {p}")

def print_redis_pairs(rp: dict[str, Any]) -> None:
    print()
    if rp["status"] != "ok":
        print(f"redis-pairs  {rp['status']}: {rp['reason']}")
        return
    print(f"redis-pairs: one production gateway, {rp['listings']} listings x {rp['consumers']} consumers"
          f" = {rp['pairs']} pairs, c={rp['pairs']}")
    for snap in rp["snapshots"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(snap["by_kind"].items()))
        print(f"  after {snap['calls']:>6} calls: {snap['keys']} keys ({kinds}), {snap['bytes']} bytes,"
              f" {snap['bytes_per_pair']:.0f} bytes per pair")
    lg = rp["ledger"]
    print(f"  ledger: {'OK' if lg['ok'] else 'FAIL'} ({lg['debited']} debits, {lg['usage_ledger_rows']} usage rows,"
          f" {lg['unsettled']} unsettled)")
    for p in lg["problems"]:
        print(f"    {p}")


_UNITS = {"p50_delta": " ms", "cpu_delta": " ms", "db_cpu": " ms"}


def print_targets(rows: list[dict[str, Any]]) -> None:
    """The PASS/MISS table: target, figure, verdict (and the stretch target's, where there is one)."""
    print()
    header = f"{'targets of issue #8 (one run)':<57}{'target':>10}{'figure':>12}  {'verdict':<8}{'stretch':<18}"
    print(header)
    print("-" * len(header))
    for r in rows:
        unit = _UNITS.get(r["metric"], "")
        signed = r["metric"] in ("p50_delta", "cpu_delta")
        value = "-" if r["value"] is None else f"{r['value']:{'+' if signed else ''}.3f}{unit}"
        target = "" if r["op"] is None else f"{r['op']} {'+' if signed else ''}{r['bound']:g}{unit}"
        stretch = "" if r["stretch"] is None else \
            f"{r['op']} {'+' if signed else ''}{r['stretch']:g}{unit}: {r['stretch_verdict']}"
        print(f"{r['label']:<57}{target:>10}{value:>12}  {r['verdict']:<8}{stretch:<18}"
              f"{'  (noisy run)' if r.get('noisy') else ''}")
        if r.get("note"):
            print(f"{'':<59}{r['note']}")
    if any(r.get("noisy") for r in rows):
        print("  (noisy run): other work took more than 5 % of a core beside what was measured (the proxy"
              " CPUs, or MariaDB's); the verdict may not hold on an idle machine")


def print_memory(m: dict[str, Any]) -> None:
    rss = m["rss_mb"]
    print()
    print(f"memory: {m['calls']} calls through gateway-embedded at c={m['concurrency']} "
          f"({m['ok']} ok, {m['errors']} errors, {m['rps']:.0f} req/s, {m['elapsed_s']:.0f} s)")
    print(f"  RSS MB: start {rss['start']}, after {m['warmup_calls']}-call warm-up {rss['after_warmup']},"
          f" end {rss['end']}, peak {rss['peak']}")
    print(f"  growth after warm-up: {m['growth_mb']:+.1f} MB (target <= {m['target_mb']:.0f} MB)  {m['verdict']}")
    if m.get("trend_mb_per_100k_calls") is not None:
        print(f"  trend over the second half of the run: {m['trend_mb_per_100k_calls']:+.2f} MB per 100,000 calls")
    lg = m["ledger"]
    print(f"  ledger: {'OK' if lg['ok'] else 'FAIL'} ({lg['debited']} debits, {lg['usage_ledger_rows']} usage rows,"
          f" {lg['unsettled']} unsettled)")
    for p in lg["problems"]:
        print(f"    {p}")


def compare(old: dict[str, Any], new: dict[str, Any]) -> None:
    print()
    print(f"compared with {old.get('started_at', '?')} (old -> new)")
    header = f"{'scenario':<29}{'conc':>5}  {'req/s':>22}  {'p50 ms':>26}  {'CPU ms/req':>22}"
    print(header)
    print("-" * len(header))
    for name, sc in new.get("scenarios", {}).items():
        osc = old.get("scenarios", {}).get(name)
        if sc.get("status") != "ok" or not osc or osc.get("status") != "ok":
            print(f"{name:<29}  not comparable (old: {osc and osc.get('status')}, new: {sc.get('status')})")
            continue
        for c, r in sc["runs"].items():
            o = osc["runs"].get(c)
            if o is None:
                continue
            print(f"{name:<29}{c:>5}  {_delta(o['rps'], r['rps'], '.0f', pct=True):>22}"
                  f"  {_delta(o['latency_ms']['p50'], r['latency_ms']['p50'], '.3f'):>26}"
                  f"  {_delta(o.get('proxy_cpu_ms_per_req'), r.get('proxy_cpu_ms_per_req'), '.3f'):>22}")
    # "ratios": the table of results written before the issue #8 targets.
    old_ratios = {r["label"]: r for r in old.get("targets", old.get("ratios", []))}
    for r in new.get("targets", new.get("ratios", [])):
        o = old_ratios.get(r["label"])
        if o is not None and o["value"] is not None and r["value"] is not None:
            print(f"{r['label']:<58}{o['value']:>8.3f} -> {r['value']:.3f}  ({o['verdict']} -> {r['verdict']})")
    if old.get("memory") and new.get("memory"):
        print(f"memory growth MB: {old['memory']['growth_mb']} -> {new['memory']['growth_mb']}")


def _delta(old: float | None, new: float | None, fmt: str, pct: bool = False) -> str:
    if old is None or new is None:
        return "-"
    d = new - old
    extra = f" ({d / old * 100:+.0f}%)" if pct and old else f" ({d:+{fmt}})"
    return f"{old:{fmt}} -> {new:{fmt}}{extra}"


def host_info(s: Settings | None) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import mitmproxy.version

        mitm = mitmproxy.version.VERSION
    except ImportError:
        mitm = None
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "mitmproxy": mitm,
            "kernel": platform.release(),
            "proxy_cpus": sorted(s.proxy_cpus) if s and s.proxy_cpus else None,
            "load_cpus": sorted(s.load_cpus) if s and s.load_cpus else None}


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5, --quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per scenario (default 2, --quick 0.5)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (1 s runs, 0.5 s warm-up)")
    p.add_argument("--concurrency", default="1,32", help="comma-separated concurrencies (default 1,32)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="cap on requests per run")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    p.add_argument("--memory", type=int, nargs="?", const=100_000, metavar="N",
                   help="instead: N calls (default 100000) through gateway-embedded, RSS growth after warm-up")
    p.add_argument("--memory-warmup", type=int, default=10_000, metavar="CALLS", help="warm-up calls of --memory")
    p.add_argument("--out", default="bench-results.json", help="where to write the JSON results")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: print deltas after this run; OLD.json NEW.json: compare two runs, run nothing")
    p.add_argument("--answer", choices=("json", "sse"), default="json",
                   help="how the upstream answers a call: a JSON body (default) or an event stream of one message")
    p.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load to separate CPUs")
    p.add_argument("--redis-calls", type=int, metavar="N",
                   help="Redis bytes per (listing, consumer) pair after N and 10N calls (default 500, --quick 200;"
                        " 0: skip)"),
    args = p.parse_args(argv)
    if args.compare and len(args.compare) > 2:
        p.error("--compare takes OLD.json, or OLD.json NEW.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare and len(args.compare) == 2:
        compare(json.loads(Path(args.compare[0]).read_text()), json.loads(Path(args.compare[1]).read_text()))
        return 0
    if not MITMDUMP.exists():
        print(f"mitmdump not found next to {PYTHON}", file=sys.stderr)
        return 2
    concurrencies = tuple(int(c) for c in args.concurrency.split(","))
    scenarios = tuple(x.strip() for x in args.scenarios.split(",") if x.strip())
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = load_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        proxy_cpus, load_cpus = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, load_cpus)  # this process, and so the load generator and upstream it starts
    s = Settings(
        duration=args.duration or (1.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 2.0),
        concurrencies=concurrencies, max_requests=args.max_requests, scenarios=scenarios,
        proxy_cpus=proxy_cpus, load_cpus=load_cpus,
    )

    procs = Processes(proxy_cpus)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="mcpmeter-bench-"))
    result: dict[str, Any] = {
        "version": 1, "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": host_info(s),
        "settings": {"duration_s": s.duration, "warmup_s": s.warmup, "concurrencies": list(concurrencies),
                     "max_requests": s.max_requests, "price_micro_cents": PRICE, "quick": args.quick,
                     "answer": args.answer},
    }
    t0 = time.monotonic()
    pinned = contextlib.ExitStack()
    try:
        s.backends_pinned = pinned.enter_context(backends_pinned(load_cpus)) > 0
        upstream, upstream_port = start_upstream(procs, args.answer)
        if args.memory is not None:
            print(f"memory run: {args.memory} calls at c=32 through gateway-embedded (pinned: "
                  f"{'proxy on CPU ' + str(sorted(proxy_cpus)) if proxy_cpus else 'no'})", flush=True)
            result["memory"] = run_memory(args.memory, args.memory_warmup, procs, workdir, upstream, upstream_port)
            print_memory(result["memory"])
        else:
            print(f"benchmark: {s.duration:g} s per run, {s.warmup:g} s warm-up, concurrency "
                  f"{', '.join(map(str, concurrencies))}; proxy pinned to CPU "
                  f"{sorted(proxy_cpus) if proxy_cpus else '(not pinned)'}, load on {sorted(load_cpus or [])}; "
                  f"MariaDB and Redis {'on ' + str(sorted(load_cpus or [])) if s.backends_pinned else 'not pinned'}",
                  flush=True)
            result["scenarios"] = {}
            for name in scenarios:
                sc = run_scenario(name, s, procs, workdir, upstream, upstream_port)
                result["scenarios"][name] = sc.to_json()
                summary = sc.status if sc.status != "ok" else ", ".join(
                    f"c={c} {r['rps']:.0f} req/s" for c, r in sc.runs.items())
                print(f"  {name}: {summary}{'' if sc.status == 'ok' else ' (' + str(sc.reason) + ')'}", flush=True)
            print_table(result)
            redis_calls = args.redis_calls if args.redis_calls is not None else (200 if args.quick else 500)
            result["redis_pairs"] = redis_pairs_step(redis_calls, s, procs, workdir, upstream_port)
            print_redis_pairs(result["redis_pairs"])
            result["targets"] = targets(result, concurrencies)
            print_targets(result["targets"])
            # Issue 10's budget: too small for a wrk run to resolve, so timed in-process (bench/features.py).
            try:
                result["features_us"] = {k: round(v, 2) for k, v in asyncio.run(features.measure()).items()}
                print("\n" + features.report(result["features_us"]))
            except Exception as e:  # the load runs' results are still written
                print(f"\nagent-protocol features: not measured ({type(e).__name__}: {e})", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        pinned.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults written to {out} ({result['wall_s']} s)")
    if args.compare:
        compare(json.loads(Path(args.compare[0]).read_text()), result)
    failed = [n for n, sc in result.get("scenarios", {}).items() if sc["status"] == "failed"]
    ledger_bad = [n for n, sc in result.get("scenarios", {}).items() if sc.get("ledger") and not sc["ledger"]["ok"]]
    if result.get("redis_pairs", {}).get("status") == "failed":
        failed.append("redis-pairs")
    if result.get("redis_pairs", {}).get("ledger") and not result["redis_pairs"]["ledger"]["ok"]:
        ledger_bad.append("redis-pairs")
    if result.get("memory") and not result["memory"]["ledger"]["ok"]:
        ledger_bad.append("memory")
    return 1 if failed or ledger_bad else 0


if __name__ == "__main__":
    sys.exit(main())
