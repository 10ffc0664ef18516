"""Redis for the tests: a key prefix of its own per use, always cleaned up; or a server of its own.

The shared server is 127.0.0.1:6379, database 15, no password, unless MCPMETER_TEST_REDIS_HOST,
_PORT, _DB, _PASSWORD say otherwise (the gateway's REDIS_* variables are deliberately not read:
a test must never touch a production Redis). Every use gets the prefix
`mcpmeter-test-<pid>-<random>:` and its keys are deleted afterwards. When no server answers,
Redis tests skip and say why. `RedisProcess` runs a throwaway `redis-server` on a free port for
tests that stop and restart Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from addon.config import RedisSettings

SERVER = RedisSettings(
    host=os.environ.get("MCPMETER_TEST_REDIS_HOST", "127.0.0.1"),
    port=int(os.environ.get("MCPMETER_TEST_REDIS_PORT", "6379")),
    db=int(os.environ.get("MCPMETER_TEST_REDIS_DB", "15")),
    password=os.environ.get("MCPMETER_TEST_REDIS_PASSWORD") or None,
    prefix="",
)
_unreachable: str | None = None
_checked = False


def require_server() -> RedisSettings:
    """The shared test server's settings, or skip the test with the reason it cannot be reached."""
    global _checked, _unreachable
    if not _checked:
        _checked = True
        try:
            with client(SERVER) as r:
                r.ping()
        except redis.RedisError as e:
            _unreachable = str(e) or type(e).__name__
    if _unreachable is not None:
        if os.environ.get("MCPMETER_REQUIRE_BACKENDS") == "1":  # CI: a skipped production test is a failure
            pytest.fail(f"MCPMETER_REQUIRE_BACKENDS=1 but Redis is not reachable: {_unreachable}")
        pytest.skip(f"Redis not reachable at {SERVER.host}:{SERVER.port} ({_unreachable}); "
                    "set MCPMETER_TEST_REDIS_HOST/_PORT/_DB/_PASSWORD to run these tests")
    return SERVER


def client(settings: RedisSettings) -> redis.Redis:
    """A plain blocking client, for setting up and inspecting what a test wrote."""
    return redis.Redis(host=settings.host, port=settings.port, db=settings.db, password=settings.password,
                       socket_connect_timeout=1, socket_timeout=2, decode_responses=True)


def new_prefix() -> str:
    return f"mcpmeter-test-{os.getpid()}-{secrets.token_hex(4)}:"


@contextmanager
def scratch_prefix(server: RedisSettings | None = None) -> Iterator[RedisSettings]:
    """Settings for the shared server (or `server`) with a new prefix; its keys are deleted on exit."""
    settings = replace(server or require_server(), prefix=new_prefix())
    try:
        yield settings
    finally:
        delete_prefix(settings)


def keys(settings: RedisSettings) -> set[str]:
    """Every key under the settings' prefix."""
    with client(settings) as r:
        return set(r.scan_iter(match=_glob_escape(settings.prefix) + "*", count=1000))


def delete_prefix(settings: RedisSettings) -> None:
    if not settings.prefix:
        raise ValueError("refusing to delete every key of a database")
    try:
        found = keys(settings)
        if found:
            with client(settings) as r:
                r.delete(*found)
    except redis.RedisError:
        pass  # a server the test stopped; nothing left to clean


def gateway_env(settings: RedisSettings) -> dict[str, str]:
    """Environment for a gateway subprocess that should use this Redis."""
    env = {"MCPMETER_CACHE": "redis", "REDIS_HOST": settings.host, "REDIS_PORT": str(settings.port),
           "REDIS_DB": str(settings.db), "MCPMETER_REDIS_PREFIX": settings.prefix}
    if settings.password:
        env["REDIS_PASSWORD"] = settings.password
    return env


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A `redis-server` of a test's own on 127.0.0.1, without persistence; stop() and start() at will.

    Use as a context manager: the process is killed on exit, whatever happens.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed; it is needed to stop and restart a Redis")
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> RedisSettings:
        """Settings for this server, with a new prefix."""
        return RedisSettings(host="127.0.0.1", port=self.port, db=0, password=None, prefix=new_prefix())

    def start(self, timeout: float = 5.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / f"redis-{self.port}.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5) as r:
                    r.ping()
                return
            except redis.RedisError as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start: {e}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server (no shutdown courtesy: this is a crash) and wait until it is gone."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.kill()
        proc.wait(timeout=5)

    def __enter__(self) -> RedisProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
